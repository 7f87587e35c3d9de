//! `dlq list|show|replay|purge`: the dead letters of a work queue, in `{queue}.dlq`.
//!
//! Reading does not consume: messages are fetched with `basic.get` and held unacknowledged
//! until the command is done; then the connection is closed, so the broker hands them all
//! back to the queue, in their order (no per-message requeue, which quorum queues would count
//! as a failed delivery).

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Args;
use micro_framework::settle::HEADER_ORIGINAL_QUEUE;
use micro_framework::transport::{
    Delivery, HeaderValue, OutgoingMessage, PublishOptions, SharedTransport, TransportError,
};
use serde_json::{Map, Value};

use crate::broker;
use crate::error::CliError;
use crate::headers::{properties_to_json, table_to_json, DeadLetterSummary};
use crate::table;

/// How many replayed messages between two progress lines.
const PROGRESS_EVERY: usize = 100;
/// The widest error shown by `dlq list` (`dlq show` has it whole).
const ERROR_WIDTH: usize = 80;

/// The queue argument of the `dlq` commands.
#[derive(Debug, Args)]
pub struct QueueArg {
    /// The work queue, or its dead-letter queue (`{queue}.dlq`).
    #[arg(value_name = "QUEUE")]
    pub queue: String,
}

/// Arguments of `dlq show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    #[command(flatten)]
    queue: QueueArg,
    /// Show only the dead letter at this index (0 is the oldest), as `dlq list` numbers them.
    #[arg(long, value_name = "N")]
    index: Option<usize>,
}

/// Arguments of `dlq replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    queue: QueueArg,
    /// Replay at most N dead letters, the oldest first.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
}

/// A connection and the dead-letter queue it works on.
struct DeadLetters {
    transport: SharedTransport,
    queue: String,
    count: usize,
}

impl DeadLetters {
    /// Connect and check that the dead-letter queue of `queue` exists.
    async fn open(uri: &str, queue: &str) -> Result<Self, CliError> {
        let queue = if queue.ends_with(".dlq") { queue.to_owned() } else { format!("{queue}.dlq") };
        let config = broker::config(uri, None)?;
        let transport = broker::connect(&config).await?;
        match transport.queue_info(&queue).await {
            Ok(info) => Ok(DeadLetters { transport, queue, count: info.message_count as usize }),
            Err(error) => {
                transport.close().await;
                Err(match error {
                    TransportError::NotFound(_) => {
                        CliError::failure(format!("queue '{queue}' does not exist"))
                    }
                    other => CliError::failure(format!("cannot inspect '{queue}': {other}")),
                })
            }
        }
    }

    /// Fetch up to `max` messages (all when `None`) without settling them.
    async fn peek(&self, max: Option<usize>) -> Result<Vec<Delivery>, CliError> {
        let mut held = Vec::new();
        while max.is_none_or(|max| held.len() < max) {
            match self.transport.get(&self.queue).await {
                Ok(Some(delivery)) => held.push(delivery),
                Ok(None) => break,
                Err(error) => {
                    self.transport.close().await;
                    drop(held);
                    return Err(CliError::failure(format!(
                        "cannot read '{}': {error}",
                        self.queue
                    )));
                }
            }
        }
        Ok(held)
    }

    /// Close the connection; the broker hands `held` (unsettled) back to the queue, in order.
    async fn close(self, held: Vec<Delivery>) {
        self.transport.close().await;
        drop(held);
    }
}

/// `dlq list`: a table of the dead letters.
pub async fn list(uri: &str, args: QueueArg) -> Result<ExitCode, CliError> {
    let dead = DeadLetters::open(uri, &args.queue).await?;
    let held = dead.peek(None).await?;
    let rows: Vec<Vec<String>> = held
        .iter()
        .enumerate()
        .map(|(index, delivery)| {
            let summary = DeadLetterSummary::of(&delivery.properties.headers);
            vec![
                index.to_string(),
                summary.route,
                summary.kind,
                table::cell(&summary.error, ERROR_WIDTH),
                summary.attempts,
                summary.failed_at,
            ]
        })
        .collect();
    let queue = dead.queue.clone();
    dead.close(held).await;
    if rows.is_empty() {
        eprintln!("no dead letters in {queue}");
        return Ok(ExitCode::SUCCESS);
    }
    let header = ["INDEX", "ROUTE", "KIND", "ERROR", "ATTEMPTS", "FAILED_AT"];
    print!("{}", table::render(&header, &rows));
    Ok(ExitCode::SUCCESS)
}

/// `dlq show`: the dead letters (or one) in full, as JSON.
pub async fn show(uri: &str, args: ShowArgs) -> Result<ExitCode, CliError> {
    let dead = DeadLetters::open(uri, &args.queue.queue).await?;
    let held = dead.peek(args.index.map(|index| index + 1)).await?;
    let shown: Vec<Value> = held
        .iter()
        .enumerate()
        .filter(|(index, _)| args.index.is_none_or(|wanted| wanted == *index))
        .map(|(index, delivery)| describe(index, delivery))
        .collect();
    let found = held.len();
    let queue = dead.queue.clone();
    dead.close(held).await;
    let document = match args.index {
        Some(index) => shown.into_iter().next().ok_or_else(|| {
            CliError::failure(format!("{queue} holds {found} dead letters: no index {index}"))
        })?,
        None => Value::Array(shown),
    };
    println!("{}", serde_json::to_string_pretty(&document)?);
    Ok(ExitCode::SUCCESS)
}

