//! Mapping of lapin errors to [`TransportError`], by error kind and AMQP reply code (never by
//! the text of a message).

use std::error::Error as StdError;

use lapin::protocol::AMQPErrorKind;
use lapin::ErrorKind;

use crate::transport::TransportError;

/// Reply codes the framework distinguishes.
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

/// The reply code of a broker refusal, if the error is one.
pub(crate) fn reply_code(error: &lapin::Error) -> Option<u16> {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

/// Map a lapin error of an operation on an open connection to the transport's error type.
pub(crate) fn map_error(error: &lapin::Error) -> TransportError {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => {
            let text = amqp.get_message().to_string();
            match amqp.get_id() {
                ACCESS_REFUSED => TransportError::AccessRefused(text),
                NOT_FOUND => TransportError::NotFound(text),
                RESOURCE_LOCKED => TransportError::ResourceLocked(text),
                PRECONDITION_FAILED => TransportError::PreconditionFailed(text),
                CONNECTION_FORCED => {
                    TransportError::ConnectionLost(format!("{CONNECTION_FORCED} {text}"))
                }
                code => TransportError::Broker { code, text },
            }
        }
        ErrorKind::InvalidChannelState(..) | ErrorKind::InvalidChannel(_) => {
            TransportError::Closed {
                what: crate::transport::ClosedPart::Channel,
                reason: error.to_string(),
            }
        }
        ErrorKind::IOError(_)
        | ErrorKind::RuntimeShutdownError(_)
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::MissingHeartbeatError
        | ErrorKind::ParsingError(_) => TransportError::ConnectionLost(error.to_string()),
        ErrorKind::InvalidProtocolVersion(_) => TransportError::Unsupported(error.to_string()),
        ErrorKind::AuthProviderError(_) => TransportError::Authentication(error.to_string()),
        // the service keeps a channel per consumer, one to publish, one for mandatory
        // publishes and some for declarations: the start refuses routes whose consumers
        // cannot all have one, and this ends a route that needs one more at run time
        ErrorKind::ChannelsLimitReached => TransportError::Unsupported(format!(
            "{error}: the connection's channel_max (the lower of the broker's, 2047 by default \
             on RabbitMQ, and AMQP_URI's ?channel_max=) is lower than the channels this service \
             needs (one per consumer and a few more): raise RabbitMQ's channel_max \
             (rabbitmq.conf) and AMQP_URI's if set, or split the routes among services"
        )),
        _ => TransportError::Internal(error.to_string()),
    }
}

/// Why a connection failed whose peer answered with something other than AMQP.
const NOT_AMQP: &str = "the server does not speak AMQP 0-9-1: its answer is no AMQP frame \
     (is this the broker's AMQP port? RabbitMQ listens on 5672, and on 5671 for amqps://)";

/// Map a lapin error of opening a connection. `describe` turns lapin's message into the
/// reported one (it names the masked URI and scrubs the password).
///
/// * a login refused (`403` while the connection opens, or the authentication mechanism
///   failing) is [`TransportError::Authentication`];
/// * a TLS failure ([`rustls::Error`] or a PEM error of the certificate files, found in the
///   I/O error's chain) is [`TransportError::Tls`];
/// * any other I/O failure is [`TransportError::Unreachable`];
/// * another broker reply (e.g. `530 NOT_ALLOWED` for a missing vhost) is
///   [`TransportError::Broker`].
pub(crate) fn map_connect_error(
    error: &lapin::Error,
    describe: impl FnOnce(String) -> String,
) -> TransportError {
    let reason = match error.kind() {
        // lapin's own text ("failed to parse: Parsing Error: ParserErrors { .. }") names no
        // cause an operator would recognise: a wrong port, or TLS expected
        ErrorKind::ParsingError(_) => describe(NOT_AMQP.to_owned()),
        _ => describe(error.to_string()),
    };
    match error.kind() {
        ErrorKind::ProtocolError(amqp) if amqp.get_id() == ACCESS_REFUSED => {
            TransportError::Authentication(reason)
        }
        ErrorKind::ProtocolError(amqp) => {
            TransportError::Broker { code: amqp.get_id(), text: reason }
        }
        ErrorKind::AuthProviderError(_) => TransportError::Authentication(reason),
        ErrorKind::IOError(io) | ErrorKind::RuntimeShutdownError(io) if is_tls(io.as_ref()) => {
            TransportError::Tls(reason)
        }
        ErrorKind::IOError(_)
        | ErrorKind::RuntimeShutdownError(_)
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::InvalidChannelState(..)
        | ErrorKind::MissingHeartbeatError
        | ErrorKind::ParsingError(_) => TransportError::Unreachable(reason),
        ErrorKind::InvalidProtocolVersion(_) => TransportError::Unsupported(reason),
        _ => TransportError::Internal(reason),
    }
}

