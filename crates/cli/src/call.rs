//! `call`: call an RPC method with the standalone RPC client and print the result as JSON.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use micro_framework::amqp::rpc::{Client, RpcError};
use micro_framework::config::Protocol;
use serde_json::{json, Map, Value};

use crate::broker;
use crate::emit::parse_json;
use crate::error::CliError;
use crate::{json, names};

/// Arguments of `call`.
#[derive(Debug, Args)]
pub struct CallArgs {
    /// The method to call, as `service.method`: under `PROTOCOL=micro_framework` the service
    /// is up to the first dot (`orders.Calc.add` calls `Calc.add` of `orders`), under Nameko's
    /// the method is after the last one.
    #[arg(value_name = "SERVICE.METHOD")]
    pub target: String,
    /// Positional arguments, a JSON array.
    #[arg(long, value_name = "JSON", default_value = "[]")]
    pub args: String,
    /// Keyword arguments, a JSON object.
    #[arg(long, value_name = "JSON", default_value = "{}")]
    pub kwargs: String,
    /// Seconds to wait for the reply [default: RPC_TIMEOUT, 30].
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
    pub timeout: Option<f64>,
}

/// Make the call; exit code 1 with the error as JSON when the method failed remotely.
pub async fn run(uri: &str, args: CallArgs) -> Result<ExitCode, CliError> {
    let Value::Array(positional) = parse_json("--args", &args.args)? else {
        return Err(CliError::usage("--args must be a JSON array, e.g. '[1, 2]'"));
    };
    let Value::Object(keywords) = parse_json("--kwargs", &args.kwargs)? else {
        return Err(CliError::usage("--kwargs must be a JSON object, e.g. '{\"a\": 1}'"));
    };
    let timeout = args.timeout.map(seconds).transpose()?;
    // the routing key of the request is SERVICE.METHOD itself
    names::check("SERVICE.METHOD (the routing key)", &args.target)?;
    let config = broker::config(uri, None)?;
    let (service, method) = split_target(&args.target, config.protocol)?;
    names::check("RPC_EXCHANGE", &config.rpc_exchange)?;
    let client = Client::connect(&config).await.map_err(|error| match error {
        micro_framework::Error::Transport(error) => broker::connect_error(uri, error),
        other => broker::unreachable(uri, other),
    })?;
    let mut proxy = client.service(service);
    if let Some(timeout) = timeout {
        proxy = proxy.timeout(timeout);
    }
    // Ctrl-C while waiting: close the client all the same, as it deletes the reply queue
    // (which `x-expires` would keep for minutes, or hours under the micro-framework protocol)
    let outcome = tokio::select! {
        outcome = proxy.call::<Value>(method, positional, keywords) => Some(outcome),
        _ = tokio::signal::ctrl_c() => None,
    };
    client.close().await;
    let Some(outcome) = outcome else {
        return Err(CliError::interrupted(format!("no reply from {} yet", args.target)));
    };
    match outcome {
        Ok(result) => {
            writeln!(std::io::stdout(), "{}", json::pretty(&result, 0)?)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => match remote_error(&error, config.protocol) {
            Some(described) => {
                // the call failed whether or not its reader still takes the output: a closed
                // output must not turn it into a success (exit 0)
                let text = json::pretty(&json!({ "error": described }), 0)?;
                let _ = writeln!(std::io::stdout(), "{text}");
                Ok(ExitCode::FAILURE)
            }
            None => Err(local_error(service, error)),
        },
    }
}

/// `SERVICE.METHOD` as the service and the method, split where the service's `protocol`
/// splits its routing key: micro-framework's server takes all after the first dot as the
/// target (a class method's is `Class.method`); a Nameko method, a Python name, has no dot,
/// where its service name may have one (its binding `{service}.*` still matches).
fn split_target(target: &str, protocol: Protocol) -> Result<(&str, &str), CliError> {
    let split = match protocol {
        Protocol::Nameko => target.rsplit_once('.'),
        Protocol::MicroFramework => target.split_once('.'),
    };
    split
        .filter(|(service, method)| !service.is_empty() && !method.is_empty())
        .ok_or_else(|| CliError::usage(format!("expected SERVICE.METHOD, got '{target}'")))
}

/// A positive number of seconds as a duration.
fn seconds(value: f64) -> Result<Duration, CliError> {
    // `{value}` of 1e300 writes 301 digits
    if value.is_finite() && value > 0.0 && Duration::try_from_secs_f64(value).is_err() {
        return Err(CliError::usage(format!(
            "--timeout {value:e} is too large: at most {} seconds",
            u64::MAX
        )));
    }
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|duration| !duration.is_zero())
        .ok_or_else(|| CliError::usage(format!("--timeout must be a positive number, got {value}")))
}

/// The error the service replied, as `{"exc_type", "value", "exc_path", "exc_args"}`, named
/// as the service's `protocol` names it on the wire.
fn remote_error(error: &RpcError, protocol: Protocol) -> Option<Map<String, Value>> {
    let (module, not_found, malformed) = match protocol {
        Protocol::Nameko => ("nameko.exceptions", "MethodNotFound", "MalformedRequest"),
        Protocol::MicroFramework => {
            ("micro_framework.exceptions", "RPCTargetDoesNotExist", "RPCMalformedMessage")
        }
    };
    let named = |exc_type: &str, value: &str| {
        let path = format!("{module}.{exc_type}");
        (exc_type.to_owned(), value.to_owned(), path, vec![Value::from(value)])
    };
    let (exc_type, value, exc_path, exc_args) = match error {
        RpcError::RemoteError { exc_type, value, exc_path, exc_args } => {
            (exc_type.clone(), value.clone(), exc_path.clone(), exc_args.clone())
        }
        RpcError::MethodNotFound(value) => named(not_found, value),
        RpcError::IncorrectSignature(value) => named("IncorrectSignature", value),
        RpcError::MalformedRequest(value) => named(malformed, value),
        _ => return None,
    };
    let mut described = Map::new();
    described.insert("exc_type".into(), exc_type.into());
    described.insert("value".into(), value.into());
    described.insert("exc_path".into(), exc_path.into());
    described.insert("exc_args".into(), exc_args.into());
    Some(described)
}

/// A call that got no reply from the service.
fn local_error(service: &str, error: RpcError) -> CliError {
    match error {
        RpcError::UnknownService(_) => {
            CliError::failure(format!("no service '{service}' is listening (UnknownService)"))
        }
        RpcError::Timeout { service, method, after } => CliError::failure(format!(
            "no reply from {service}.{method} within {:.1}s (Timeout)",
            after.as_secs_f64()
        )),
        other => CliError::failure(format!("the call failed: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_splits_where_its_protocol_routes_it() {
        let ufw = split_target("orders.Calc.add", Protocol::MicroFramework).unwrap();
        assert_eq!(ufw, ("orders", "Calc.add"));
        assert_eq!(split_target("eu.orders.add", Protocol::Nameko).unwrap(), ("eu.orders", "add"));
        for bad in ["orders", ".add", "orders."] {
            assert!(split_target(bad, Protocol::MicroFramework).is_err(), "{bad}");
            assert!(split_target(bad, Protocol::Nameko).is_err(), "{bad}");
        }
    }
}
