//! Whether a type deserializes as a struct with named fields (`#[derive(Deserialize)]`), read
//! from what its `Deserialize` implementation asks the deserializer for.

use std::fmt;

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};

/// Whether `T` asks for a struct with named fields (`deserialize_struct`); false for tuples,
/// sequences, maps, values and anything else. The field list `T` hands over is not kept: it
/// holds the fields' aliases too, so it tells neither how many fields there are nor which
/// name is whose.
pub(crate) fn has_named_fields<T: DeserializeOwned>() -> bool {
    let mut named = false;
    // The probe always fails once it has seen what `T` asked for.
    let _ = T::deserialize(Probe(&mut named));
    named
}

struct Probe<'a>(&'a mut bool);

#[derive(Debug)]
struct Probed;

impl fmt::Display for Probed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("shape probed")
    }
}

impl std::error::Error for Probed {}

impl de::Error for Probed {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Probed
    }
}

impl<'de> Deserializer<'de> for Probe<'_> {
    type Error = Probed;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Probed> {
        Err(Probed)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Probed> {
        *self.0 = true;
        Err(Probed)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Add {
        a: i64,
        #[serde(rename = "second")]
        b: i64,
    }

    #[test]
    fn only_structs_with_named_fields_have_them() {
        assert!(has_named_fields::<Add>());
        assert!(!has_named_fields::<(i64, i64)>());
        assert!(!has_named_fields::<serde_json::Value>());
        assert!(!has_named_fields::<Vec<i64>>());
    }
}
