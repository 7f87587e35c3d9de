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
    let loaded = match file {
        Some(path) => Config::from_file(path),
        None => Config::from_env(),
    };
    let config = loaded
        .and_then(|config| match uri {
            Some(uri) => {
                let config = config.with_amqp_uri(uri.to_owned());
                config.validate().map(|()| config)
            }
            None => Ok(config),
        })
        .map_err(|error| CliError::usage(error.to_string()))?;
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
