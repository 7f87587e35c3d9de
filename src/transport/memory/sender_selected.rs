//! Sender-selected distribution, as RabbitMQ does it: a message is routed with its routing key
//! and with each key of its `CC` and `BCC` headers, through the same exchange, and reaches a
//! queue once however many of its keys match there. `BCC` is removed before routing, so no
//! queue sees it; `CC` stays in the message.

use super::arguments::type_name;
use crate::transport::{HeaderValue, Headers, TransportError};

/// The header whose keys route a message and stay in it.
const CC: &str = "CC";
/// The header whose keys route a message and are removed from it.
const BCC: &str = "BCC";

/// The routing keys of the `CC` then `BCC` headers of a message being published, `BCC`
/// removed from `headers`. A header that is not an array fails the publish, as RabbitMQ
/// refuses the message; elements that are not strings are skipped, as RabbitMQ skips them.
pub(super) fn take_header_routes(headers: &mut Headers) -> Result<Vec<String>, TransportError> {
    let mut keys = keys_of(headers, CC)?;
    keys.extend(keys_of(headers, BCC)?);
    headers.remove(BCC);
    Ok(keys)
}

/// The routing keys of the `CC` header of a message the broker holds (checked when it was
/// published), as a dead letter's `x-death` records them after its routing key.
pub(super) fn cc_routes(headers: &Headers) -> Vec<String> {
    keys_of(headers, CC).unwrap_or_default()
}

/// Remove the `CC` header: a dead letter re-addressed to its queue's dead-letter routing key
/// loses it, as on RabbitMQ.
pub(super) fn remove_cc(headers: &mut Headers) {
    headers.remove(CC);
}

fn keys_of(headers: &Headers, name: &str) -> Result<Vec<String>, TransportError> {
    match headers.get(name) {
        None => Ok(Vec::new()),
        Some(HeaderValue::Array(values)) => {
            Ok(values.iter().filter_map(HeaderValue::as_str).map(str::to_owned).collect())
        }
        Some(other) => Err(TransportError::PreconditionFailed(format!(
            "invalid message: {{unacceptable_type_in_header,\"{name}\",{}}}",
            type_name(other)
        ))),
    }
}
