//! Compact JSON objects whose keys keep the order they were added in, for
//! the values Istio's agent and users read as text (`PROXY_CONFIG`,
//! `ISTIO_META_POD_PORTS`, `ISTIO_KUBE_APP_PROBERS`...).

use std::fmt;

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::value::{RawValue, to_raw_value};

/// An ordered JSON object.
#[derive(Debug, Default)]
pub struct Object(Vec<(String, Box<RawValue>)>);

impl Object {
    /// An empty object.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `key` with `value`.
    pub fn insert(&mut self, key: &str, value: &impl Serialize) {
        // Serialising plain strings, numbers, maps and `Object`s cannot fail.
        if let Ok(raw) = to_raw_value(value) {
            self.0.push((key.to_owned(), raw));
        }
    }

    /// Appends `key` with a pre-rendered JSON value.
    pub fn insert_raw(&mut self, key: &str, value: Box<RawValue>) {
        self.0.push((key.to_owned(), value));
    }

    /// Whether the object has no keys.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for Object {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, value) in &self.0 {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

impl fmt::Display for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&serde_json::to_string(self).map_err(|_| fmt::Error)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_insertion_order_and_nests() {
        let mut inner = Object::new();
        inner.insert("z", &1);
        inner.insert("a", &"x");
        let mut outer = Object::new();
        outer.insert("b", &inner);
        outer.insert("a", &Option::<String>::None);
        assert_eq!(outer.to_string(), r#"{"b":{"z":1,"a":"x"},"a":null}"#);
    }
}
