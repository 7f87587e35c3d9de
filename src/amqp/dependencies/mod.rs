//! AMQP dependencies: extractors that let targets talk to the broker.

mod producer;
mod rpc_proxy;

pub use crate::amqp::rpc::service_proxy::ServiceProxy;
pub use producer::Producer;
pub(crate) use producer::{EventSink, OutgoingEvent};
pub use rpc_proxy::RpcProxy;
