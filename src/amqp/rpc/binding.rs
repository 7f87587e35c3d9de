//! Binding an RPC request's positional and keyword arguments to a struct with named fields,
//! as Python binds them to a signature, in one pass of the struct's own `Deserialize`.
//!
//! A derived struct maps a key to a field by name (or alias), and also by index: `visit_u64`
//! with the declaration order of the fields it deserializes. So positional arguments are handed
//! over as indices and keyword arguments as names, and serde applies renames, aliases, skipped
//! fields and defaults itself. A key that names no field has its value skipped through
//! `IgnoredAny` (or is refused at the key, with `deny_unknown_fields`): either way it is an
//! argument too many.

use std::fmt;

use serde::de::value::{MapAccessDeserializer, StrDeserializer, U64Deserializer};
use serde::de::{self, DeserializeOwned, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::{map, Map, Value};

/// Why arguments do not fit a struct.
#[derive(Debug, PartialEq)]
pub(super) enum Misfit {
    /// The call does not match the signature, said as Python says it
    /// ("takes 2 positional argument(s) but 3 were given").
    Signature(String),
    /// What serde says of an argument, or of a missing one.
    Value(String),
}

impl Misfit {
    /// The message for a call of `method`.
    pub(super) fn naming(self, method: &str) -> String {
        match self {
            Misfit::Signature(text) => format!("{method}() {text}"),
            Misfit::Value(text) => format!("{method}(): {text}"),
        }
    }
}

impl fmt::Display for Misfit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Misfit::Signature(text) | Misfit::Value(text) => f.write_str(text),
        }
    }
}

impl std::error::Error for Misfit {}

impl de::Error for Misfit {
    fn custom<T: fmt::Display>(message: T) -> Self {
        Misfit::Value(message.to_string())
    }

    // A struct reports a field given twice: by position and by keyword, or by two aliases.
    fn duplicate_field(field: &'static str) -> Self {
        Misfit::Signature(format!("got multiple values for argument '{field}'"))
    }
}

impl From<serde_json::Error> for Misfit {
    fn from(error: serde_json::Error) -> Self {
        Misfit::Value(error.to_string())
    }
}

/// Bind `args` and `kwargs` to `T`, a struct with named fields.
pub(super) fn bind_struct<T: DeserializeOwned>(
    args: &[Value],
    kwargs: &Map<String, Value>,
) -> Result<T, Misfit> {
    let arguments = Arguments { args, kwargs: kwargs.iter(), next: 0, current: None };
    T::deserialize(MapAccessDeserializer::new(arguments))
}

/// The arguments as a map: positional ones first, keyed by index, then keyword ones.
struct Arguments<'a> {
    args: &'a [Value],
    kwargs: map::Iter<'a>,
    /// The index of the next positional argument.
    next: usize,
    /// The argument whose key was handed over last: its value comes next.
    current: Option<Argument<'a>>,
}

impl<'a> MapAccess<'a> for Arguments<'a> {
    type Error = Misfit;

    fn next_key_seed<K: DeserializeSeed<'a>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Misfit> {
        let (key, value) = match self.args.get(self.next) {
            Some(value) => {
                self.next += 1;
                (Key::Position(self.next - 1), value)
            }
            None => match self.kwargs.next() {
                Some((name, value)) => (Key::Name(name), value),
                None => return Ok(None),
            },
        };
        let argument = Argument { key, value, given: self.args.len() };
        let field = match key {
            Key::Position(index) => seed.deserialize(U64Deserializer::<Misfit>::new(index as u64)),
            Key::Name(name) => seed.deserialize(StrDeserializer::<Misfit>::new(name)),
        };
        let field = field.map_err(|_| argument.fills_no_field())?;
        self.current = Some(argument);
        Ok(Some(field))
    }

    fn next_value_seed<V: DeserializeSeed<'a>>(&mut self, seed: V) -> Result<V::Value, Misfit> {
        match self.current.take() {
            Some(argument) => seed.deserialize(argument),
            None => Err(de::Error::custom("an argument's value was asked for before its key")),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.args.len() - self.next + self.kwargs.len())
    }
}

/// How an argument was given.
#[derive(Clone, Copy)]
enum Key<'a> {
    Position(usize),
    Name(&'a str),
}

/// One argument's value, deserialized as its field asks, unless the field is none.
struct Argument<'a> {
    key: Key<'a>,
    value: &'a Value,
    /// How many positional arguments the call has.
    given: usize,
}

impl Argument<'_> {
    /// The argument fills no field. Positional ones fill the fields in order and are handed
    /// over in order, so the first that fills none is one past the last field.
    fn fills_no_field(&self) -> Misfit {
        Misfit::Signature(match self.key {
            Key::Position(index) => {
                format!("takes {index} positional argument(s) but {} were given", self.given)
            }
            Key::Name(name) => format!("got an unexpected keyword argument '{name}'"),
        })
    }
}

/// Forward to the argument's JSON value.
macro_rules! forward_to_value {
    ($($method:ident($($parameter:ident: $kind:ty),*))*) => {
        $(
            fn $method<V: Visitor<'a>>(
                self,
                $($parameter: $kind,)*
                visitor: V,
            ) -> Result<V::Value, Misfit> {
                Ok(self.value.$method($($parameter,)* visitor)?)
            }
        )*
    };
}

impl<'a> Deserializer<'a> for Argument<'a> {
    type Error = Misfit;

    // Only a key that names no field has its value skipped.
    fn deserialize_ignored_any<V: Visitor<'a>>(self, _visitor: V) -> Result<V::Value, Misfit> {
        Err(self.fills_no_field())
    }

    forward_to_value! {
        deserialize_any() deserialize_bool() deserialize_i8() deserialize_i16()
        deserialize_i32() deserialize_i64() deserialize_i128() deserialize_u8()
        deserialize_u16() deserialize_u32() deserialize_u64() deserialize_u128()
        deserialize_f32() deserialize_f64() deserialize_char() deserialize_str()
        deserialize_string() deserialize_bytes() deserialize_byte_buf() deserialize_option()
        deserialize_unit() deserialize_seq() deserialize_map() deserialize_identifier()
        deserialize_unit_struct(name: &'static str)
        deserialize_newtype_struct(name: &'static str)
        deserialize_tuple(len: usize)
        deserialize_tuple_struct(name: &'static str, len: usize)
        deserialize_struct(name: &'static str, fields: &'static [&'static str])
        deserialize_enum(name: &'static str, variants: &'static [&'static str])
    }
}
