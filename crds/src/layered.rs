//! One field list, two types: the fully defaulted settings a `Mesh` carries
//! and the all-optional overrides a `ProxyProfile` carries, plus the
//! field-by-field layering of the second onto the first.

/// Declares a settings struct (every field defaulted, as on a `Mesh`) and its
/// override struct (every field optional, as on a `ProxyProfile`), with
/// `apply`, which lays an override on the settings field by field.
///
/// A field may name a merge function (`=> merge_fn`) for values that merge
/// rather than replace (maps merge key by key), and an override type of its
/// own (`: Settings | SettingsOverride`) for a nested section that is itself
/// overridden field by field.
macro_rules! layered_settings {
    (
        $(#[$settings_meta:meta])*
        pub struct $settings:ident;
        $(#[$override_meta:meta])*
        pub struct $overrides:ident;
        fields {
            $(
                $(#[$field_meta:meta])*
                $field:ident : $ty:ty $(| $override_ty:ty)? = $default:expr $(=> $merge:path)?;
            )*
        }
    ) => {
        $(#[$settings_meta])*
        #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
        #[serde(rename_all = "camelCase", default)]
        pub struct $settings {
            $(
                $(#[$field_meta])*
                pub $field: $ty,
            )*
        }

        impl Default for $settings {
            fn default() -> Self {
                Self { $( $field: $default, )* }
            }
        }

        $(#[$override_meta])*
        #[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
        #[serde(rename_all = "camelCase")]
        pub struct $overrides {
            $(
                $(#[$field_meta])*
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub $field: Option<layered_settings!(@override_ty $ty $(, $override_ty)?)>,
            )*
        }

        impl $settings {
            /// Lays `overrides` on these settings: every field the override
            /// sets replaces (or, for maps, merges into) the value here.
            pub fn apply(&mut self, overrides: &$overrides) {
                $(
                    if let Some(value) = &overrides.$field {
                        layered_settings!(@merge self.$field, value $(, $merge)?);
                    }
                )*
            }
        }
    };
    (@override_ty $ty:ty) => { $ty };
    (@override_ty $ty:ty, $override_ty:ty) => { $override_ty };
    (@merge $target:expr, $value:expr) => { $target = $value.clone() };
    (@merge $target:expr, $value:expr, $merge:path) => { $merge(&mut $target, $value) };
}

pub(crate) use layered_settings;
