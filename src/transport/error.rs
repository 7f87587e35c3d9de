//! [`TransportError`]: what a transport operation can fail with, and whether trying again
//! can help.

use serde::{Deserialize, Serialize};

/// Errors of the transport layer.
///
/// The variant says what happened; the message it carries is for people (credentials
/// masked). Use [`TransportError::is_permanent`] to decide whether trying again can help.
/// The framework reads a broker's reply text only where RabbitMQ gives one reply code to
/// several causes, in RabbitMQ's own words (which the in-process broker uses too): `530`
/// for a connection limit reached, `404` for a queue whose node is down, `406` for a
/// declaration's inequivalent arguments, `503` for an unknown exchange type.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum TransportError {
    /// The broker cannot be reached: the name does not resolve, the TCP connection is refused
    /// or fails, the connection attempt times out, or the connection is down and did not come
    /// back in time. Trying again can help.
    #[error("broker connection error: {0}")]
    Unreachable(String),
    /// The broker refused the login: wrong user name or password (`403 ACCESS_REFUSED` when
    /// the connection opens), or the authentication mechanism failed. Permanent.
    #[error("broker connection error: {0}")]
    Authentication(String),
    /// TLS failed: the broker's certificate was refused (unknown issuer, wrong name, expired),
    /// the broker refused ours (a TLS alert, e.g. no client certificate), or the CA,
    /// certificate or key files cannot be read or are not valid PEM. Permanent.
    #[error("broker connection error: {0}")]
    Tls(String),
    /// The broker URI cannot be used (syntax, scheme, option; password masked). Permanent.
    #[error("broker connection error: {0}")]
    InvalidUri(String),
    /// The connection failed while in use (I/O error, missed heartbeats, the broker closed it
    /// with `320 CONNECTION_FORCED`). The RabbitMQ transport reconnects by itself; trying
    /// again can help.
    #[error("broker connection error: {0}")]
    ConnectionLost(String),
    /// The broker did not answer in time (publish timeout): the connection may be blocked
    /// by a resource alarm or the broker overloaded. Whether a publish reached the broker is
    /// unknown. Trying again can help.
    #[error("timed out: {0}")]
    TimedOut(String),
    /// Something was closed and will not come back: the transport (closed by the
    /// application), the channel a delivery came on (it cannot be settled any more), or a
    /// consumer.
    #[error("closed: {reason}")]
    Closed {
        /// What was closed.
        what: ClosedPart,
        /// What happened.
        reason: String,
    },
    /// The broker refused an operation to this user or on this resource
    /// (`403 ACCESS_REFUSED`: no permission, the default exchange, a reserved `amq.` name).
    #[error("access refused: {0}")]
    AccessRefused(String),
    /// The broker refused a declaration whose arguments differ from the existing entity, or
    /// an invalid argument (`406 PRECONDITION_FAILED`).
    #[error("precondition failed: {0}")]
    PreconditionFailed(String),
    /// An exchange or queue does not exist (`404 NOT_FOUND`).
    #[error("not found: {0}")]
    NotFound(String),
    /// The queue is used exclusively by another connection or consumer (`405 RESOURCE_LOCKED`,
    /// or a `basic.consume` refused with `403` because the queue is in exclusive use).
    #[error("resource locked: {0}")]
    ResourceLocked(String),
    /// A mandatory message reached no queue (`basic.return`).
    #[error("message to exchange '{exchange}' with routing key '{routing_key}' reached no queue")]
    Unroutable {
        /// The exchange published to.
        exchange: String,
        /// The routing key used.
        routing_key: String,
    },
    /// The broker negatively acknowledged a publish.
    #[error("broker refused the message (publisher nack)")]
    Nacked,
    /// A limit was reached; nothing was sent.
    #[error("limit reached: {reason}")]
    LimitReached {
        /// Which limit.
        what: Limit,
        /// What the operation would have reached, in the limit's [unit](Limit::unit).
        size: u64,
        /// The limit, in the same unit.
        limit: u64,
        /// What was refused, for people.
        reason: String,
    },
    /// Another reply of the broker, with its AMQP reply code (e.g. `503 COMMAND_INVALID`,
    /// `530 NOT_ALLOWED`, `541 INTERNAL_ERROR`).
    #[error("broker error: {code} {text}")]
    Broker {
        /// The AMQP reply code.
        code: u16,
        /// The broker's reply text.
        text: String,
    },
    /// The delivery was acknowledged, rejected or nacked already.
    #[error("delivery already settled")]
    AlreadySettled,
    /// A value AMQP or the transport cannot carry (a name over 255 bytes, an empty queue
    /// name, a header value of no AMQP type); nothing was sent.
    #[error("invalid value: {0}")]
    Invalid(String),
    /// The transport cannot do this: an operation a worker process does not forward, a
    /// queue feature the in-process broker does not implement, a server speaking another
    /// protocol version.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A failure in the AMQP client or between the framework's own processes that none of
    /// the other variants describes (a bug, or a state the client does not expect).
    #[error("internal transport error: {0}")]
    Internal(String),
}

