//! Queue arguments (`x-message-ttl`, `x-dead-letter-exchange`, ...): parsing, validation and
//! the equivalence check of re-declarations, with RabbitMQ's error texts.

use std::time::Duration;

use crate::transport::{HeaderValue, QueueSpec, TransportError};

/// What a full queue does with a new message (`x-overflow`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Overflow {
    /// Drop (dead-letter) the oldest ready message.
    DropHead,
    /// Refuse the new message (publisher nack).
    RejectPublish,
    /// Refuse and dead-letter the new message.
    RejectPublishDlx,
}

/// The queue arguments the broker acts on.
#[derive(Clone, Debug)]
pub(super) struct QueueArgs {
    /// `x-message-ttl`.
    pub message_ttl: Option<Duration>,
    /// `x-expires`.
    pub expires: Option<Duration>,
    /// `x-dead-letter-exchange`.
    pub dead_letter_exchange: Option<String>,
    /// `x-dead-letter-routing-key`.
    pub dead_letter_routing_key: Option<String>,
    /// `x-max-length`.
    pub max_length: Option<u64>,
    /// `x-max-length-bytes`.
    pub max_length_bytes: Option<u64>,
    /// `x-overflow`.
    pub overflow: Overflow,
    /// `x-queue-type` is `quorum`.
    pub quorum: bool,
    /// `x-delivery-limit` (quorum queues).
    pub delivery_limit: Option<u64>,
    /// `x-single-active-consumer`.
    pub single_active_consumer: bool,
}

/// Arguments compared on re-declaration, as RabbitMQ does.
const EQUIVALENCE_ARGS: &[&str] = &[
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-delivery-limit",
    "x-expires",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-message-ttl",
    "x-overflow",
    "x-queue-mode",
    "x-queue-type",
    "x-queue-version",
    "x-single-active-consumer",
];

/// Arguments a classic queue refuses: RabbitMQ 3.10 checks each queue type's arguments, so
/// these (of quorum queues and streams) fail the declaration instead of being ignored.
const NOT_FOR_CLASSIC: &[&str] = &[
    "x-dead-letter-strategy",
    "x-delivery-limit",
    "x-initial-cluster-size",
    "x-max-age",
    "x-max-in-memory-bytes",
    "x-max-in-memory-length",
    "x-queue-leader-locator",
    "x-quorum-initial-group-size",
    "x-stream-max-segment-size-bytes",
];

/// Arguments a quorum queue refuses (of classic queues and streams).
const NOT_FOR_QUORUM: &[&str] = &[
    "x-initial-cluster-size",
    "x-max-age",
    "x-max-priority",
    "x-queue-master-locator",
    "x-queue-mode",
    "x-queue-version",
    "x-stream-max-segment-size-bytes",
];

/// `queue 'name' in vhost '/'`, as RabbitMQ names resources in errors.
pub(super) fn queue_resource(name: &str) -> String {
    format!("queue '{name}' in vhost '/'")
}

fn invalid_arg(queue: &str, arg: &str, why: &str) -> TransportError {
    TransportError::PreconditionFailed(format!(
        "invalid arg '{arg}' for {}: {why}",
        queue_resource(queue)
    ))
}

fn int_arg(spec: &QueueSpec, arg: &str, min: i64) -> Result<Option<u64>, TransportError> {
    match spec.arguments.get(arg) {
        None => Ok(None),
        Some(HeaderValue::Int(value)) if *value >= min => Ok(u64::try_from(*value).ok()),
        Some(HeaderValue::Int(value)) => {
            Err(invalid_arg(&spec.name, arg, &format!("value {value} is below {min}")))
        }
        Some(other) => {
            Err(invalid_arg(&spec.name, arg, &format!("unacceptable type {}", type_name(other))))
        }
    }
}

/// The longest TTL or expiry RabbitMQ accepts (ten years, in milliseconds).
pub(super) const MAX_EXPIRY_MS: u64 = 315_360_000_000;

