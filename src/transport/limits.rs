//! Size limits on what a service sends, checked before it reaches the broker: a body over
//! `MAX_MESSAGE_SIZE` (RabbitMQ would close the channel on it), headers that do not fit in one
//! frame (RabbitMQ would close the whole connection), a name or text property over the 255
//! bytes of an AMQP short string (the AMQP client cannot even encode it).

use crate::transport::{HeaderValue, Headers, Limit, Properties, TransportError};

/// Refuse a body of `len` bytes over `max` (the `MAX_MESSAGE_SIZE`) with
/// [`TransportError::LimitReached`] of [`Limit::MessageSize`]; `what` names the body (written
/// out only for a refusal, so `format_args!` costs nothing on the way that passes).
///
/// ```
/// use micro_framework::transport::limits::check_size;
/// use micro_framework::transport::{Limit, TransportError};
/// assert!(check_size("event", 10, 16).is_ok());
/// let error = check_size("event", 17, 16).unwrap_err();
/// assert!(matches!(
///     error,
///     TransportError::LimitReached { what: Limit::MessageSize, size: 17, limit: 16, .. }
/// ));
/// assert!(error.is_permanent());
/// assert_eq!(
///     error.to_string(),
///     "limit reached: event of 17 bytes exceeds MAX_MESSAGE_SIZE (16 bytes); not sent"
/// );
/// ```
#[doc(hidden)] // for the workspace's CLI, not an API of its own
pub fn check_size(
    what: impl std::fmt::Display,
    len: usize,
    max: usize,
) -> Result<(), TransportError> {
    refuse_oversized(what, len, max, "not sent")
}

/// [`check_size`] for a body received, which is then not read.
pub(crate) fn check_received_size(
    what: impl std::fmt::Display,
    len: usize,
    max: usize,
) -> Result<(), TransportError> {
    refuse_oversized(what, len, max, "not read")
}

fn refuse_oversized(
    what: impl std::fmt::Display,
    len: usize,
    max: usize,
    fate: &str,
) -> Result<(), TransportError> {
    if len > max {
        return Err(TransportError::LimitReached {
            what: Limit::MessageSize,
            size: len as u64,
            limit: max as u64,
            reason: format!("{what} of {len} bytes exceeds MAX_MESSAGE_SIZE ({max} bytes); {fate}"),
        });
    }
    Ok(())
}

/// The size, in bytes, of the AMQP frame that carries a message's `properties` (its content
/// header): the frame's own 8 bytes, the class, weight, body size and flags, then each
/// property as the RabbitMQ transport encodes it.
pub(crate) fn content_header_frame_len(properties: &Properties) -> usize {
    const FRAME_OVERHEAD: usize = 8;
    const FIXED: usize = 2 + 2 + 8 + 2;
    let short = |(.., value): (&str, &str, &Option<String>)| {
        value.as_ref().map_or(0, |text| 1 + text.len())
    };
    let headers = if properties.headers.is_empty() { 0 } else { table_len(&properties.headers) };
    FRAME_OVERHEAD
        + FIXED
        + properties.short_strings().into_iter().map(short).sum::<usize>()
        + headers
        + usize::from(properties.delivery_mode.is_some())
        + usize::from(properties.priority.is_some())
        + properties.timestamp.map_or(0, |_| 8)
}

fn table_len(headers: &Headers) -> usize {
    4 + headers.iter().map(|(key, value)| 1 + key.len() + value_len(value)).sum::<usize>()
}

/// One field value with its type tag: integers go out as 64-bit, floats as doubles.
fn value_len(value: &HeaderValue) -> usize {
    1 + match value {
        HeaderValue::Void => 0,
        HeaderValue::Bool(_) => 1,
        HeaderValue::Int(_) | HeaderValue::Float(_) | HeaderValue::Timestamp(_) => 8,
        HeaderValue::Decimal { .. } => 5,
        HeaderValue::String(text) => 4 + text.len(),
        HeaderValue::Bytes(bytes) => 4 + bytes.len(),
        HeaderValue::Array(items) => 4 + items.iter().map(value_len).sum::<usize>(),
        HeaderValue::Table(table) => table_len(table),
    }
}

/// Refuse `properties` with a float header (at any depth) that is not a finite number (NaN,
/// an infinity) with [`TransportError::Invalid`], before anyone sees it: RabbitMQ cannot read
/// such a double and closes the whole connection (541), with every route of the service on
/// it, and again on each retry of the publish; JSON (the worker link) has no such number.
pub(crate) fn check_header_values(properties: &Properties) -> Result<(), TransportError> {
    let non_finite = properties.headers.iter().find(|(_, value)| !finite(value));
    match non_finite {
        None => Ok(()),
        Some((name, _)) => Err(TransportError::Invalid(format!(
            "header {name:?} holds a float that is not a finite number (NaN or an infinity), \
             which AMQP brokers cannot read; not sent"
        ))),
    }
}

fn finite(value: &HeaderValue) -> bool {
    match value {
        HeaderValue::Float(float) => float.is_finite(),
        HeaderValue::Array(items) => items.iter().all(finite),
        HeaderValue::Table(table) => table.values().all(finite),
        _ => true,
    }
}

/// RabbitMQ's default `frame_max`: the in-process broker and the testing toolkit's fakes
/// refuse the same too-large headers, so that what works there works on RabbitMQ.
pub(crate) const RABBITMQ_FRAME_MAX: usize = 131_072;

