//! AMQP headers and properties as JSON, and the dead-letter headers (`x-mf-*`) read from them.

use chrono::DateTime;
use micro_framework::settle::{
    HEADER_ATTEMPTS, HEADER_ERROR, HEADER_ERROR_KIND, HEADER_FAILED_AT, HEADER_ROUTE,
};
use micro_framework::transport::{HeaderValue, Headers, Properties};
use serde_json::{Map, Value};

/// A header value as JSON: timestamps as RFC 3339 text, bytes as (lossy) text.
pub fn to_json(value: &HeaderValue) -> Value {
    match value {
        HeaderValue::Void => Value::Null,
        HeaderValue::Bool(b) => Value::from(*b),
        HeaderValue::Int(i) => Value::from(*i),
        HeaderValue::Float(f) => Value::from(*f),
        HeaderValue::Decimal { .. } => Value::from(value.decimal_text()),
        HeaderValue::String(s) => Value::from(s.as_str()),
        HeaderValue::Bytes(b) => Value::from(String::from_utf8_lossy(b).into_owned()),
        HeaderValue::Timestamp(t) => Value::from(timestamp(*t)),
        HeaderValue::Array(items) => items.iter().map(to_json).collect(),
        HeaderValue::Table(table) => Value::Object(table_to_json(table)),
    }
}

/// A field table as a JSON object.
pub fn table_to_json(table: &Headers) -> Map<String, Value> {
    table.iter().map(|(key, value)| (key.clone(), to_json(value))).collect()
}

/// The set properties of a message (headers apart) as a JSON object.
pub fn properties_to_json(properties: &Properties) -> Map<String, Value> {
    let mut map: Map<String, Value> = properties
        .short_strings()
        .into_iter()
        .filter_map(|(key, _, value)| Some((key.to_owned(), Value::from(value.clone()?))))
        .collect();
    if let Some(mode) = properties.delivery_mode {
        map.insert("delivery_mode".into(), mode.into());
    }
    if let Some(priority) = properties.priority {
        map.insert("priority".into(), priority.into());
    }
    if let Some(seconds) = properties.timestamp {
        map.insert("timestamp".into(), timestamp(seconds).into());
    }
    map
}

/// Seconds since the epoch as RFC 3339 (UTC), or the number when out of range.
pub fn timestamp(seconds: u64) -> String {
    i64::try_from(seconds)
        .ok()
        .and_then(|seconds| DateTime::from_timestamp(seconds, 0))
        .map(|time| time.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| seconds.to_string())
}

/// What the `x-mf-*` headers say about a dead letter (`-` where a header is missing).
#[derive(Debug)]
pub struct DeadLetterSummary {
    /// The route that failed.
    pub route: String,
    /// The failure kind.
    pub kind: String,
    /// The error message.
    pub error: String,
    /// Attempts made.
    pub attempts: String,
    /// When it was dead-lettered.
    pub failed_at: String,
}

impl DeadLetterSummary {
    /// Read the summary from `headers`.
    pub fn of(headers: &Headers) -> Self {
        let text = |key: &str| match headers.get(key) {
            None => "-".to_owned(),
            Some(HeaderValue::String(s)) => s.clone(),
            Some(HeaderValue::Timestamp(t)) => timestamp(*t),
            Some(other) => to_json(other).to_string(),
        };
        DeadLetterSummary {
            route: text(HEADER_ROUTE),
            kind: text(HEADER_ERROR_KIND),
            error: text(HEADER_ERROR),
            attempts: text(HEADER_ATTEMPTS),
            failed_at: match headers.get(HEADER_FAILED_AT) {
                Some(HeaderValue::Int(seconds)) => {
                    u64::try_from(*seconds).map_or_else(|_| seconds.to_string(), timestamp)
                }
                _ => text(HEADER_FAILED_AT),
            },
        }
    }
}
