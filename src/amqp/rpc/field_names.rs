//! The field names of a `#[derive(Deserialize)]` struct, read from what its `Deserialize`
//! implementation asks the deserializer for (`deserialize_struct` receives them).

use std::fmt;

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};

/// The field names of `T` (as serialized, renames applied) when `T` deserializes as a struct
/// with named fields; `None` for tuples, sequences, maps, values and anything else.
pub(crate) fn field_names<T: DeserializeOwned>() -> Option<&'static [&'static str]> {
    let mut names = None;
    // The probe always fails once it has seen what `T` asked for.
    let _ = T::deserialize(Probe(&mut names));
    names
}

struct Probe<'a>(&'a mut Option<&'static [&'static str]>);

#[derive(Debug)]
struct Probed;

impl fmt::Display for Probed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("field names probed")
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
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Probed> {
        *self.0 = Some(fields);
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
    fn named_fields_only() {
        assert_eq!(field_names::<Add>(), Some(&["a", "second"][..]));
        assert_eq!(field_names::<(i64, i64)>(), None);
        assert_eq!(field_names::<serde_json::Value>(), None);
        assert_eq!(field_names::<Vec<i64>>(), None);
    }
}