/// An `int_arg` in milliseconds that RabbitMQ caps at [`MAX_EXPIRY_MS`].
fn expiry_arg(spec: &QueueSpec, arg: &str, min: i64) -> Result<Option<Duration>, TransportError> {
    match int_arg(spec, arg, min)? {
        Some(value) if value > MAX_EXPIRY_MS => {
            Err(invalid_arg(&spec.name, arg, &format!("{{value_too_large,{value}}}")))
        }
        value => Ok(value.map(Duration::from_millis)),
    }
}

fn string_arg(spec: &QueueSpec, arg: &str) -> Result<Option<String>, TransportError> {
    match spec.arguments.get(arg) {
        None => Ok(None),
        Some(HeaderValue::String(value)) => Ok(Some(value.clone())),
        Some(other) => {
            Err(invalid_arg(&spec.name, arg, &format!("unacceptable type {}", type_name(other))))
        }
    }
}

/// The AMQP type name RabbitMQ prints for a field value.
pub(super) fn type_name(value: &HeaderValue) -> &'static str {
    match value {
        HeaderValue::Void => "void",
        HeaderValue::Bool(_) => "bool",
        HeaderValue::Int(_) => "long",
        HeaderValue::Float(_) => "double",
        HeaderValue::Decimal { .. } => "decimal",
        HeaderValue::String(_) => "longstr",
        HeaderValue::Bytes(_) => "bytes",
        HeaderValue::Timestamp(_) => "timestamp",
        HeaderValue::Array(_) => "array",
        HeaderValue::Table(_) => "table",
    }
}

/// A field value as RabbitMQ prints it in an inequivalence error.
pub(super) fn describe_value(value: Option<&HeaderValue>) -> String {
    match value {
        None => "none".to_owned(),
        Some(value) => {
            let shown = match value {
                HeaderValue::String(s) => s.clone(),
                HeaderValue::Int(i) => i.to_string(),
                HeaderValue::Bool(b) => b.to_string(),
                other => format!("{other:?}"),
            };
            format!("the value '{shown}' of type '{}'", type_name(value))
        }
    }
}

