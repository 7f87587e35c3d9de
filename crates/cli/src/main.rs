//! `micro-framework`: the operator's command line for services built with micro-framework
//! (and their Nameko peers): dispatch events, call RPC methods, inspect and replay dead
//! letters, show a service's topology and effective configuration.
//!
//! Every failure is one `error: ...` line on stderr and a non-zero exit code (2 for bad
//! input, 130 for a call interrupted by Ctrl-C, 1 otherwise); credentials are masked
//! everywhere.

mod broker;
mod call;
mod dlq;
mod emit;
mod error;
mod headers;
mod json;
mod names;
mod show_config;
mod table;
mod topology;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::error::CliError;

/// The broker used when neither `--uri` nor `AMQP_URI` is given.
pub const DEFAULT_URI: &str = "amqp://guest:guest@127.0.0.1:5672/";

/// Operate micro-framework and Nameko services over RabbitMQ.
#[derive(Debug, Parser)]
#[command(name = "micro-framework", version, propagate_version = true)]
#[command(after_help = "\
Examples:
  micro-framework emit orders order_paid '{\"id\": 1}'
  micro-framework call math.add --args '[1, 2]'
  micro-framework dlq list evt-orders-order_paid--billing.charge
  micro-framework --uri amqps://ops:secret@mq:5671/prod dlq replay billing_queue --limit 100
  micro-framework show-config --file service.yaml
  micro-framework topology ./target/release/my-service")]
struct Cli {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(subcommand)]
    command: Command,
}

/// Where the broker is.
#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// The broker of emit, call and dlq [default: amqp://guest:***@127.0.0.1:5672/]; their
    /// other settings (RPC_EXCHANGE, RPC_TIMEOUT, PROTOCOL, AMQP_SSL_*, ...) come from the
    /// environment as for a service. For show-config, given on the command line, it replaces
    /// the AMQP_URI of the file or the environment.
    #[arg(
        long,
        global = true,
        env = "AMQP_URI",
        hide_env_values = true,
        default_value = DEFAULT_URI,
        hide_default_value = true
    )]
    pub uri: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Dispatch an event as service SOURCE would (Nameko's `dispatch_event`); an event no
    /// queue receives is an error.
    #[command(after_help = "\
Examples:
  micro-framework emit orders order_paid '{\"id\": 1, \"total\": 9.5}'
  micro-framework emit shop reset null
  cat order.json | micro-framework emit orders order_paid -")]
    Emit(emit::EmitArgs),
    /// Call an RPC method and print its result as JSON.
    #[command(after_help = "\
The result is printed as JSON on stdout. A remote error is printed as
{\"error\": {\"exc_type\": ..., \"value\": ...}} on stdout with exit code 1.

Examples:
  micro-framework call math.add --args '[1, 2]'
  micro-framework call math.add --kwargs '{\"a\": 1, \"b\": 2}' --timeout 5")]
    Call(call::CallArgs),
    /// Inspect, replay or purge the dead letters of a queue (`{queue}.dlq`).
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Show the effective configuration of a service (file or environment), secrets masked.
    #[command(after_help = "\
Without --file the configuration is read from the environment as a service reads it
(SERVICE_NAME is required; AMQP_URI defaults to amqp://guest:***@localhost:5672/, as for a
service). With --file it is the file's, not the environment's: only ${VAR} and
${VAR:default} in the file are substituted from the environment. --uri on the command line
replaces the AMQP_URI of either, which is then not read (the given one is checked as a
service checks it); AMQP_URI in the environment does not replace a file's.

Examples:
  SERVICE_NAME=orders micro-framework show-config
  micro-framework show-config --file config.yaml --format yaml")]
    ShowConfig(ShowConfigArgs),
    /// Print the exchanges, queues and bindings a service binary declares, without serving.
    #[command(after_help = "\
Runs the binary with MF_PRINT_TOPOLOGY=1: a service built with micro-framework then prints
its topology as JSON and exits without connecting to the broker.

Examples:
  micro-framework topology ./target/debug/examples/quickstart
  micro-framework topology --json ./my-service --some-flag")]
    Topology(topology::TopologyArgs),
}

/// The `dlq` subcommands. QUEUE is the work queue or its `.dlq` queue.
#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// One line per dead letter: index, route, error kind, error, attempts, failed at.
    #[command(after_help = "\
Messages are read without being consumed: they stay in the queue, in order. Each row is
printed as its message is read; cells are cut and text from the wire is escaped. On a quorum
queue, RabbitMQ before 4.3 counts each reading as a delivery of every message read, and drops
a message past the queue's delivery-limit (a warning says so): replay or purge rather than
list repeatedly. A connection lost while reading fails the command (exit 1).

Examples:
  micro-framework dlq list evt-orders-order_paid--billing.charge
  micro-framework dlq list evt-orders-order_paid--billing.charge.dlq")]
    List(dlq::QueueArg),
    /// The full dead letters (properties, headers, body) as JSON.
    #[command(after_help = "\
Messages are read without being consumed: they stay in the queue, in order (the queue is
read to its end, --index too). Each is printed as it is read, its body as JSON, text or
base64, as body_encoding says (json, text, base64), with body_size in bytes. Quorum
queues count each reading as for `dlq list`.

Examples:
  micro-framework dlq show evt-orders-order_paid--billing.charge --index 0
  micro-framework dlq show evt-orders-order_paid--billing.charge   # all of them")]
    Show(dlq::ShowArgs),
    /// Publish dead letters back to their original queue, failure headers removed.
    #[command(after_help = "\
Each dead letter is published (confirmed) to the queue in its x-mf-original-queue header
through the default exchange, without its failure headers (x-mf-* but
x-mf-original-user-id and x-mf-original-cc) and retry counters, then removed from the
dead-letter queue. A user_id property (which RabbitMQ refuses from another user) becomes the
header x-mf-original-user-id, a CC header (which would route the copy to more queues)
x-mf-original-cc; BCC is dropped. At most the messages present at the start are replayed.

A Python micro-framework (2.1.1) instance consuming that queue finds no handler for such a
copy (it looks handlers up by the delivery's exchange and routing key) and acks it
unhandled: the message is lost. Stop the micro-framework instances of the queue before
replaying, or replay once only Rust services consume it. Nameko handlers take the copies.

Examples:
  micro-framework dlq replay evt-orders-order_paid--billing.charge
  micro-framework dlq replay evt-orders-order_paid--billing.charge.dlq --limit 10")]
    Replay(dlq::ReplayArgs),
    /// Remove every dead letter of the queue and print how many were removed.
    #[command(after_help = "\
Example:
  micro-framework dlq purge evt-orders-order_paid--billing.charge")]
    Purge(dlq::QueueArg),
}

/// Arguments of `show-config`.
#[derive(Debug, Args)]
struct ShowConfigArgs {
    /// A YAML (.yaml, .yml) or TOML (.toml) configuration file.
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    format: Format,
}

/// Output formats of `show-config`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Pretty-printed JSON.
    Json,
    /// YAML.
    Yaml,
}

