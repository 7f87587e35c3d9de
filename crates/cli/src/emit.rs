//! `emit`: dispatch an event as another service would (Nameko's `dispatch_event`).

use std::process::ExitCode;

use clap::Args;
use micro_framework::amqp::dependencies::Producer;
use micro_framework::amqp::naming::event_exchange;
use serde_json::Value;

use crate::broker;
use crate::error::CliError;
use crate::names;

/// Arguments of `emit`.
#[derive(Debug, Args)]
pub struct EmitArgs {
    /// The service the event comes from: it goes to exchange `{SOURCE}.events`.
    #[arg(value_name = "SOURCE_SERVICE")]
    pub source: String,
    /// The event name (the routing key).
    #[arg(value_name = "EVENT_NAME")]
    pub event: String,
    /// The payload, a JSON document (`-`: read it from stdin).
    #[arg(value_name = "JSON")]
    pub payload: String,
}

/// Parse `text` as the JSON value of argument `what`.
pub fn parse_json(what: &str, text: &str) -> Result<Value, CliError> {
    serde_json::from_str(text)
        .map_err(|error| CliError::usage(format!("{what} is not valid JSON: {error}")))
}

/// Dispatch the event; prints where it went.
pub async fn run(uri: &str, args: EmitArgs) -> Result<ExitCode, CliError> {
    let text = if args.payload == "-" {
        std::io::read_to_string(std::io::stdin())
            .map_err(|error| CliError::usage(format!("cannot read the payload: {error}")))?
    } else {
        args.payload
    };
    let payload = parse_json("the payload", &text)?;
    let config = broker::config(uri, Some(&args.source))?;
    names::check("the exchange", &event_exchange(&config, &args.source).name)?;
    names::check("the event name (routing key)", &args.event)?;
    let transport = broker::connect(&config).await?;
    let producer = Producer::new(transport.clone(), &config);
    let dispatched = producer.dispatch(&args.event, &payload).await;
    transport.close().await;
    dispatched.map_err(|error| CliError::failure(format!("cannot dispatch the event: {error}")))?;
    println!("dispatched {} to exchange {} (confirmed)", args.event, producer.exchange());
    Ok(ExitCode::SUCCESS)
}
