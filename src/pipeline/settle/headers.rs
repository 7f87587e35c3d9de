//! The headers settling writes and reads: the `x-mf-*` headers of dead letters and copies,
//! the failure a copy given back carries to its dead letter, and the headers a copy must not
//! carry on (`CC`, `BCC`, malformed `x-death` entries).

use crate::data::Failure;
use crate::transport::{HeaderValue, Headers};

/// Header: the route that failed.
pub const HEADER_ROUTE: &str = "x-mf-route";
/// Header: the failure kind (`bad_input`, `error`, `panic`, ...).
pub const HEADER_ERROR_KIND: &str = "x-mf-error-kind";
/// Header: the error message with its causes.
pub const HEADER_ERROR: &str = "x-mf-error";
/// Header: the Rust type of the error, when known.
pub const HEADER_ERROR_TYPE: &str = "x-mf-error-type";
/// Header: when the message was dead-lettered (seconds since the epoch).
pub const HEADER_FAILED_AT: &str = "x-mf-failed-at";
/// Header: how many attempts were made (1 + retries).
pub const HEADER_ATTEMPTS: &str = "x-mf-attempts";
/// Header: the queue the message came from.
pub const HEADER_ORIGINAL_QUEUE: &str = "x-mf-original-queue";
/// Header: the exchange the message was published to.
pub const HEADER_ORIGINAL_EXCHANGE: &str = "x-mf-original-exchange";
/// Header: the routing key the message was published with.
pub const HEADER_ORIGINAL_ROUTING_KEY: &str = "x-mf-original-routing-key";

/// Header of a copy: the `user_id` property of the message copied (a copy cannot carry it:
/// RabbitMQ accepts it only from the user it names). Any publisher can set a header, so,
/// unlike the property, it proves nothing.
pub const HEADER_ORIGINAL_USER_ID: &str = "x-mf-original-user-id";
/// Header of a copy: the `CC` header of the message copied, RabbitMQ's list of further routing
/// keys (kept in the message it delivers), which would route the copy to them again.
pub const HEADER_ORIGINAL_CC: &str = "x-mf-original-cc";
/// Header of a dead letter whose original headers did not fit in a frame beside the
/// dead-letter headers: how many were dropped, and how big they made the frame.
pub const HEADER_HEADERS_DROPPED: &str = "x-mf-headers-dropped";

/// Header of a copy given back because its dead letter could not be published: the failure
/// (JSON) it is dead-lettered with when it comes back, without running again.
pub(crate) const HEADER_PENDING_DEAD_LETTER: &str = "x-mf-dead-letter-pending";

/// Write into `headers` (a copy's, given back because its dead letter could not be published)
/// the `failure` it is to be dead-lettered with when it comes back
/// ([`take_pending_dead_letter`]).
pub(super) fn mark_pending_dead_letter(headers: &mut Headers, failure: &Failure) {
    // A failure is plain data: it always serializes.
    if let Ok(json) = serde_json::to_string(failure) {
        headers.insert(HEADER_PENDING_DEAD_LETTER.into(), json.into());
    }
}

/// The failure a delivery with these `headers` is to be dead-lettered with, without running,
/// when it is a copy given back because its dead letter could not be published
/// ([`HEADER_PENDING_DEAD_LETTER`], removed: its dead letter does not carry it).
pub(crate) fn take_pending_dead_letter(headers: &mut Headers) -> Option<Failure> {
    let pending = headers.remove(HEADER_PENDING_DEAD_LETTER)?;
    pending.as_str().and_then(|json| serde_json::from_str(json).ok())
}

/// Keep in `headers` only the `x-death` entries shaped as RabbitMQ writes them. Any publisher
/// can set `x-death`, and RabbitMQ reads it when it dead-letters the message (a retry copy
/// leaving its delay queue): an entry that is no table, or a field of the wrong type, crashes
/// the queue there, and every message waiting in it is lost.
pub(super) fn keep_well_formed_deaths(headers: &mut Headers) {
    let Some(HeaderValue::Array(deaths)) = headers.remove("x-death") else { return };
    let kept: Vec<HeaderValue> = deaths.into_iter().filter(is_well_formed_death).collect();
    if !kept.is_empty() {
        headers.insert("x-death".into(), HeaderValue::Array(kept));
    }
}

/// An `x-death` entry with a `queue` and a `reason`, and each field RabbitMQ writes of the
/// type it writes it with (others are left as they are: RabbitMQ does not read them).
fn is_well_formed_death(death: &HeaderValue) -> bool {
    let HeaderValue::Table(fields) = death else { return false };
    let named = |key: &str| matches!(fields.get(key), Some(HeaderValue::String(_)));
    let typed = |(key, value): (&String, &HeaderValue)| match (key.as_str(), value) {
        ("queue" | "reason" | "exchange" | "original-expiration", value) => {
            matches!(value, HeaderValue::String(_))
        }
        ("count", value) => matches!(value, HeaderValue::Int(count) if *count >= 0),
        ("time", value) => matches!(value, HeaderValue::Timestamp(_)),
        ("routing-keys", HeaderValue::Array(keys)) => {
            keys.iter().all(|key| matches!(key, HeaderValue::String(_)))
        }
        ("routing-keys", _) => false,
        _ => true,
    };
    named("queue") && named("reason") && fields.iter().all(typed)
}

/// Remove RabbitMQ's routing headers from the `headers` of a copy of a message: `CC`, moved to
/// [`HEADER_ORIGINAL_CC`], and `BCC` (which RabbitMQ delivers to no one). RabbitMQ routes a
/// publish to each key they list too: a copy carrying them would reach those queues again,
/// which had the original already.
///
/// ```
/// use micro_framework::settle::{set_aside_routing_headers, HEADER_ORIGINAL_CC};
/// use micro_framework::{HeaderValue, Headers};
///
/// let jobs2 = HeaderValue::Array(vec!["jobs2".into()]);
/// let mut headers = Headers::from([("CC".to_owned(), jobs2.clone())]);
/// set_aside_routing_headers(&mut headers);
/// assert_eq!(headers, Headers::from([(HEADER_ORIGINAL_CC.to_owned(), jobs2)]));
/// ```
#[doc(hidden)] // for the workspace's CLI, not an API of its own
pub fn set_aside_routing_headers(headers: &mut Headers) {
    if let Some(cc) = headers.remove("CC") {
        headers.insert(HEADER_ORIGINAL_CC.into(), cc);
    }
    headers.remove("BCC");
}
