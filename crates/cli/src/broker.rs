//! The configuration and broker connection every broker command uses.

use micro_framework::config::{mask_uri, ConfigError};
use micro_framework::transport::{SharedTransport, TransportError};
use micro_framework::Config;

use crate::error::CliError;

/// The service name the CLI connects as when `SERVICE_NAME` is not set.
const CLI_SERVICE: &str = "micro-framework-cli";

/// The configuration of the environment (as a service would read it) with the broker `uri`
/// and the service name `service` (or `SERVICE_NAME`, or `micro-framework-cli`).
pub fn config(uri: &str, service: Option<&str>) -> Result<Config, CliError> {
    config_of(uri, service).map_err(|error| CliError::usage(error.to_string()))
}

/// [`config`], with the configuration's own error.
pub fn config_of(uri: &str, service: Option<&str>) -> Result<Config, ConfigError> {
    let mut vars: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(key, value)| Some((key.into_string().ok()?, value.into_string().ok()?)))
        .collect();
    // a blank SERVICE_NAME (an env file's `SERVICE_NAME=`) is unset, as an absent one: no
    // command needs the name, so it must not fail on it
    let blank = |(key, value): &(String, String)| key == "SERVICE_NAME" && value.trim().is_empty();
    vars.retain(|var| !blank(var));
    if !vars.iter().any(|(key, _)| key == "SERVICE_NAME") || service.is_some() {
        vars.push(("SERVICE_NAME".into(), service.unwrap_or(CLI_SERVICE).to_owned()));
    }
    vars.push(("AMQP_URI".into(), uri.to_owned()));
    let config = Config::from_vars(vars)?;
    // an in-process broker lives and dies with its process: the CLI would open a new, empty
    // one and report the service's queues and exchanges as missing
    let in_process = |uri: &&str| uri.trim_start().to_ascii_lowercase().starts_with("memory:");
    if config.amqp_uris().iter().any(in_process) {
        return Err(ConfigError::new(
            "AMQP_URI",
            uri,
            "is the in-process broker of one process, which the CLI cannot reach: give the \
             RabbitMQ URI of the service (--uri or AMQP_URI)",
        ));
    }
    Ok(config)
}

/// Connect to the broker of `config`.
pub async fn connect(config: &Config) -> Result<SharedTransport, CliError> {
    micro_framework::transport::connect(config)
        .await
        .map_err(|error| connect_error(&config.amqp_uri, error))
}

/// The error of a failed connection: bad input when the library refused the URI itself
/// (e.g. a vhost over the 255 bytes AMQP allows, checked before connecting), else the
/// broker's.
pub fn connect_error(uri: &str, error: TransportError) -> CliError {
    match error {
        TransportError::InvalidUri(reason) => CliError::usage(reason),
        other => unreachable(uri, other),
    }
}

/// The error of a broker that cannot be reached.
pub fn unreachable(uri: &str, error: impl std::fmt::Display) -> CliError {
    let error = error.to_string();
    let masked = mask_uri(uri);
    if error.contains(&masked) {
        CliError::failure(format!("cannot reach the broker: {error}"))
    } else {
        CliError::failure(format!("cannot reach the broker at {masked}: {error}"))
    }
}
