//! AMQP dependencies: extractors that let targets talk to the broker.

mod producer;

pub(crate) use producer::DeclaredExchanges;
pub use producer::Producer;