/// True when `error` is, or wraps, a TLS error: a [`rustls::Error`] (certificate refused, alert
/// received, ...) or a PEM error of the certificate or key files. I/O errors are looked into
/// (`io::Error::source` skips the error it wraps, so [`std::io::Error::get_ref`] is used).
#[cfg(feature = "tls")]
fn is_tls(error: &(dyn StdError + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if error.is::<rustls::Error>() || error.is::<rustls::pki_types::pem::Error>() {
            return true;
        }
        current = match error.downcast_ref::<std::io::Error>().and_then(std::io::Error::get_ref) {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => error.source(),
        };
    }
    false
}

/// Built without the `tls` feature, no connection uses TLS.
#[cfg(not(feature = "tls"))]
fn is_tls(_error: &(dyn StdError + 'static)) -> bool {
    false
}

/// An error of a value the framework gave that AMQP cannot carry.
pub(crate) fn invalid(what: impl std::fmt::Display) -> TransportError {
    TransportError::Invalid(what.to_string())
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::Arc;

    use lapin::protocol::{AMQPError, AMQPHardError, AMQPSoftError};
    use lapin::{ChannelState, ConnectionState};

    use super::*;
    use crate::transport::ClosedPart;

    fn protocol(code: u16, text: &str) -> lapin::Error {
        let amqp = AMQPError::from_id(code, text.into()).expect("a known reply code");
        ErrorKind::ProtocolError(amqp).into()
    }

    fn io_error(inner: io::Error) -> lapin::Error {
        ErrorKind::IOError(Arc::new(inner)).into()
    }

    #[test]
    fn broker_replies_map_by_reply_code() {
        let refused = map_error(&protocol(403, "ACCESS_REFUSED - no access"));
        assert_eq!(refused, TransportError::AccessRefused("ACCESS_REFUSED - no access".into()));
        let missing = map_error(&protocol(404, "NOT_FOUND - no queue 'q'"));
        assert_eq!(missing, TransportError::NotFound("NOT_FOUND - no queue 'q'".into()));
        // the text does not decide: a 403 naming "exclusive" is still a refusal here (the
        // consume call site knows better, see consumer.rs)
        let exclusive = map_error(&protocol(403, "queue 'q' in exclusive use"));
        assert!(matches!(exclusive, TransportError::AccessRefused(_)), "{exclusive:?}");
        assert!(matches!(map_error(&protocol(405, "locked")), TransportError::ResourceLocked(_)));
        assert!(matches!(
            map_error(&protocol(406, "inequivalent arg")),
            TransportError::PreconditionFailed(_)
        ));
        assert_eq!(
            map_error(&protocol(503, "COMMAND_INVALID - unknown exchange type 'x'")),
            TransportError::Broker {
                code: 503,
                text: "COMMAND_INVALID - unknown exchange type 'x'".into()
            }
        );
        assert_eq!(
            map_error(&protocol(312, "NO_ROUTE")),
            TransportError::Broker { code: 312, text: "NO_ROUTE".into() }
        );
        let forced = map_error(&protocol(320, "CONNECTION_FORCED - broker forced"));
        assert!(matches!(forced, TransportError::ConnectionLost(_)), "{forced:?}");
        assert!(!forced.is_permanent());
        assert_eq!(
            AMQPSoftError::from_id(403).map(|e| e.get_id()),
            Some(403),
            "ACCESS_REFUSED is a soft error in the protocol"
        );
        assert_eq!(AMQPHardError::from_id(530).map(|e| e.get_id()), Some(530));
    }

    #[test]
    fn client_errors_map_by_kind() {
        let reset = io_error(io::Error::from(io::ErrorKind::ConnectionReset));
        assert!(matches!(map_error(&reset), TransportError::ConnectionLost(_)));
        let heartbeat = ErrorKind::MissingHeartbeatError.into();
        assert!(matches!(map_error(&heartbeat), TransportError::ConnectionLost(_)));
        let dead = ErrorKind::InvalidConnectionState(ConnectionState::Error).into();
        assert!(matches!(map_error(&dead), TransportError::ConnectionLost(_)));
        let channel = ErrorKind::InvalidChannelState(ChannelState::Closed, "closed").into();
        assert!(matches!(
            map_error(&channel),
            TransportError::Closed { what: ClosedPart::Channel, .. }
        ));
        let auth = ErrorKind::AuthProviderError("no token".into()).into();
        assert!(matches!(map_error(&auth), TransportError::Authentication(_)));
        let channels = map_error(&ErrorKind::ChannelsLimitReached.into());
        assert!(matches!(channels, TransportError::Unsupported(_)), "{channels:?}");
        assert!(channels.to_string().contains("channel_max"), "{channels}");
        let other = ErrorKind::FutureCompleted.into();
        assert!(matches!(map_error(&other), TransportError::Internal(_)));
        assert!(matches!(invalid("too long"), TransportError::Invalid(_)));
    }

    #[test]
    fn connect_errors_say_what_went_wrong() {
        let describe = |why: String| format!("cannot connect to amqp://u:***@h/: {why}");
        let login =
            map_connect_error(&protocol(403, "ACCESS_REFUSED - Login was refused"), describe);
        assert!(
            matches!(login, TransportError::Authentication(ref text)
            if text.starts_with("cannot connect to amqp://u:***@h/")),
            "{login:?}"
        );
        assert!(login.is_permanent());

        let vhost =
            map_connect_error(&protocol(530, "NOT_ALLOWED - vhost nope not found"), describe);
        assert!(matches!(vhost, TransportError::Broker { code: 530, .. }), "{vhost:?}");

        let refused = io_error(io::Error::from(io::ErrorKind::ConnectionRefused));
        let refused = map_connect_error(&refused, describe);
        assert!(matches!(refused, TransportError::Unreachable(_)), "{refused:?}");
        assert!(!refused.is_permanent());

        #[cfg(feature = "tls")]
        tls_errors_inside_io_errors_are_tls(describe);
        let plain = io::Error::new(io::ErrorKind::InvalidData, "garbage");
        assert!(matches!(
            map_connect_error(&io_error(plain), describe),
            TransportError::Unreachable(_)
        ));
    }

    #[cfg(feature = "tls")]
    fn tls_errors_inside_io_errors_are_tls(describe: impl Fn(String) -> String + Copy) {
        // as the TLS stream reports them: a rustls error inside an I/O error, maybe twice
        let certificate =
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let wrapped = io::Error::new(io::ErrorKind::InvalidData, certificate);
        let tls = map_connect_error(&io_error(wrapped), describe);
        assert!(
            matches!(tls, TransportError::Tls(ref text) if text.contains("certificate")),
            "{tls:?}"
        );
        assert!(tls.is_permanent());
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired);
        let twice = io::Error::other(io::Error::new(io::ErrorKind::InvalidData, alert));
        assert!(matches!(map_connect_error(&io_error(twice), describe), TransportError::Tls(_)));
        let pem =
            io::Error::new(io::ErrorKind::InvalidData, rustls::pki_types::pem::Error::NoItemsFound);
        assert!(matches!(map_connect_error(&io_error(pem), describe), TransportError::Tls(_)));
    }
}
