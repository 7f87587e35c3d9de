//! The `rabbitmq_delayed_message_exchange` plugin, for a broker that enables it
//! (`memory://NAME?plugins=rabbitmq_delayed_message_exchange`).
//!
//! An exchange of type `x-delayed-message` routes like its `x-delayed-type`, except that a
//! message with an `x-delay` header of 1 to 4294967295 ms is held that long first, then routed
//! with `x-delay` negated (so it is not held again). As on RabbitMQ, a held message reaches no
//! queue when it is published: a mandatory publish is returned as unroutable although the
//! message is delivered later, and an alternate exchange gets a copy at once. When it is due,
//! a message whose exchange is gone is dropped.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::transport::{ExchangeKind, ExchangeSpec, HeaderValue, Headers, TransportError};

use super::queue::Message;
use super::routing::normalize_kind;

/// The plugin's name, as `rabbitmq-plugins enable` takes it.
pub(super) const PLUGIN: &str = "rabbitmq_delayed_message_exchange";
/// The exchange type the plugin adds.
pub(super) const EXCHANGE_TYPE: &str = "x-delayed-message";
/// The header holding the delay, in milliseconds.
const DELAY_HEADER: &str = "x-delay";
/// The longest delay the plugin holds (Erlang's longest timer); longer ones route at once.
const MAX_DELAY_MS: i64 = 4_294_967_295;

/// The kind a delayed exchange routes like: its `x-delayed-type`, an existing exchange type
/// (errors as the plugin's validation words them).
pub(super) fn delayed_type(spec: &ExchangeSpec) -> Result<ExchangeKind, TransportError> {
    match spec.arguments.get("x-delayed-type") {
        Some(HeaderValue::String(kind)) if kind == EXCHANGE_TYPE => {
            Err(TransportError::PreconditionFailed(format!(
                "Invalid argument, 'x-delayed-type' can't be '{EXCHANGE_TYPE}'"
            )))
        }
        Some(HeaderValue::String(kind)) => normalize_kind(&ExchangeKind::Custom(kind.clone())),
        _ => Err(TransportError::PreconditionFailed(
            "Invalid argument, 'x-delayed-type' must be an existing exchange type".to_owned(),
        )),
    }
}

/// How long the plugin holds a message with these headers, read as the plugin reads
/// `x-delay`: an integer, a float (truncated) or a string of digits. `None`: routed at once
/// (no such header, another type, or a delay outside 1..=4294967295 ms). A string that is
/// not an integer fails the publish, as it crashes the plugin's routing.
pub(super) fn delay(headers: &Headers) -> Result<Option<Duration>, TransportError> {
    let millis = match headers.get(DELAY_HEADER) {
        Some(HeaderValue::Int(millis)) => *millis,
        Some(HeaderValue::Float(millis)) if millis.is_finite() => millis.trunc() as i64,
        Some(HeaderValue::String(text)) => text.parse().map_err(|_| TransportError::Broker {
            code: 541,
            text: format!("INTERNAL_ERROR - x-delay '{text}' is not an integer"),
        })?,
        _ => return Ok(None),
    };
    Ok((1..=MAX_DELAY_MS).contains(&millis).then(|| Duration::from_millis(millis.unsigned_abs())))
}

/// A message held by a delayed exchange until it is due.
#[derive(Debug)]
pub(super) struct Held {
    /// The delayed exchange holding it (the one it was published to, or an alternate).
    pub by: String,
    /// The message, as it was published.
    pub message: Message,
    /// How long it was held.
    pub delay: Duration,
}

impl Held {
    /// The message as it is routed when due: `x-delay` negated, as the plugin marks it.
    pub fn released(mut self) -> Message {
        let millis = i64::try_from(self.delay.as_millis()).unwrap_or(MAX_DELAY_MS);
        self.message.properties.headers.insert(DELAY_HEADER.to_owned(), HeaderValue::Int(-millis));
        self.message
    }
}

/// The messages held by the broker's delayed exchanges, in the order they fall due (then in
/// the order they were published).
#[derive(Debug, Default)]
pub(super) struct HeldMessages {
    by_due: BTreeMap<(Instant, u64), Held>,
    bytes: u64,
}

impl HeldMessages {
    /// Hold `held` until `due`; `seq` orders messages due at the same instant.
    pub fn hold(&mut self, due: Instant, seq: u64, held: Held) {
        self.bytes += held.message.body.len() as u64;
        self.by_due.insert((due, seq), held);
    }

    /// When the next message falls due.
    pub fn next_due(&self) -> Option<Instant> {
        self.by_due.keys().next().map(|(due, _)| *due)
    }

