//! The configuration and broker connection every broker command uses.

use micro_framework::config::mask_uri;
use micro_framework::transport::SharedTransport;
use micro_framework::Config;

use crate::error::CliError;
use crate::names;

/// The service name the CLI connects as when `SERVICE_NAME` is not set.
const CLI_SERVICE: &str = "micro-framework-cli";

/// The configuration of the environment (as a service would read it) with the broker `uri`
/// and the service name `service` (or `SERVICE_NAME`, or `micro-framework-cli`).
pub fn config(uri: &str, service: Option<&str>) -> Result<Config, CliError> {
    let mut vars: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(key, value)| Some((key.into_string().ok()?, value.into_string().ok()?)))
        .collect();
    if !vars.iter().any(|(key, _)| key == "SERVICE_NAME") || service.is_some() {
        vars.push(("SERVICE_NAME".into(), service.unwrap_or(CLI_SERVICE).to_owned()));
    }
    vars.push(("AMQP_URI".into(), uri.to_owned()));
    let config = Config::from_vars(vars).map_err(|error| CliError::usage(error.to_string()))?;
    // sent as a short string when connecting, where an over-long one panics in lapin
    names::check("the virtual host of the broker URI", &vhost(&config.amqp_uri))?;
    Ok(config)
}

/// The virtual host of an `amqp://` URI: its path without the leading `/`, percent-decoded
/// (`/` when empty), as the library connects to it.
fn vhost(uri: &str) -> String {
    let after_scheme = uri.split_once("://").map_or(uri, |(_, rest)| rest);
    let path = after_scheme.split_once('/').map_or("", |(_, path)| path);
    let path = path.split(['?', '#']).next().unwrap_or_default();
    if path.is_empty() {
        return "/".to_owned();
    }
    let (bytes, mut decoded, mut i) = (path.as_bytes(), Vec::with_capacity(path.len()), 0);
    while i < bytes.len() {
        let escaped = bytes.get(i + 1..i + 3).filter(|_| bytes[i] == b'%');
        match escaped.and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()) {
            Some(byte) => {
                decoded.push(byte);
                i += 3;
            }
            None => {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// Connect to the broker of `config`.
pub async fn connect(config: &Config) -> Result<SharedTransport, CliError> {
    micro_framework::transport::connect(config)
        .await
        .map_err(|error| unreachable(&config.amqp_uri, error))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vhosts_are_decoded_paths() {
        assert_eq!(vhost("amqp://u:p@h:5672/"), "/");
        assert_eq!(vhost("amqp://h"), "/");
        assert_eq!(vhost("amqp://u:p@h/%2fprod?heartbeat=5"), "/prod");
        assert_eq!(vhost("amqps://h/staging%"), "staging%");
    }
}