impl QueueArgs {
    /// Parses and validates the arguments of a queue declaration.
    pub fn parse(spec: &QueueSpec) -> Result<Self, TransportError> {
        let quorum = match string_arg(spec, "x-queue-type")?.as_deref() {
            None | Some("classic") => false,
            Some("quorum") => true,
            Some("stream") => {
                return Err(TransportError::Unsupported(
                    "queue type 'stream' is not supported by the in-memory broker".to_owned(),
                ))
            }
            // RabbitMQ 3.10 refuses an unknown type as an invalid argument
            Some(other) => {
                return Err(invalid_arg(
                    &spec.name,
                    "x-queue-type",
                    &format!("unsupported queue type '{other}'"),
                ))
            }
        };
        match string_arg(spec, "x-queue-mode")?.as_deref() {
            None | Some("default" | "lazy") => {}
            Some(other) => {
                return Err(invalid_arg(
                    &spec.name,
                    "x-queue-mode",
                    &format!("unknown value '{other}'"),
                ))
            }
        }
        if let Some(version) = int_arg(spec, "x-queue-version", 1)? {
            if version > 2 {
                let reason = format!("value {version} is not 1 or 2");
                return Err(invalid_arg(&spec.name, "x-queue-version", &reason));
            }
        }
        let (refused, queue_type) = match quorum {
            true => (NOT_FOR_QUORUM, "rabbit_quorum_queue"),
            false => (NOT_FOR_CLASSIC, "rabbit_classic_queue"),
        };
        if let Some(arg) = refused.iter().find(|arg| spec.arguments.contains_key(**arg)) {
            return Err(TransportError::PreconditionFailed(format!(
                "invalid arg '{arg}' for {} of queue type {queue_type}",
                queue_resource(&spec.name)
            )));
        }
        if spec.arguments.contains_key("x-max-priority") {
            return Err(TransportError::Unsupported(
                "x-max-priority (priority queues) is not supported by the in-memory broker"
                    .to_owned(),
            ));
        }
        let overflow = match string_arg(spec, "x-overflow")?.as_deref() {
            None | Some("drop-head") => Overflow::DropHead,
            Some("reject-publish") => Overflow::RejectPublish,
            // a quorum queue of RabbitMQ 3.10 takes it as drop-head (with a warning in its log)
            Some("reject-publish-dlx") if quorum => Overflow::DropHead,
            Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
            Some(other) => {
                return Err(invalid_arg(
                    &spec.name,
                    "x-overflow",
                    &format!("unknown value '{other}'"),
                ))
            }
        };
        let dead_letter_exchange = string_arg(spec, "x-dead-letter-exchange")?;
        let dead_letter_routing_key = string_arg(spec, "x-dead-letter-routing-key")?;
        if dead_letter_routing_key.is_some() && dead_letter_exchange.is_none() {
            return Err(invalid_arg(
                &spec.name,
                "x-dead-letter-routing-key",
                "routing_key_but_no_dlx_defined",
            ));
        }
        let single_active_consumer = match spec.arguments.get("x-single-active-consumer") {
            None => false,
            Some(HeaderValue::Bool(value)) => *value,
            Some(other) => {
                return Err(invalid_arg(
                    &spec.name,
                    "x-single-active-consumer",
                    &format!("unacceptable type {}", type_name(other)),
                ))
            }
        };
        if quorum {
            let refused = if !spec.durable {
                Some("non-durable")
            } else if spec.exclusive {
                Some("exclusive")
            } else if spec.auto_delete {
                Some("auto-delete")
            } else {
                None
            };
            if let Some(property) = refused {
                return Err(TransportError::PreconditionFailed(format!(
                    "invalid property '{property}' for {}",
                    queue_resource(&spec.name)
                )));
            }
        }
        Ok(QueueArgs {
            message_ttl: expiry_arg(spec, "x-message-ttl", 0)?,
            expires: expiry_arg(spec, "x-expires", 1)?,
            dead_letter_exchange,
            dead_letter_routing_key,
            max_length: int_arg(spec, "x-max-length", 0)?,
            max_length_bytes: int_arg(spec, "x-max-length-bytes", 0)?,
            overflow,
            quorum,
            // RabbitMQ 3.10 takes a negative limit as 0 (the first hand-back drops)
            delivery_limit: int_arg(spec, "x-delivery-limit", i64::MIN)?
                .or_else(|| spec.arguments.get("x-delivery-limit").map(|_| 0)),
            single_active_consumer,
        })
    }
}

/// Checks a re-declaration against the existing declaration (flags, then arguments),
/// with RabbitMQ's error texts. Exclusivity is checked by the caller (`RESOURCE_LOCKED`).
pub(super) fn check_equivalence(
    current: &QueueSpec,
    requested: &QueueSpec,
) -> Result<(), TransportError> {
    let resource = queue_resource(&current.name);
    for (field, now, asked) in [
        ("durable", current.durable, requested.durable),
        ("auto_delete", current.auto_delete, requested.auto_delete),
    ] {
        if now != asked {
            return Err(TransportError::PreconditionFailed(format!(
                "inequivalent arg '{field}' for {resource}: received '{asked}' but current is '{now}'"
            )));
        }
    }
    for arg in EQUIVALENCE_ARGS {
        let mut now = current.arguments.get(*arg);
        let mut asked = requested.arguments.get(*arg);
        if *arg == "x-queue-type" {
            let classic = |value: Option<&HeaderValue>| {
                value.is_none_or(|value| value.as_str() == Some("classic"))
            };
            if classic(now) && classic(asked) {
                (now, asked) = (None, None);
            }
        }
        if now != asked {
            return Err(TransportError::PreconditionFailed(format!(
                "inequivalent arg '{arg}' for {resource}: received {} but current is {}",
                describe_value(asked),
                describe_value(now)
            )));
        }
    }
    Ok(())
}
