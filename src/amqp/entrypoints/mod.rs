//! AMQP entrypoints.

mod event;
mod queue;
mod rpc;

pub(crate) use event::event_delivery;
pub use event::EventListener;
pub use queue::QueueListener;
pub(crate) use rpc::rpc_request;
pub use rpc::RPCListener;
