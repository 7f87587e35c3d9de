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
