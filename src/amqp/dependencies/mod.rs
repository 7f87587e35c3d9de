//! AMQP dependencies: extractors that let targets talk to the broker.

mod producer;
mod rpc_proxy;

pub(crate) use producer::DeclaredExchanges;
pub use producer::Producer;
pub use rpc_proxy::{RpcProxy, ServiceProxy};
