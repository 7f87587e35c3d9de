//! AMQP entrypoints.

mod event;
mod queue;

pub use event::EventListener;
pub use queue::QueueListener;
