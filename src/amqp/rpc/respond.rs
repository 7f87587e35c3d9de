//! Replying to an RPC request, then acking it: what every RPC server does once a request's
//! outcome is known, whatever its wire format.

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

use crate::amqp::rpc::naming::UFW_RPC_EXCHANGE;
use crate::config::{Config, Protocol};
use crate::data::{json_properties, Failure, Handled, Message};
use crate::pipeline::RouteHandle;
use crate::transport::limits::check_size;
use crate::transport::{Acker, OutgoingMessage, PublishOptions, TransportError};

/// How long a request whose reply could not be sent waits before going back to its queue.
const REQUEUE_PAUSE: Duration = Duration::from_secs(1);

/// What to reply for how the route handled a request. RPC replies at once: a broker-side
/// retry (`AsyncBackOff`) is not scheduled, its failure is replied.
pub(crate) fn handled_outcome(handled: &Handled) -> Result<Value, &Failure> {
    match handled {
        Handled::Succeeded(value) => Ok(value.clone()),
        Handled::CalledBack(failure)
        | Handled::Failed(failure)
        | Handled::Retry { failure, .. } => Err(failure),
    }
}

/// Whether the reply to `result` under `protocol` (the config's when `None`) fits in
/// `MAX_MESSAGE_SIZE`, else why not. Most results are far below the limit: their reply is
/// written only when a bound of its size, which walks the value without writing it, is over.
pub(crate) fn reply_fits(
    result: &Value,
    protocol: Option<Protocol>,
    config: &Config,
) -> Result<(), String> {
    let max_size = config.max_message_size;
    // a reply frame's bytes again as a JSON string (micro-framework's wire), each at most
    // two bytes there; the frame's own keys and quotes in the 64
    if json_size_bound(result).saturating_add(64).saturating_mul(2) <= max_size {
        return Ok(());
    }
    let size = match protocol.unwrap_or(config.protocol) {
        Protocol::Nameko => crate::data::nameko_wire::reply_body(&Ok(result.clone())).len(),
        Protocol::MicroFramework => crate::data::ufw_wire::reply_body(&Ok(result.clone())).len(),
    };
    match size > max_size {
        true => Err(format!("result of {size} bytes exceeds MAX_MESSAGE_SIZE ({max_size} bytes)")),
        false => Ok(()),
    }
}

/// At least as many bytes as `value` takes in JSON: a string's character at most six
/// (`\u001f`), a number at most 24.
fn json_size_bound(value: &Value) -> usize {
    let items = |count: usize| count.saturating_add(2);
    match value {
        Value::Null | Value::Bool(_) => 5,
        Value::Number(_) => 24,
        Value::String(text) => text.len().saturating_mul(6).saturating_add(2),
        Value::Array(values) => {
            values.iter().map(json_size_bound).fold(items(values.len()), usize::saturating_add)
        }
        Value::Object(entries) => entries
            .iter()
            .map(|(key, value)| {
                key.len().saturating_mul(6).saturating_add(3).saturating_add(json_size_bound(value))
            })
            .fold(items(entries.len()), usize::saturating_add),
    }
}

/// `body` if it is within `MAX_MESSAGE_SIZE`; else the error reply `too_large` makes from
/// the reason.
pub(crate) fn within_size_limit(
    route: &RouteHandle,
    body: Bytes,
    too_large: impl FnOnce(String) -> Bytes,
) -> Bytes {
    let max_size = route.config().max_message_size;
    match check_size("RPC reply", body.len(), max_size) {
        Ok(()) => body,
        Err(refused) => {
            tracing::warn!(route = route.name(), "{refused}: replying an error instead");
            too_large(format!(
                "result of {} bytes exceeds MAX_MESSAGE_SIZE ({max_size} bytes)",
                body.len()
            ))
        }
    }
}

/// Publish `body` (confirmed) to the RPC exchange of `protocol` with the request's `reply_to`
/// as routing key and its correlation id, then ack the request. A request without `reply_to`
/// (or under micro-framework's protocol, without a correlation id, as its Python server
/// answers only a request with both) is acked without a reply. A reply that fails for good is not sent (the request is acked: requeued, it would
/// come back for ever); one that may succeed later sends the request back to its queue after
/// a pause.
pub(crate) async fn reply_then_ack(
    route: &RouteHandle,
    request: &Message,
    acker: Box<dyn Acker>,
    protocol: Protocol,
    body: Bytes,
) {
    let settled = match reply(route, request, protocol, body).await {
        Ok(()) => acker.ack().await,
        Err(error) if error.is_permanent() => {
            tracing::error!(
                route = route.name(),
                "cannot reply to an RPC request ({error}); acked without a reply"
            );
            acker.ack().await
        }
        Err(error) => {
            tracing::error!(
                route = route.name(),
                "cannot reply to an RPC request ({error}); it goes back to the queue"
            );
            tokio::time::sleep(REQUEUE_PAUSE).await;
            acker.nack(true).await
        }
    };
    if let Err(error) = settled {
        tracing::warn!(route = route.name(), "cannot settle an RPC request ({error})");
    }
}