fn main() -> ExitCode {
    let cli = match parse() {
        Ok(cli) => cli,
        Err(error) if !error.use_stderr() => {
            // --help and --version
            let _ = error.print();
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("{} (see --help)", one_line(&error.to_string()));
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(error) if error.is_output_closed() => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(error.code)
        }
    }
}

/// The command line, and whether `--uri` is on it (not taken from `AMQP_URI` or the
/// default): `show-config` shows the configuration's own `AMQP_URI` otherwise.
fn parse() -> Result<(Cli, bool), clap::Error> {
    let matches = Cli::command().try_get_matches()?;
    let uri_given = matches.value_source("uri") == Some(ValueSource::CommandLine);
    Ok((Cli::from_arg_matches(&matches)?, uri_given))
}

/// A clap error on one line: the lines before its usage, joined.
fn one_line(rendered: &str) -> String {
    let lines: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .take_while(|line| !line.starts_with("Usage:") && !line.starts_with("For more"))
        .filter(|line| !line.is_empty())
        .collect();
    if lines.is_empty() {
        "error: invalid arguments".to_owned()
    } else {
        lines.join(" ")
    }
}

fn run((cli, uri_given): (Cli, bool)) -> Result<ExitCode, CliError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|error| CliError::failure(format!("cannot start the runtime: {error}")))?;
    let uri = cli.broker.uri;
    // on a worker thread, not on `main`: a header nested thousands of levels deep is converted,
    // printed and dropped recursively, and only spawned threads get the big default stack the
    // library sets (RUST_MIN_STACK); the main thread's stack is fixed when the process starts
    let work = runtime.spawn(async move {
        match cli.command {
            Command::Emit(args) => emit::run(&uri, args).await,
            Command::Call(args) => call::run(&uri, args).await,
            Command::Dlq(DlqCommand::List(args)) => dlq::list(&uri, args).await,
            Command::Dlq(DlqCommand::Show(args)) => dlq::show(&uri, args).await,
            Command::Dlq(DlqCommand::Replay(args)) => dlq::replay(&uri, args).await,
            Command::Dlq(DlqCommand::Purge(args)) => dlq::purge(&uri, args).await,
            Command::ShowConfig(args) => {
                let given = uri_given.then_some(uri.as_str());
                show_config::run(args.file.as_deref(), given, args.format)
            }
            Command::Topology(args) => topology::run(args).await,
        }
    });
    runtime
        .block_on(work)
        .map_err(|error| CliError::failure(format!("the command failed: {error}")))?
}
