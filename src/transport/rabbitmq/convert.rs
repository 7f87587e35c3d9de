//! Conversion of headers and properties between the transport's types and lapin's.

use lapin::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};
use lapin::BasicProperties;

use super::error::invalid;
use crate::transport::limits::check_short_string;
use crate::transport::{HeaderValue, Headers, Properties, TransportError};

/// A short string (at most 255 bytes), or an error naming the field: the check the
/// in-process broker shares, so both refuse with the same words.
pub(crate) fn short(value: &str, field: &str) -> Result<ShortString, TransportError> {
    check_short_string(field, value)?;
    ShortString::try_new(value).map_err(|e| invalid(format!("{field}: {e}")))
}

/// Convert one header value. Integers go out as signed 64-bit, floats as doubles.
pub(crate) fn to_amqp_value(value: &HeaderValue) -> Result<AMQPValue, TransportError> {
    Ok(match value {
        HeaderValue::Void => AMQPValue::Void,
        HeaderValue::Bool(b) => AMQPValue::Boolean(*b),
        HeaderValue::Int(i) => AMQPValue::LongLongInt(*i),
        HeaderValue::Float(f) => AMQPValue::Double(*f),
        HeaderValue::Decimal { scale, value } => AMQPValue::DecimalValue(DecimalValue {
            scale: *scale,
            value: u32::from_ne_bytes(value.to_ne_bytes()),
        }),
        HeaderValue::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        HeaderValue::Bytes(b) => AMQPValue::ByteArray(ByteArray::from(b.as_slice())),
        HeaderValue::Timestamp(t) => AMQPValue::Timestamp(*t),
        HeaderValue::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(to_amqp_value).collect::<Result<Vec<_>, _>>()?,
        )),
        HeaderValue::Table(table) => AMQPValue::FieldTable(to_field_table(table)?),
    })
}

/// Convert a header table.
pub(crate) fn to_field_table(headers: &Headers) -> Result<FieldTable, TransportError> {
    let mut table = FieldTable::default();
    for (key, value) in headers {
        table.insert(short(key, "header name")?, to_amqp_value(value)?);
    }
    Ok(table)
}

fn text_or_bytes(bytes: &[u8]) -> HeaderValue {
    match std::str::from_utf8(bytes) {
        Ok(text) => HeaderValue::String(text.to_owned()),
        Err(_) => HeaderValue::Bytes(bytes.to_vec()),
    }
}

/// Convert one received field value. Every integer width becomes [`HeaderValue::Int`],
/// non-UTF-8 long strings become bytes.
pub(crate) fn from_amqp_value(value: &AMQPValue) -> HeaderValue {
    match value {
        AMQPValue::Boolean(b) => HeaderValue::Bool(*b),
        AMQPValue::ShortShortInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::ShortShortUInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::ShortInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::ShortUInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::LongInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::LongUInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::LongLongInt(i) => HeaderValue::Int(*i),
        AMQPValue::Float(f) => HeaderValue::Float(f64::from(*f)),
        AMQPValue::Double(f) => HeaderValue::Float(*f),
        // The wire's decimal digits are a signed 32-bit integer, which amq-protocol keeps as
        // unsigned: read the bits back as signed.
        AMQPValue::DecimalValue(d) => HeaderValue::Decimal {
            scale: d.scale,
            value: i32::from_ne_bytes(d.value.to_ne_bytes()),
        },
        AMQPValue::ShortString(s) => HeaderValue::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => text_or_bytes(s.as_bytes()),
        AMQPValue::FieldArray(items) => {
            HeaderValue::Array(items.as_slice().iter().map(from_amqp_value).collect())
        }
        AMQPValue::Timestamp(t) => HeaderValue::Timestamp(*t),
        AMQPValue::FieldTable(table) => HeaderValue::Table(from_field_table(table)),
        AMQPValue::ByteArray(bytes) => HeaderValue::Bytes(bytes.as_slice().to_vec()),
        AMQPValue::Void => HeaderValue::Void,
    }
}

/// Convert a received field table.
pub(crate) fn from_field_table(table: &FieldTable) -> Headers {
    table.inner().iter().map(|(k, v)| (k.as_str().to_owned(), from_amqp_value(v))).collect()
}

/// Build lapin's properties from the transport's.
pub(crate) fn to_basic_properties(props: &Properties) -> Result<BasicProperties, TransportError> {
    let mut out = BasicProperties::default();
    macro_rules! short_field {
        ($field:ident, $with:ident) => {
            if let Some(value) = &props.$field {
                out = out.$with(short(value, stringify!($field))?);
            }
        };
    }
    short_field!(content_type, with_content_type);
    short_field!(content_encoding, with_content_encoding);
    short_field!(correlation_id, with_correlation_id);
    short_field!(reply_to, with_reply_to);
    short_field!(expiration, with_expiration);
    short_field!(message_id, with_message_id);
    short_field!(kind, with_type);
    short_field!(user_id, with_user_id);
    short_field!(app_id, with_app_id);
    if !props.headers.is_empty() {
        out = out.with_headers(to_field_table(&props.headers)?);
    }
    if let Some(mode) = props.delivery_mode {
        out = out.with_delivery_mode(mode);
    }
    if let Some(priority) = props.priority {
        out = out.with_priority(priority);
    }
    if let Some(timestamp) = props.timestamp {
        out = out.with_timestamp(timestamp);
    }
    Ok(out)
}