/// Refuse, before the broker sees them, `properties` a broker cannot take: a content header
/// that would not fit in a frame of `frame_max` bytes ([`check_header_size`]) or a float
/// that is no number ([`check_header_values`]).
pub(crate) fn check_headers(
    properties: &Properties,
    frame_max: usize,
) -> Result<(), TransportError> {
    check_header_size(properties, frame_max)?;
    check_header_values(properties)
}

/// Refuse `properties` whose content header would not fit in a frame of `frame_max` bytes
/// with [`TransportError::LimitReached`] of [`Limit::HeaderSize`], before the broker sees it.
fn check_header_size(properties: &Properties, frame_max: usize) -> Result<(), TransportError> {
    let len = content_header_frame_len(properties);
    if len > frame_max {
        return Err(TransportError::LimitReached {
            what: Limit::HeaderSize,
            size: len as u64,
            limit: frame_max as u64,
            reason: format!(
                "message headers and properties of {len} bytes do not fit in one AMQP frame \
                 (frame_max {frame_max} bytes); not sent"
            ),
        });
    }
    Ok(())
}

/// The most bytes an AMQP short string holds: its length goes out in one byte.
pub(crate) const MAX_SHORT_STRING: usize = 255;

/// Refuse `value`, which AMQP sends as a short string (a name, a routing key, a consumer tag,
/// a text property), when it is over [`MAX_SHORT_STRING`] bytes, with
/// [`TransportError::Invalid`] naming the `field`: the AMQP client cannot encode it, so the
/// RabbitMQ transport refuses it before sending, and the in-process broker refuses the same
/// so that what works there works on RabbitMQ. Only the start of `value` is quoted, escaped
/// (it may come from a peer, and end up in a log line).
pub(crate) fn check_short_string(field: &str, value: &str) -> Result<(), TransportError> {
    if value.len() <= MAX_SHORT_STRING {
        return Ok(());
    }
    let start: String = value.chars().take(32).collect();
    Err(TransportError::Invalid(format!(
        "{field} of {} bytes (starting {start:?}): an AMQP short string holds at most \
         {MAX_SHORT_STRING} bytes; not sent",
        value.len()
    )))
}

/// Refuse `properties` holding a short string AMQP cannot carry ([`check_short_string`]): a
/// text property, or a header name at any depth (the names of a table nested in a header,
/// or in an array of one, are short strings too).
pub(crate) fn check_short_strings(properties: &Properties) -> Result<(), TransportError> {
    // named as the fields of `Properties` are
    for (_, field, value) in properties.short_strings() {
        if let Some(text) = value {
            check_short_string(field, text)?;
        }
    }
    check_table_names("header name", &properties.headers)
}

/// Refuse a field table (headers, or the arguments of a declaration) with a name, at any
/// depth, over [`MAX_SHORT_STRING`] bytes; `field` names its names in the error.
pub(crate) fn check_table_names(field: &str, table: &Headers) -> Result<(), TransportError> {
    for (name, value) in table {
        check_short_string(field, name)?;
        check_value_names(field, value)?;
    }
    Ok(())
}

fn check_value_names(field: &str, value: &HeaderValue) -> Result<(), TransportError> {
    match value {
        HeaderValue::Table(table) => check_table_names(field, table),
        HeaderValue::Array(items) => {
            items.iter().try_for_each(|item| check_value_names(field, item))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid_text(result: Result<(), TransportError>) -> String {
        match result {
            Err(TransportError::Invalid(text)) => text,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn a_short_string_holds_255_bytes_not_characters() {
        assert!(check_short_string("routing key", &"k".repeat(255)).is_ok());
        // 128 two-byte characters: 256 bytes
        let text = invalid_text(check_short_string("routing key", &"é".repeat(128)));
        let start = "é".repeat(32);
        assert!(text.starts_with(&format!("routing key of 256 bytes (starting \"{start}\")")));
        let forged = invalid_text(check_short_string("header name", &"\n".repeat(256)));
        assert!(!forged.contains('\n'), "{forged}");
        assert!(text.contains("at most 255 bytes"), "{text}");
    }

    #[test]
    fn each_text_property_is_named_when_too_long() {
        let long = Some("p".repeat(256));
        let cases: [(&str, Properties); 3] = [
            (
                "correlation_id",
                Properties { correlation_id: long.clone(), ..Properties::default() },
            ),
            ("kind", Properties { kind: long.clone(), ..Properties::default() }),
            ("app_id", Properties { app_id: long, ..Properties::default() }),
        ];
        for (field, properties) in cases {
            let text = invalid_text(check_short_strings(&properties));
            assert!(text.starts_with(field), "{text}");
        }
    }

    #[test]
    fn header_names_are_checked_at_any_depth() {
        let long = "h".repeat(256);
        let inner = HeaderValue::Table(Headers::from([(long.clone(), HeaderValue::Int(1))]));
        let in_array = HeaderValue::Array(vec![HeaderValue::Int(0), inner.clone()]);
        for value in [inner, in_array] {
            let properties = Properties {
                headers: Headers::from([("outer".to_owned(), value)]),
                ..Properties::default()
            };
            assert!(invalid_text(check_short_strings(&properties)).starts_with("header name"));
        }
        let fits = HeaderValue::Table(Headers::from([("h".repeat(255), HeaderValue::Int(1))]));
        let properties = Properties {
            headers: Headers::from([("h".repeat(255), fits)]),
            ..Properties::default()
        };
        assert!(check_short_strings(&properties).is_ok());
    }
}
