//! Transports: the AMQP 0-9-1 operations the framework needs ([`Transport`]), implemented by
//! RabbitMQ (lapin, [`rabbitmq`]) and by an in-process broker modelled on it ([`memory`]).
//! A transport knows messages, queues and exchanges; nothing of routes or protocols.

mod api;
mod declarations;
mod delivery;
mod error;
pub mod limits;
pub mod memory;
pub mod rabbitmq;
pub mod topology;

use std::sync::Arc;

pub use crate::data::{HeaderValue, Headers, Properties};
pub use api::*;
pub use delivery::{Acker, Consumer, Delivery, LostInFlight};
pub use error::{ClosedPart, Limit, TransportError};

use crate::config::amqp_uri::memory_uri;
use crate::config::Config;

/// Connect to the broker `config.amqp_uri` names: `memory://[name]` is the in-process
/// broker (the scheme in any case, as validation reads it); `amqp://` and `amqps://` are
/// RabbitMQ (heartbeat `AMQP_HEARTBEAT`, TLS files `AMQP_SSL_*`, the connection named after
/// the service).
pub async fn connect(config: &Config) -> Result<SharedTransport, TransportError> {
    let uri = config.amqp_uri.as_str();
    if let Some(memory) = memory_uri(uri) {
        return Ok(Arc::new(memory::MemoryTransport::connect(&memory)?));
    }
    let mut options = rabbitmq::RabbitMqOptions::new(uri);
    options.heartbeat = config.amqp_heartbeat;
    options.connection_name = Some(config.service_name.clone());
    options.tls = rabbitmq::TlsOptions {
        ca_file: config.amqp_ssl_ca_file.as_ref().map(Into::into),
        client_cert_file: config.amqp_ssl_cert_file.as_ref().map(Into::into),
        client_key_file: config.amqp_ssl_key_file.as_ref().map(Into::into),
    };
    Ok(Arc::new(rabbitmq::RabbitMqTransport::connect(options).await?))
}
