//! Size limits on what a service sends, checked before it reaches the broker: a body over
//! `MAX_MESSAGE_SIZE` (RabbitMQ would close the channel on it), headers that do not fit in one
//! frame (RabbitMQ would close the whole connection).

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
pub fn check_size(
    what: impl std::fmt::Display,
    len: usize,
    max: usize,
) -> Result<(), TransportError> {
    if len > max {
        return Err(TransportError::LimitReached {
            what: Limit::MessageSize,
            size: len as u64,
            limit: max as u64,
            reason: format!(
                "{what} of {len} bytes exceeds MAX_MESSAGE_SIZE ({max} bytes); not sent"
            ),
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
    let short = |value: &Option<String>| value.as_ref().map_or(0, |text| 1 + text.len());
    let texts = [
        &properties.content_type,
        &properties.content_encoding,
        &properties.correlation_id,
        &properties.reply_to,
        &properties.expiration,
        &properties.message_id,
        &properties.kind,
        &properties.user_id,
        &properties.app_id,
    ];
    let headers = if properties.headers.is_empty() { 0 } else { table_len(&properties.headers) };
    FRAME_OVERHEAD
        + FIXED
        + texts.into_iter().map(short).sum::<usize>()
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