/// A dead letter as JSON: where it was published, properties, headers and body (JSON when it
/// is JSON, else text, else bytes).
fn describe(index: usize, delivery: &Delivery) -> Value {
    let body =
        serde_json::from_slice::<Value>(&delivery.body).unwrap_or_else(
            |_| match std::str::from_utf8(&delivery.body) {
                Ok(text) => Value::from(text),
                Err(_) => delivery.body.iter().map(|byte| Value::from(*byte)).collect(),
            },
        );
    let mut described = Map::new();
    described.insert("index".into(), index.into());
    described.insert("exchange".into(), delivery.exchange.clone().into());
    described.insert("routing_key".into(), delivery.routing_key.clone().into());
    described.insert("properties".into(), properties_to_json(&delivery.properties).into());
    described.insert("headers".into(), table_to_json(&delivery.properties.headers).into());
    described.insert("body".into(), body);
    Value::Object(described)
}

/// True for the headers a replay removes: the failure (`x-mf-*`, retry counters included)
/// and the broker's dead-letter history.
fn is_failure_header(key: &str) -> bool {
    key.starts_with("x-mf-")
        || key.starts_with("x-first-death-")
        || key.starts_with("x-last-death-")
        || key == "x-death"
        || key == "x-delivery-count"
}

/// `dlq replay`: publish each dead letter back to its original queue, then remove it.
pub async fn replay(uri: &str, args: ReplayArgs) -> Result<ExitCode, CliError> {
    let dead = DeadLetters::open(uri, &args.queue.queue).await?;
    // only the messages there now: a replayed message that fails again is not replayed twice
    let total = args.limit.map_or(dead.count, |limit| limit.min(dead.count));
    let progress = Progress::new(total);
    let (mut replayed, mut orphans, mut held) = (0, 0, Vec::new());
    let mut failure = None;
    for _ in 0..total {
        let delivery = match dead.transport.get(&dead.queue).await {
            Ok(Some(delivery)) => delivery,
            Ok(None) => break,
            Err(error) => {
                failure = Some(format!("cannot read '{}': {error}", dead.queue));
                break;
            }
        };
        let Some(original) =
            delivery.properties.headers.get(HEADER_ORIGINAL_QUEUE).and_then(HeaderValue::as_str)
        else {
            orphans += 1;
            held.push(delivery);
            continue;
        };
        let original = original.to_owned();
        let mut properties = delivery.properties.clone();
        properties.headers.retain(|key, _| !is_failure_header(key));
        let message = OutgoingMessage { body: delivery.body.clone(), properties };
        let options = PublishOptions { mandatory: true };
        if let Err(error) = dead.transport.publish("", &original, message, options).await {
            held.push(delivery);
            failure = Some(format!("cannot publish to '{original}': {error}"));
            break;
        }
        if let Err(error) = delivery.acker.ack().await {
            failure = Some(format!(
                "replayed a message to '{original}' but cannot remove it from '{}' ({error}): \
                 it may be replayed twice",
                dead.queue
            ));
            break;
        }
        replayed += 1;
        progress.update(replayed);
    }
    progress.finish(replayed);
    let queue = dead.queue.clone();
    dead.close(held).await;
    println!("replayed {replayed} of {total} dead letters from {queue}");
    if let Some(failure) = failure {
        return Err(CliError::failure(format!("replay stopped after {replayed}: {failure}")));
    }
    if orphans > 0 {
        return Err(CliError::failure(format!(
            "{orphans} dead letters have no {HEADER_ORIGINAL_QUEUE} header and stay in {queue}"
        )));
    }
    Ok(ExitCode::SUCCESS)
}

/// Progress of a long replay on stderr: `replayed 120/500`.
struct Progress {
    total: usize,
    terminal: bool,
}

impl Progress {
    fn new(total: usize) -> Self {
        Progress { total, terminal: std::io::stderr().is_terminal() }
    }

    fn update(&self, done: usize) {
        if self.total < PROGRESS_EVERY || done % PROGRESS_EVERY != 0 || done == self.total {
            return;
        }
        let mut stderr = std::io::stderr().lock();
        let _ = if self.terminal {
            write!(stderr, "\rreplayed {done}/{}", self.total)
        } else {
            writeln!(stderr, "replayed {done}/{}", self.total)
        };
        let _ = stderr.flush();
    }

    fn finish(&self, done: usize) {
        if self.total < PROGRESS_EVERY {
            return;
        }
        let end = if self.terminal { "\r" } else { "" };
        eprintln!("{end}replayed {done}/{}", self.total);
    }
}

/// `dlq purge`: remove every dead letter and print how many.
pub async fn purge(uri: &str, args: QueueArg) -> Result<ExitCode, CliError> {
    let dead = DeadLetters::open(uri, &args.queue).await?;
    let purged = dead.transport.purge_queue(&dead.queue).await;
    let queue = dead.queue.clone();
    dead.close(Vec::new()).await;
    let purged =
        purged.map_err(|error| CliError::failure(format!("cannot purge '{queue}': {error}")))?;
    println!("purged {purged} dead letters from {queue}");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_drop_failure_headers_only() {
        for key in ["x-mf-error", "x-mf-retry-count", "x-mf-redeliveries", "x-death"] {
            assert!(is_failure_header(key), "{key}");
        }
        for key in ["nameko.call_id_stack", "x-custom", "x-mfa"] {
            assert!(!is_failure_header(key), "{key}");
        }
    }
}
