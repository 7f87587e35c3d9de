//! The AMQP 0-9-1 model: entrypoints, dependencies, naming, and the two transports behind
//! [`transport::Transport`]: RabbitMQ and the in-process broker (`memory://`).

pub(crate) mod consumer;
pub mod dependencies;
pub mod entrypoints;
pub mod limits;
pub mod memory;
pub mod naming;
pub mod rabbitmq;
pub mod rpc;
pub mod settle;
pub mod topology;
pub mod transport;

use crate::config::Config;
use std::sync::Arc;

use crate::error::Result;
use transport::SharedTransport;

/// Connect to the broker `config.amqp_uri` names: `memory://[name]` is the in-process
/// broker; `amqp://` and `amqps://` are RabbitMQ (heartbeat `AMQP_HEARTBEAT`, TLS files
/// `AMQP_SSL_*`, the connection named after the service).
pub async fn connect(config: &Config) -> Result<SharedTransport> {
    let uri = config.amqp_uri.as_str();
    if uri.starts_with("memory://") {
        return Ok(Arc::new(memory::MemoryTransport::connect(uri)?));
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