/// Build the transport's properties from lapin's.
pub(crate) fn from_basic_properties(props: &BasicProperties) -> Properties {
    let text = |value: &Option<ShortString>| value.as_ref().map(|s| s.as_str().to_owned());
    Properties {
        content_type: text(props.content_type()),
        content_encoding: text(props.content_encoding()),
        headers: props.headers().as_ref().map(from_field_table).unwrap_or_default(),
        delivery_mode: *props.delivery_mode(),
        priority: *props.priority(),
        correlation_id: text(props.correlation_id()),
        reply_to: text(props.reply_to()),
        expiration: text(props.expiration()),
        message_id: text(props.message_id()),
        timestamp: *props.timestamp(),
        kind: text(props.kind()),
        user_id: text(props.user_id()),
        app_id: text(props.app_id()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::DecimalValue;

    fn sample() -> Headers {
        let mut death = Headers::new();
        death.insert("count".into(), HeaderValue::Int(2));
        death.insert("queue".into(), "q".into());
        death.insert("time".into(), HeaderValue::Timestamp(1_700_000_000));
        let mut headers = Headers::new();
        headers.insert("s".into(), "text".into());
        headers.insert("i".into(), HeaderValue::Int(-5_000_000_000));
        headers.insert("b".into(), HeaderValue::Bool(true));
        headers.insert("f".into(), HeaderValue::Float(1.5));
        headers.insert("bytes".into(), HeaderValue::Bytes(vec![0, 159, 255]));
        headers.insert("void".into(), HeaderValue::Void);
        headers.insert(
            "negative decimal".into(),
            HeaderValue::Decimal { scale: 3, value: -12_345_678 },
        );
        headers.insert(
            "nameko.call_id_stack".into(),
            HeaderValue::Array(vec!["svc.m.1".into(), "svc.n.2".into()]),
        );
        headers.insert("x-death".into(), HeaderValue::Array(vec![HeaderValue::Table(death)]));
        headers
    }

    #[test]
    fn headers_roundtrip_losslessly() {
        let headers = sample();
        assert_eq!(from_field_table(&to_field_table(&headers).unwrap()), headers);
    }

    #[test]
    fn every_integer_width_becomes_int() {
        let values = [
            AMQPValue::ShortShortInt(-1),
            AMQPValue::ShortShortUInt(255),
            AMQPValue::ShortInt(-300),
            AMQPValue::ShortUInt(65_000),
            AMQPValue::LongInt(-70_000),
            AMQPValue::LongUInt(4_000_000_000),
            AMQPValue::LongLongInt(i64::MIN),
        ];
        let expected = [-1, 255, -300, 65_000, -70_000, 4_000_000_000, i64::MIN];
        for (value, want) in values.iter().zip(expected) {
            assert_eq!(from_amqp_value(value), HeaderValue::Int(want));
        }
        assert_eq!(from_amqp_value(&AMQPValue::Float(0.5)), HeaderValue::Float(0.5));
        let decimal = AMQPValue::DecimalValue(DecimalValue { scale: 2, value: 150 });
        assert_eq!(from_amqp_value(&decimal), HeaderValue::Decimal { scale: 2, value: 150 });
        assert_eq!(
            from_amqp_value(&AMQPValue::ShortString("short".into())),
            HeaderValue::String("short".into())
        );
        assert_eq!(
            from_amqp_value(&AMQPValue::LongString(LongString::from(vec![0xff, 0xfe]))),
            HeaderValue::Bytes(vec![0xff, 0xfe])
        );
    }

    #[test]
    fn properties_roundtrip() {
        let props = Properties {
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            headers: sample(),
            delivery_mode: Some(2),
            priority: Some(3),
            correlation_id: Some("corr".into()),
            reply_to: Some("reply".into()),
            expiration: Some("60000".into()),
            message_id: Some("mid".into()),
            timestamp: Some(1_700_000_000),
            kind: Some("event".into()),
            user_id: Some("guest".into()),
            app_id: Some("app".into()),
        };
        assert_eq!(from_basic_properties(&to_basic_properties(&props).unwrap()), props);
    }

    #[test]
    fn too_long_short_string_is_an_error() {
        let props = Properties { message_id: Some("x".repeat(256)), ..Properties::default() };
        assert!(matches!(to_basic_properties(&props), Err(TransportError::Invalid(_))));
    }
}
