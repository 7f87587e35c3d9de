//! Whether a type deserializes as a struct with named fields (`#[derive(Deserialize)]`), read
//! from what its `Deserialize` implementation asks the deserializer for.

use std::fmt;

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};

/// Whether `T` asks for a struct with named fields (`deserialize_struct`); false for tuples,
/// sequences, maps, values and anything else. The field list `T` hands over is not kept: it
/// holds the fields' aliases too, so it tells neither how many fields there are nor which
/// name is whose.
pub(crate) fn has_named_fields<T: DeserializeOwned>() -> bool {
    probe::<T>(false)
}

/// [`has_named_fields`], seen through an `Option` or a newtype: whether `T` fills a struct's
/// named fields from what it is given (an `Option<S>` given an array fills `S` by position).
pub(crate) fn fills_named_fields<T: DeserializeOwned>() -> bool {
    probe::<T>(true)
}

fn probe<T: DeserializeOwned>(see_through: bool) -> bool {
    let mut named = false;
    // The probe always fails once it has seen what `T` asked for.
    let _ = T::deserialize(Probe { named: &mut named, see_through });
    named
}

struct Probe<'a> {
    named: &'a mut bool,
    /// Whether an `Option` or a newtype is seen through, to what it holds.
    see_through: bool,
}

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
        *self.named = true;
        Err(Probed)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probed> {
        match self.see_through {
            true => visitor.visit_some(self),
            false => Err(Probed),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Probed> {
        match self.see_through {
            true => visitor.visit_newtype_struct(self),
            false => Err(Probed),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct map enum identifier ignored_any
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
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct Wrapped(Add);
        assert!(!has_named_fields::<Option<Add>>() && !has_named_fields::<Wrapped>());
        // seen through
        assert!(fills_named_fields::<Add>());
        assert!(fills_named_fields::<Option<Add>>());
        assert!(fills_named_fields::<Wrapped>());
        assert!(fills_named_fields::<Option<Box<Add>>>());
        assert!(!fills_named_fields::<Option<Vec<i64>>>());
    }
}