    /// Take the messages due at `now`, earliest first.
    pub fn take_due(&mut self, now: Instant) -> Vec<Held> {
        let later = self.by_due.split_off(&(now, u64::MAX));
        let due = std::mem::replace(&mut self.by_due, later);
        let due: Vec<Held> = due.into_values().collect();
        self.bytes -= due.iter().map(|held| held.message.body.len() as u64).sum::<u64>();
        due
    }

    /// How many messages are held.
    pub fn len(&self) -> usize {
        self.by_due.len()
    }

    /// The size of their bodies.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_delay(value: HeaderValue) -> Headers {
        Headers::from([(DELAY_HEADER.to_owned(), value)])
    }

    #[test]
    fn reads_x_delay_as_the_plugin_does() {
        let ms = |millis| Ok(Some(Duration::from_millis(millis)));
        assert_eq!(delay(&with_delay(HeaderValue::Int(1500))), ms(1500));
        assert_eq!(delay(&with_delay(HeaderValue::Float(20.9))), ms(20));
        assert_eq!(delay(&with_delay(HeaderValue::from("35"))), ms(35));
        assert_eq!(delay(&with_delay(HeaderValue::Int(MAX_DELAY_MS))), ms(4_294_967_295));
        for at_once in [
            HeaderValue::Int(0),
            HeaderValue::Int(-1500),
            HeaderValue::Int(MAX_DELAY_MS + 1),
            HeaderValue::Bool(true),
            HeaderValue::Timestamp(10),
            HeaderValue::Float(f64::NAN),
        ] {
            assert_eq!(delay(&with_delay(at_once.clone())), Ok(None), "{at_once:?}");
        }
        assert_eq!(delay(&Headers::new()), Ok(None));
        let error = delay(&with_delay(HeaderValue::from("soon"))).unwrap_err();
        assert!(error.to_string().contains("x-delay 'soon' is not an integer"), "{error}");
    }

    #[test]
    fn checks_the_delayed_type() {
        let spec = |kind: Option<HeaderValue>| ExchangeSpec {
            kind: ExchangeKind::Custom(EXCHANGE_TYPE.into()),
            arguments: kind
                .map(|kind| Headers::from([("x-delayed-type".into(), kind)]))
                .unwrap_or_default(),
            ..ExchangeSpec::topic("d")
        };
        assert_eq!(delayed_type(&spec(Some("topic".into()))), Ok(ExchangeKind::Topic));
        let missing = delayed_type(&spec(None)).unwrap_err();
        assert!(missing.to_string().contains("must be an existing exchange type"), "{missing}");
        let number = delayed_type(&spec(Some(HeaderValue::Int(1)))).unwrap_err();
        assert!(number.to_string().contains("must be an existing exchange type"), "{number}");
        let unknown = delayed_type(&spec(Some("nope".into()))).unwrap_err();
        assert!(unknown.to_string().contains("unknown exchange type 'nope'"), "{unknown}");
        let itself = delayed_type(&spec(Some(EXCHANGE_TYPE.into()))).unwrap_err();
        assert!(itself.to_string().contains("can't be 'x-delayed-message'"), "{itself}");
    }

    #[test]
    fn releases_in_due_order_and_marks_the_delay() {
        let start = Instant::now();
        let mut held = HeldMessages::default();
        let message = |body: &'static str| Message {
            exchange: "d".into(),
            routing_key: "k".into(),
            header_routes: Vec::new(),
            body: body.into(),
            properties: Default::default(),
        };
        let at = |ms| start + Duration::from_millis(ms);
        let held_for = |body, ms| Held {
            by: "d".into(),
            message: message(body),
            delay: Duration::from_millis(ms),
        };
        held.hold(at(30), 1, held_for("late", 30));
        held.hold(at(10), 2, held_for("early", 10));
        held.hold(at(10), 3, held_for("next", 10));
        assert_eq!((held.len(), held.bytes(), held.next_due()), (3, 13, Some(at(10))));
        assert!(held.take_due(at(9)).is_empty());
        let due: Vec<Message> = held.take_due(at(10)).into_iter().map(Held::released).collect();
        let bodies: Vec<&[u8]> = due.iter().map(|message| &message.body[..]).collect();
        assert_eq!(bodies, [&b"early"[..], b"next"]);
        assert_eq!(due[0].properties.headers.get(DELAY_HEADER), Some(&HeaderValue::Int(-10)));
        assert_eq!((held.len(), held.bytes(), held.next_due()), (1, 4, Some(at(30))));
    }
}
