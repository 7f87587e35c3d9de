//! Mapping of lapin errors to [`TransportError`].

use lapin::protocol::AMQPErrorKind;
use lapin::ErrorKind;

use crate::transport::TransportError;

/// Reply codes of the channel-level errors the framework distinguishes.
const ACCESS_REFUSED: u16 = 403;
const NOT_FOUND: u16 = 404;
const RESOURCE_LOCKED: u16 = 405;
const PRECONDITION_FAILED: u16 = 406;
const CONNECTION_FORCED: u16 = 320;

/// True when the broker refused this operation and closed only the channel (a soft error):
/// the connection is fine and retrying the same operation would fail again.
pub(crate) fn is_soft(error: &lapin::Error) -> bool {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => matches!(amqp.kind(), AMQPErrorKind::Soft(_)),
        _ => false,
    }
}

/// True when the broker closed the whole connection because of this operation (a hard error
/// other than `320 CONNECTION_FORCED`): retrying it on the next connection would fail again.
pub(crate) fn is_fatal(error: &lapin::Error) -> bool {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => {
            matches!(amqp.kind(), AMQPErrorKind::Hard(_)) && amqp.get_id() != CONNECTION_FORCED
        }
        _ => false,
    }
}

/// Map a lapin error to the transport's error type.
pub(crate) fn map_error(error: &lapin::Error) -> TransportError {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => {
            let text = amqp.get_message().to_string();
            match (amqp.kind(), amqp.get_id()) {
                (AMQPErrorKind::Soft(_), NOT_FOUND) => TransportError::NotFound(text),
                (AMQPErrorKind::Soft(_), PRECONDITION_FAILED) => {
                    TransportError::PreconditionFailed(text)
                }
                (AMQPErrorKind::Soft(_), RESOURCE_LOCKED) => TransportError::ResourceLocked(text),
                (AMQPErrorKind::Soft(_), ACCESS_REFUSED) if text.contains("exclusive") => {
                    TransportError::ResourceLocked(text)
                }
                (AMQPErrorKind::Soft(_), code) => TransportError::Other(format!("{code} {text}")),
                (AMQPErrorKind::Hard(_), code) => {
                    TransportError::Connection(format!("{code} {text}"))
                }
            }
        }
        ErrorKind::InvalidChannelState(..) => TransportError::Closed(error.to_string()),
        ErrorKind::IOError(_)
        | ErrorKind::RuntimeShutdownError(_)
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::MissingHeartbeatError
        | ErrorKind::ParsingError(_)
        | ErrorKind::InvalidProtocolVersion(_) => TransportError::Connection(error.to_string()),
        _ => TransportError::Other(error.to_string()),
    }
}

/// An error of a value the framework gave that AMQP cannot carry.
pub(crate) fn invalid(what: impl std::fmt::Display) -> TransportError {
    TransportError::Other(format!("invalid value: {what}"))
}