async fn reply(
    route: &RouteHandle,
    request: &Message,
    protocol: Protocol,
    body: Bytes,
) -> Result<(), TransportError> {
    let correlation_id = &request.properties.correlation_id;
    let (exchange, address) = match protocol {
        Protocol::Nameko => (&route.config().rpc_exchange[..], "reply_to"),
        Protocol::MicroFramework => (UFW_RPC_EXCHANGE, "reply_to and correlation_id"),
    };
    // the Python server tests both for truth: an empty one is none
    let given = |property: &Option<String>| property.as_deref().is_some_and(|p| !p.is_empty());
    let answered = protocol == Protocol::Nameko
        || (given(&request.properties.reply_to) && given(correlation_id));
    let reply_to = request.properties.reply_to.as_deref();
    let Some(reply_to) = reply_to.filter(|_| answered) else {
        tracing::info!(
            route = route.name(),
            "RPC request {} without {address}: handled, no reply sent",
            request.routing_key
        );
        return Ok(());
    };
    let mut properties = json_properties();
    properties.correlation_id = correlation_id.clone();
    if protocol == Protocol::Nameko {
        // Transient: RabbitMQ confirms a persistent message routed to a durable queue (every
        // Nameko reply queue, this framework's too) only once it is on disk or acked, which
        // cost the broker more CPU than the rest of the call and held the request's ack until
        // the caller acked the reply. A reply lost with a broker restart ends its call in a
        // timeout, as the call would while the broker is down.
        properties.delivery_mode = Some(1);
    }
    let message = OutgoingMessage { body, properties };
    route.transport().publish(exchange, reply_to, message, PublishOptions::default()).await
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The size of the reply to `result` under `protocol`.
    fn reply_size(result: &Value, protocol: Protocol) -> usize {
        match protocol {
            Protocol::Nameko => crate::data::nameko_wire::reply_body(&Ok(result.clone())).len(),
            Protocol::MicroFramework => {
                crate::data::ufw_wire::reply_body(&Ok(result.clone())).len()
            }
        }
    }

    /// A result fits when its reply does, to the byte, under each wire format, whatever its
    /// characters cost once escaped (once, or twice in micro-framework's string).
    #[test]
    fn a_result_fits_exactly_when_its_reply_does() {
        let max_size = 1024;
        for protocol in [Protocol::Nameko, Protocol::MicroFramework] {
            let config = Config::new("s").with_max_message_size(max_size).with_protocol(protocol);
            for piece in ["y", "\"", "\u{1}", "é", "\\"] {
                let result = |count: usize| json!({ "key\u{2}": [1.5e300, piece.repeat(count)] });
                let largest =
                    (0..max_size).take_while(|&n| reply_size(&result(n), protocol) <= max_size);
                let largest = largest.last().expect("an empty result fits");
                assert_eq!(reply_fits(&result(largest), None, &config), Ok(()));
                let over = reply_size(&result(largest + 1), protocol);
                let refused = reply_fits(&result(largest + 1), None, &config);
                let reason =
                    format!("result of {over} bytes exceeds MAX_MESSAGE_SIZE (1024 bytes)");
                assert_eq!(refused, Err(reason), "{protocol:?} {piece:?}");
            }
        }
    }

    /// The bound that skips writing a reply is never below what the value takes in JSON.
    #[test]
    fn the_size_bound_is_never_below_the_json() {
        let values = [
            json!(null),
            json!(true),
            json!(-1.2345678901234567e-308),
            json!(i64::MIN),
            json!(u64::MAX),
            json!("\u{0}\u{1f}\"\\é"),
            json!({ "\u{1}\"": [[], {}, [null, false, "x"]] }),
        ];
        for value in values {
            let written = serde_json::to_vec(&value).unwrap().len();
            assert!(json_size_bound(&value) >= written, "{value}");
        }
    }
}
