//! The AMQP 0-9-1 model: entrypoints, dependencies, naming, and the two transports behind
//! [`transport::Transport`]: RabbitMQ and the in-process broker (`memory://`).

pub(crate) mod consumer;
pub mod dependencies;
pub mod entrypoints;
pub mod memory;
pub mod naming;
pub mod settle;
pub mod transport;

use crate::config::Config;
use crate::error::{Error, Result};
use transport::SharedTransport;

/// Connect to the broker `config.amqp_uri` names: `memory://[name]` is the in-process
/// broker; `amqp://` and `amqps://` are RabbitMQ.
pub async fn connect(config: &Config) -> Result<SharedTransport> {
    let uri = config.amqp_uri.as_str();
    if uri.starts_with("memory://") {
        return Ok(std::sync::Arc::new(memory::MemoryTransport::connect(uri)?));
    }
    Err(Error::Startup(format!(
        "AMQP_URI {}: the RabbitMQ transport is not available in this build yet",
        config.masked_amqp_uri()
    )))
}
