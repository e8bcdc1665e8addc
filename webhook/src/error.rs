//! The webhook crate's error type.

/// Everything that can go wrong in the injector, the server and the CLI.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A pod annotation has a value the injector refuses.
    #[error("annotation {name} has invalid value {value:?}: {reason}")]
    InvalidAnnotation {
        /// The annotation's name.
        name: String,
        /// The value as given.
        value: String,
        /// Why it was refused.
        reason: String,
    },
    /// A pod annotation the injector parses is over its size limit.
    #[error(
        "annotation {name} is {len} bytes, over the limit of {max} bytes for annotations the injector parses"
    )]
    AnnotationTooLarge {
        /// The annotation's name.
        name: String,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A Mesh or ProxyProfile field has a value the injector refuses.
    #[error("{origin}: field {field} has invalid value {value:?}: {reason}")]
    InvalidSetting {
        /// Which object: `Mesh default`, `ProxyProfile ns/name`.
        origin: String,
        /// The field path, e.g. `traffic.excludeOutboundIPRanges`.
        field: String,
        /// The value as given.
        value: String,
        /// Why it was refused.
        reason: String,
    },
    /// A Mesh or ProxyProfile file holds something other than what it should.
    #[error("{file}: document {document}{}: {message}", .object.as_ref().map(|o| format!(" ({o})")).unwrap_or_default())]
    ConfigFile {
        /// The file's name as given.
        file: String,
        /// Index of the YAML document, from 0.
        document: usize,
        /// `Kind/name` of the object, when known.
        object: Option<String>,
        /// Why, naming the field where there is one.
        message: String,
    },
    /// A Mesh or ProxyProfile file that cannot be read.
    #[error("reading {file}: {reason}")]
    ConfigFileUnreadable {
        /// The file's name as given.
        file: String,
        /// The operating system's reason.
        reason: String,
    },
    /// The pod cannot be injected as it stands.
    #[error("pod cannot be injected: {0}")]
    InvalidPod(String),
    /// A JSON (de)serialisation failure.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An invalid-annotation error.
    pub fn annotation(name: &str, value: &str, reason: impl Into<String>) -> Self {
        Self::InvalidAnnotation {
            name: name.to_owned(),
            value: value.to_owned(),
            reason: reason.into(),
        }
    }
}
