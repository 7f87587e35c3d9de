//! Headers and properties of a message: AMQP's field table and basic properties, as plain
//! data.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// AMQP message headers (a field table), ordered by key.
pub type Headers = BTreeMap<String, HeaderValue>;

/// One AMQP field value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum HeaderValue {
    /// No value (AMQP `void`).
    Void,
    /// A boolean.
    Bool(bool),
    /// Any signed or unsigned integer that fits in 64 bits.
    Int(i64),
    /// A float or double.
    #[serde(with = "any_float")]
    Float(f64),
    /// An exact decimal number, `value / 10^scale` (AMQP `decimal`, kept as such in copies).
    Decimal {
        /// How many digits of `value` are after the decimal point.
        scale: u8,
        /// The digits, signed.
        value: i32,
    },
    /// A UTF-8 string (AMQP long string).
    String(String),
    /// Raw bytes (AMQP byte array, or a long string that is not UTF-8).
    Bytes(Vec<u8>),
    /// Seconds since the Unix epoch.
    Timestamp(u64),
    /// An array of values.
    Array(Vec<HeaderValue>),
    /// A nested field table.
    Table(Headers),
}

impl HeaderValue {
    /// The string inside, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            HeaderValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// An exact decimal written out, e.g. `-12345.678`, if this is a decimal.
    ///
    /// ```
    /// use micro_framework::HeaderValue;
    /// let decimal = HeaderValue::Decimal { scale: 3, value: -12_345_678 };
    /// assert_eq!(decimal.decimal_text().as_deref(), Some("-12345.678"));
    /// ```
    pub fn decimal_text(&self) -> Option<String> {
        let HeaderValue::Decimal { scale, value } = self else { return None };
        let digits = format!("{:0>width$}", value.unsigned_abs(), width = usize::from(*scale) + 1);
        let (whole, fraction) = digits.split_at(digits.len() - usize::from(*scale));
        let sign = if *value < 0 { "-" } else { "" };
        Some(if fraction.is_empty() {
            format!("{sign}{whole}")
        } else {
            format!("{sign}{whole}.{fraction}")
        })
    }

    /// The integer inside, if this is an integer.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            HeaderValue::Int(i) => Some(*i),
            _ => None,
        }
    }
}

impl From<&str> for HeaderValue {
    fn from(value: &str) -> Self {
        HeaderValue::String(value.to_owned())
    }
}

impl From<String> for HeaderValue {
    fn from(value: String) -> Self {
        HeaderValue::String(value)
    }
}

impl From<i64> for HeaderValue {
    fn from(value: i64) -> Self {
        HeaderValue::Int(value)
    }
}

impl From<bool> for HeaderValue {
    fn from(value: bool) -> Self {
        HeaderValue::Bool(value)
    }
}

/// A float as plain data: JSON has no NaN nor infinities, which AMQP peers may send (Python's
/// `float("nan")`); serde_json writes them as `null`, which cannot be read back as a float, so
/// a message with such a header would not survive a trip through JSON. They are written as the
/// strings `"NaN"`, `"inf"` and `"-inf"` instead.
mod any_float {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Float {
        Finite(f64),
        Named(String),
    }

    pub(super) fn serialize<S: Serializer>(float: &f64, serializer: S) -> Result<S::Ok, S::Error> {
        let named = if float.is_nan() {
            "NaN"
        } else if *float == f64::INFINITY {
            "inf"
        } else if *float == f64::NEG_INFINITY {
            "-inf"
        } else {
            return serializer.serialize_f64(*float);
        };
        serializer.serialize_str(named)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
        match Float::deserialize(deserializer)? {
            Float::Finite(float) => Ok(float),
            Float::Named(named) => match named.as_str() {
                "NaN" => Ok(f64::NAN),
                "inf" => Ok(f64::INFINITY),
                "-inf" => Ok(f64::NEG_INFINITY),
                other => Err(serde::de::Error::custom(format!("not a float: {other:?}"))),
            },
        }
    }
}

/// The basic properties of a message.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Properties {
    /// MIME type of the body, e.g. `application/json`.
    pub content_type: Option<String>,
    /// Encoding of the body, e.g. `utf-8`.
    pub content_encoding: Option<String>,
    /// Application headers.
    pub headers: Headers,
    /// 1 = transient, 2 = persistent.
    pub delivery_mode: Option<u8>,
    /// Message priority.
    pub priority: Option<u8>,
    /// RPC correlation id.
    pub correlation_id: Option<String>,
    /// RPC reply routing key.
    pub reply_to: Option<String>,
    /// Per-message TTL in milliseconds, as a decimal string.
    pub expiration: Option<String>,
    /// Application message id.
    pub message_id: Option<String>,
    /// Seconds since the Unix epoch.
    pub timestamp: Option<u64>,
    /// Application message type (AMQP `type`).
    pub kind: Option<String>,
    /// Creating user id (checked by RabbitMQ when set).
    pub user_id: Option<String>,
    /// Creating application id.
    pub app_id: Option<String>,
}

impl Properties {
    /// The properties AMQP sends as short strings (at most 255 bytes each): each one's name as
    /// AMQP spells it, as the field of `Properties` does (AMQP's `type` is `kind`), and its
    /// value.
    ///
    /// ```
    /// use micro_framework::transport::Properties;
    /// let properties = Properties { kind: Some("order".into()), ..Properties::default() };
    /// let set: Vec<_> = properties.short_strings().into_iter().filter(|(.., v)| v.is_some()).collect();
    /// assert_eq!(set, [("type", "kind", &Some("order".to_owned()))]);
    /// ```
    #[doc(hidden)] // for the workspace's CLI, not an API of its own
    pub fn short_strings(&self) -> [(&'static str, &'static str, &Option<String>); 9] {
        [
            ("content_type", "content_type", &self.content_type),
            ("content_encoding", "content_encoding", &self.content_encoding),
            ("correlation_id", "correlation_id", &self.correlation_id),
            ("reply_to", "reply_to", &self.reply_to),
            ("expiration", "expiration", &self.expiration),
            ("message_id", "message_id", &self.message_id),
            ("type", "kind", &self.kind),
            ("user_id", "user_id", &self.user_id),
            ("app_id", "app_id", &self.app_id),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Through JSON, as a program may keep a message.
    fn through_json(value: &HeaderValue) -> HeaderValue {
        let json = serde_json::to_string(value).unwrap();
        serde_json::from_str(&json).unwrap_or_else(|error| panic!("{json}: {error}"))
    }

    #[test]
    fn every_float_a_peer_can_send_survives_json() {
        for float in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0, 1.5, f64::MAX] {
            let HeaderValue::Float(read) = through_json(&HeaderValue::Float(float)) else {
                panic!("{float} is no float any more")
            };
            assert_eq!(read.to_bits(), float.to_bits(), "{float}");
        }
        let nested = HeaderValue::Array(vec![HeaderValue::Table(Headers::from([(
            "ratio".to_owned(),
            HeaderValue::Float(f64::NAN),
        )]))]);
        assert!(matches!(through_json(&nested), HeaderValue::Array(_)));
        let value = serde_json::to_value(HeaderValue::Float(f64::INFINITY)).unwrap();
        let read: HeaderValue = serde_json::from_value(value).unwrap();
        assert_eq!(read, HeaderValue::Float(f64::INFINITY), "from a JSON value too");
    }
}
