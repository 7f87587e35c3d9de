//! AMQP entrypoints.

mod event;
mod queue;
mod rpc;

pub use event::EventListener;
pub use queue::QueueListener;
pub use rpc::RPCListener;
