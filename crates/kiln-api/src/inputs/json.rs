//! Reading a request body as JSON, strictly: a key given twice in one object is refused, where
//! `serde_json::Value` silently keeps the last. Two spellings of one field in one body are a
//! client bug (or an attempt to slip a value past a proxy that reads the first); naming the
//! field lets the client fix it.

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::fmt;

/// Why a body is not acceptable JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonError {
    /// Not JSON at all; serde_json's description (line and column).
    Syntax(String),
    /// A key repeated within one object, by its path (`image_size.width`, `image_urls[1].x`).
    DuplicateKey(String),
}

/// Parses `bytes` as one JSON value, refusing repeated keys.
pub fn parse_json(bytes: &[u8]) -> Result<Value, JsonError> {
    let path = RefCell::new(Vec::new());
    let duplicate = RefCell::new(None);
    let mut reader = serde_json::Deserializer::from_slice(bytes);
    let parsed = Strict {
        path: &path,
        duplicate: &duplicate,
    }
    .deserialize(&mut reader)
    .and_then(|value| reader.end().map(|()| value));
    match (parsed, duplicate.into_inner()) {
        (_, Some(path)) => Err(JsonError::DuplicateKey(path)),
        (Ok(value), None) => Ok(value),
        (Err(e), None) => Err(JsonError::Syntax(e.to_string())),
    }
}

/// Builds a `Value` like serde_json's own, tracking where it is so a repeated key can be named.
#[derive(Clone, Copy)]
struct Strict<'a> {
    path: &'a RefCell<Vec<Segment>>,
    duplicate: &'a RefCell<Option<String>>,
}

/// One step of the path to where the reader is. Spelt out only when a duplicate is found: a
/// large array costs no string per element.
enum Segment {
    Key(String),
    Index(usize),
}

impl Strict<'_> {
    fn nested<T>(&self, segment: Segment, f: impl FnOnce() -> T) -> T {
        self.path.borrow_mut().push(segment);
        let result = f();
        self.path.borrow_mut().pop();
        result
    }

    fn path_with(&self, key: &str) -> String {
        let mut path = String::new();
        for segment in self.path.borrow().iter() {
            match segment {
                Segment::Key(k) => {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(k);
                }
                Segment::Index(i) => path.push_str(&format!("[{i}]")),
            }
        }
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key);
        path
    }
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        loop {
            let next = self.nested(Segment::Index(items.len()), || seq.next_element_seed(self));
            match next? {
                Some(item) => items.push(item),
                None => return Ok(Value::Array(items)),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                *self.duplicate.borrow_mut() = Some(self.path_with(&key));
                return Err(de::Error::custom("duplicate key"));
            }
            let value = self.nested(Segment::Key(key.clone()), || map.next_value_seed(self))?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_what_serde_json_reads() {
        let text = br#"{"prompt": "a fox", "seed": 42, "guidance": 2.5, "raw": false,
            "image_urls": ["a", "b"], "nested": {"x": null, "y": -3}}"#;
        assert_eq!(
            parse_json(text),
            Ok(serde_json::from_slice::<Value>(text).unwrap())
        );
        assert_eq!(parse_json(b"28.0"), Ok(json!(28.0)));
    }

    #[test]
    fn a_repeated_key_is_named_by_its_path() {
        let cases: [(&[u8], &str); 4] = [
            (br#"{"prompt": "a", "prompt": "b"}"#, "prompt"),
            (
                br#"{"image_size": {"width": 1, "width": 2}}"#,
                "image_size.width",
            ),
            (
                br#"{"image_urls": ["x", {"a": 1, "a": 1}]}"#,
                "image_urls[1].a",
            ),
            (br#"[{}, {"k": 1, "k": 2}]"#, "[1].k"),
        ];
        for (text, path) in cases {
            assert_eq!(
                parse_json(text),
                Err(JsonError::DuplicateKey(path.into())),
                "{}",
                String::from_utf8_lossy(text)
            );
        }
        // The same key in sibling objects is no repetition.
        assert!(parse_json(br#"{"a": {"k": 1}, "b": {"k": 2}}"#).is_ok());
    }

    #[test]
    fn hostile_shapes_are_refused_or_read_cheaply() {
        // Nesting past serde_json's depth limit is a syntax error, not a stack overflow.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(matches!(
            parse_json(deep.as_bytes()),
            Err(JsonError::Syntax(_))
        ));
        // A long array is read whole (no string is built per element).
        let long = format!("[{}0]", "0,".repeat(1_000_000));
        assert_eq!(
            parse_json(long.as_bytes())
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            1_000_001
        );
    }

    #[test]
    fn syntax_errors_and_trailing_data_are_refused() {
        for text in [&b"{\"prompt\": "[..], b"{} {}", b"", b"{\"a\": 1,}"] {
            assert!(
                matches!(parse_json(text), Err(JsonError::Syntax(_))),
                "{text:?}"
            );
        }
    }
}