impl TransportError {
    /// True when trying the same operation again cannot succeed until something changes:
    /// the credentials, the certificates, the URI, the broker's definitions or permissions,
    /// or the request itself.
    ///
    /// Not permanent (trying again later can help): [`Unreachable`](Self::Unreachable),
    /// [`ConnectionLost`](Self::ConnectionLost), [`TimedOut`](Self::TimedOut),
    /// [`ResourceLocked`](Self::ResourceLocked) (the holder may go away),
    /// [`Nacked`](Self::Nacked), [`LimitReached`](Self::LimitReached) of the in-process
    /// broker's memory or of pending calls (they drain), and [`Broker`](Self::Broker) replies
    /// `320 CONNECTION_FORCED`, `506 RESOURCE_ERROR`, `541 INTERNAL_ERROR` and
    /// `530 NOT_ALLOWED` for a vhost's or user's connection limit reached. Everything
    /// else is permanent, e.g. [`Authentication`](Self::Authentication),
    /// [`Tls`](Self::Tls), [`InvalidUri`](Self::InvalidUri), a message over
    /// `MAX_MESSAGE_SIZE`, or a transport [`Closed`](Self::Closed) by the application.
    ///
    /// ```
    /// use micro_framework::transport::TransportError;
    /// assert!(!TransportError::Unreachable("connection refused".into()).is_permanent());
    /// assert!(TransportError::Authentication("ACCESS_REFUSED".into()).is_permanent());
    /// ```
    pub fn is_permanent(&self) -> bool {
        match self {
            TransportError::Unreachable(_)
            | TransportError::ConnectionLost(_)
            | TransportError::TimedOut(_)
            | TransportError::ResourceLocked(_)
            | TransportError::Nacked => false,
            TransportError::LimitReached { what, .. } => what.is_permanent(),
            TransportError::Broker { code: NOT_ALLOWED, text } => {
                !text.contains(CONNECTION_LIMIT_REACHED)
            }
            TransportError::Broker { code, .. } => {
                !matches!(*code, CONNECTION_FORCED | RESOURCE_ERROR | INTERNAL_ERROR)
            }
            TransportError::Authentication(_)
            | TransportError::Tls(_)
            | TransportError::InvalidUri(_)
            | TransportError::Closed { .. }
            | TransportError::AccessRefused(_)
            | TransportError::PreconditionFailed(_)
            | TransportError::NotFound(_)
            | TransportError::Unroutable { .. }
            | TransportError::AlreadySettled
            | TransportError::Invalid(_)
            | TransportError::Unsupported(_)
            | TransportError::Internal(_) => true,
        }
    }
}

/// `320 CONNECTION_FORCED`: the broker closed the connection (e.g. it is shutting down).
const CONNECTION_FORCED: u16 = 320;
/// `506 RESOURCE_ERROR`: the broker lacks the resources to do it now.
const RESOURCE_ERROR: u16 = 506;
/// `541 INTERNAL_ERROR`: the broker failed internally.
const INTERNAL_ERROR: u16 = 541;
/// `530 NOT_ALLOWED`: a vhost that does not exist (permanent), or a vhost's or user's
/// `max-connections` reached (it frees when another connection closes).
const NOT_ALLOWED: u16 = 530;
/// How RabbitMQ's `530` names a `max-connections` limit: "connection limit (N) is reached".
const CONNECTION_LIMIT_REACHED: &str = "connection limit";

/// What a [`TransportError::Closed`] error says was closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ClosedPart {
    /// The transport (closed by the application, or the service a worker process forwards
    /// to went away).
    Transport,
    /// The channel a delivery came on: it can no longer be settled (the broker requeues it).
    Channel,
    /// A consumer (e.g. the reply queue's consumer of an RPC call).
    Consumer,
}

