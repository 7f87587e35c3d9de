//! The crate's error type.

use crate::config::ConfigError;
use crate::transport::TransportError;

pub use crate::data::BoxError;

/// Errors that stop a service from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The broker refused an operation or could not be reached.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The service's routes cannot start as declared (duplicate names, unprovidable
    /// parameters, missing entrypoints, ...).
    #[error("cannot start: {0}")]
    Startup(String),
    /// A dependency failed in `setup`.
    #[error("dependency {name} failed to set up: {source}")]
    Dependency {
        /// The dependency's type name.
        name: String,
        /// What went wrong.
        source: BoxError,
    },
    /// An event or message could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(#[from] serde_json::Error),
    /// A wait in a test helper or client ran out of time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// An operating-system error (signals, runtime).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
