//! AMQP entrypoints.

mod event;

pub use event::EventListener;