/// Which limit a [`TransportError::LimitReached`] error reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Limit {
    /// `MAX_MESSAGE_SIZE`: the size of one message body, in bytes. Permanent for that message.
    MessageSize,
    /// The in-process broker's bound on its ready messages (`memory://NAME?max_bytes=N`), in
    /// bytes. It frees up as consumers catch up.
    BrokerMemory,
    /// The RPC calls one service instance may have waiting for replies, a count. It frees up
    /// as replies come.
    PendingCalls,
    /// The encoded properties and headers of one message, in bytes: AMQP carries them in one
    /// frame, so they must fit in the connection's `frame_max` (131,072 bytes on RabbitMQ by
    /// default); RabbitMQ closes the whole connection on a bigger one. Permanent for that
    /// message.
    HeaderSize,
}

impl Limit {
    /// The unit of the limit's numbers: `"bytes"` or `"calls"`.
    pub fn unit(self) -> &'static str {
        match self {
            Limit::MessageSize | Limit::BrokerMemory | Limit::HeaderSize => "bytes",
            Limit::PendingCalls => "calls",
        }
    }

    /// True when trying again cannot help: the size of a message's body or headers.
    pub fn is_permanent(self) -> bool {
        matches!(self, Limit::MessageSize | Limit::HeaderSize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanence_of_every_variant() {
        let text = || "why".to_owned();
        let limit = |what| TransportError::LimitReached { what, size: 2, limit: 1, reason: text() };
        let broker = |code| TransportError::Broker { code, text: text() };
        let closed = |what| TransportError::Closed { what, reason: text() };
        let retryable = [
            TransportError::Unreachable(text()),
            TransportError::ConnectionLost(text()),
            TransportError::TimedOut(text()),
            TransportError::ResourceLocked(text()),
            TransportError::Nacked,
            limit(Limit::BrokerMemory),
            limit(Limit::PendingCalls),
            broker(320),
            broker(506),
            broker(541),
            TransportError::Broker {
                code: 530,
                text: "NOT_ALLOWED - access to vhost 'v' refused for user 'u': connection limit \
                       (1) is reached"
                    .into(),
            },
        ];
        for error in retryable {
            assert!(!error.is_permanent(), "{error:?} can succeed when tried again");
        }
        let permanent = [
            TransportError::Authentication(text()),
            TransportError::Tls(text()),
            TransportError::InvalidUri(text()),
            closed(ClosedPart::Transport),
            closed(ClosedPart::Channel),
            closed(ClosedPart::Consumer),
            TransportError::AccessRefused(text()),
            TransportError::PreconditionFailed(text()),
            TransportError::NotFound(text()),
            TransportError::Unroutable { exchange: text(), routing_key: text() },
            limit(Limit::MessageSize),
            broker(503),
            broker(530),
            TransportError::AlreadySettled,
            TransportError::Invalid(text()),
            TransportError::Unsupported(text()),
            TransportError::Internal(text()),
        ];
        for error in permanent {
            assert!(error.is_permanent(), "{error:?} fails again until something changes");
        }
    }

    #[test]
    fn messages_keep_their_wording() {
        let unreachable = TransportError::Unreachable("cannot connect to amqp://u:***@h/".into());
        assert_eq!(
            unreachable.to_string(),
            "broker connection error: cannot connect to amqp://u:***@h/"
        );
        let limit = TransportError::LimitReached {
            what: Limit::PendingCalls,
            size: 3,
            limit: 2,
            reason: "2 RPC calls wait".into(),
        };
        assert_eq!(limit.to_string(), "limit reached: 2 RPC calls wait");
        assert_eq!((Limit::PendingCalls.unit(), Limit::MessageSize.unit()), ("calls", "bytes"));
        let broker = TransportError::Broker { code: 530, text: "NOT_ALLOWED - vhost".into() };
        assert_eq!(broker.to_string(), "broker error: 530 NOT_ALLOWED - vhost");
        assert_eq!(TransportError::AlreadySettled.to_string(), "delivery already settled");
    }

    #[test]
    fn errors_cross_the_worker_process_link() {
        let error = TransportError::LimitReached {
            what: Limit::MessageSize,
            size: 17,
            limit: 16,
            reason: "event of 17 bytes".into(),
        };
        let json = serde_json::to_string(&error).unwrap();
        assert_eq!(serde_json::from_str::<TransportError>(&json).unwrap(), error);
        let closed = TransportError::Closed { what: ClosedPart::Channel, reason: "gone".into() };
        let json = serde_json::to_string(&closed).unwrap();
        assert_eq!(serde_json::from_str::<TransportError>(&json).unwrap(), closed);
    }
}
