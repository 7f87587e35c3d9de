//! The handler model: what a route calls and with what. Targets are plain functions whose
//! parameters are extractors ([`extract::FromContext`]) taken from a [`WorkerContext`];
//! dependencies provide values around each call; translators reshape the payload first.

pub(crate) mod blocking;
mod context;
pub mod dependencies;
pub mod extract;
pub(crate) mod named_fields;
pub(crate) mod outcome;
mod state;
pub mod targets;
pub mod translators;

pub use context::WorkerContext;
pub use state::ServiceState;
