//! `show-config`: the effective configuration of a service, secrets masked.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use micro_framework::Config;

use crate::error::CliError;
use crate::Format;

/// Load the configuration from `file` (after `${VAR}` substitution) or from the environment,
/// with `uri` (`--uri`, when given) as its `AMQP_URI`, and print it with secrets masked.
pub fn run(file: Option<&Path>, uri: Option<&str>, format: Format) -> Result<ExitCode, CliError> {
    let loaded = match (file, uri) {
        // the file's AMQP_URI, replaced, is not read, as the environment's below
        (Some(path), Some(uri)) => Config::from_file_with_amqp_uri(path, uri),
        (Some(path), None) => Config::from_file(path),
        // the environment's AMQP_URI replaced before it is read: it is not the one shown
        (None, Some(uri)) => Config::from_vars(environment_with_uri(uri)),
        (None, None) => Config::from_env(),
    };
    let config = loaded.map_err(|error| CliError::usage(error.to_string()))?;
    // what a service would warn about at start-up: this is where an operator checks
    for warning in config.warnings() {
        eprintln!("warning: {warning}");
    }
    let masked = config.to_masked_map();
    let text = match format {
        Format::Json => serde_json::to_string_pretty(&masked)? + "\n",
        Format::Yaml => serde_yaml_ng::to_string(&masked)
            .map_err(|error| CliError::failure(format!("cannot write YAML: {error}")))?,
    };
    write!(std::io::stdout(), "{text}")?;
    Ok(ExitCode::SUCCESS)
}

/// The process environment with `uri` as its `AMQP_URI`. A variable whose name or value is
/// not UTF-8 is left out: `Config::from_env` refuses one it reads, which the service's start
/// shows.
fn environment_with_uri(uri: &str) -> Vec<(String, String)> {
    let utf8 = |(name, value): (std::ffi::OsString, std::ffi::OsString)| {
        Some((name.into_string().ok()?, value.into_string().ok()?))
    };
    std::env::vars_os()
        .filter_map(utf8)
        .filter(|(name, _)| name != "AMQP_URI")
        .chain(std::iter::once(("AMQP_URI".to_owned(), uri.to_owned())))
        .collect()
}
