//! `emit`: dispatch an event as another service would (Nameko's `dispatch_event`), and fail
//! when no queue receives it.

use std::io::Write;
use std::process::ExitCode;

use bytes::Bytes;
use clap::Args;
use micro_framework::amqp::naming::event_exchange;
use micro_framework::data::json_properties;
use micro_framework::transport::limits::check_size;
use micro_framework::transport::{OutgoingMessage, PublishOptions, TransportError};
use serde_json::value::RawValue;
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

/// Dispatch the event; prints where it went. Unlike a service's `Producer`, the exchange is
/// not declared and the publish is mandatory: an operator's event that no queue receives (a
/// source or event name mistyped, no listener running) is an error, not a success that left
/// a new exchange on the broker.
pub async fn run(uri: &str, args: EmitArgs) -> Result<ExitCode, CliError> {
    let text = if args.payload == "-" {
        std::io::read_to_string(std::io::stdin())
            .map_err(|error| CliError::usage(format!("cannot read the payload: {error}")))?
    } else {
        args.payload
    };
    // sent as written (checked to be JSON, not read into numbers): an integer wider than 64
    // bits, which a Python peer reads exactly, stays that integer
    let payload: Box<RawValue> = serde_json::from_str(&text)
        .map_err(|error| CliError::usage(format!("the payload is not valid JSON: {error}")))?;
    if args.source.trim().is_empty() {
        return Err(CliError::usage("SOURCE_SERVICE is empty: name the service the event is from"));
    }
    if args.event.is_empty() {
        return Err(CliError::usage("EVENT_NAME is empty: name the event (its routing key)"));
    }
    // the source is the config's SERVICE_NAME: its errors name the argument, not the key
    let config = broker::config_of(uri, Some(&args.source)).map_err(|error| {
        if error.key == "SERVICE_NAME" {
            CliError::usage(format!("invalid SOURCE_SERVICE '{}': {}", error.value, error.reason))
        } else {
            CliError::usage(error.to_string())
        }
    })?;
    let exchange = event_exchange(&config, &args.source).name;
    names::check("the exchange", &exchange)?;
    names::check("the event name (routing key)", &args.event)?;
    let body = Bytes::copy_from_slice(payload.get().as_bytes());
    check_size(format_args!("event {}", args.event), body.len(), config.max_message_size)
        .map_err(|error| CliError::usage(error.to_string()))?;
    let message = OutgoingMessage { body, properties: json_properties() };
    let transport = broker::connect(&config).await?;
    let options = PublishOptions { mandatory: true };
    let published = transport.publish(&exchange, &args.event, message, options).await;
    transport.close().await;
    let event = &args.event;
    published.map_err(|error| match error {
        TransportError::NotFound(_) => CliError::failure(format!(
            "exchange {exchange} does not exist: no service listens to the events of {} \
             (nothing dispatched)",
            args.source
        )),
        TransportError::Unroutable { .. } => CliError::failure(format!(
            "no queue is bound to exchange {exchange} for {event}: no service received the event"
        )),
        other => CliError::failure(format!("cannot dispatch the event: {other}")),
    })?;
    writeln!(std::io::stdout(), "dispatched {event} to exchange {exchange} (confirmed)")?;
    Ok(ExitCode::SUCCESS)
}
