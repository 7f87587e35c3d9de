//! `dlq list|show|replay|purge`: the dead letters of a work queue, in `{queue}.dlq`.
//!
//! `list` and `show` read without consuming: [`reader`] holds each message read and hands
//! them all back, in order, when the command ends (on a quorum queue before RabbitMQ 4.3 that
//! counts a delivery of each: see [`reader`]). A lost connection fails them, and a reader
//! closing their output ends them quietly, the messages handed back all the same.

mod body;
mod reader;

use std::io::{IsTerminal, Write};
use std::num::NonZeroUsize;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Args;
use micro_framework::logging::bounded;
use micro_framework::settle::{
    mark_first_route, set_aside_routing_headers, HEADER_HEADERS_DROPPED, HEADER_ORIGINAL_CC,
    HEADER_ORIGINAL_EXCHANGE, HEADER_ORIGINAL_QUEUE, HEADER_ORIGINAL_ROUTING_KEY,
    HEADER_ORIGINAL_USER_ID,
};
use micro_framework::transport::{HeaderValue, OutgoingMessage, Properties, PublishOptions};
use serde_json::{Map, Value};

use self::reader::{lost_while_reading, DeadLetter, DeadLetters, HandBack};
use crate::error::CliError;
use crate::headers::{properties_to_json, table_to_json, DeadLetterSummary};
use crate::{json, names, table};

/// How many replayed messages between two progress lines.
const PROGRESS_EVERY: usize = 100;
/// The longest error shown by `dlq list`, in bytes (`dlq show` has it whole).
const ERROR_WIDTH: usize = 80;
/// The longest other cell of `dlq list`, in bytes.
const CELL_WIDTH: usize = 64;
/// The columns of `dlq list` and their widths: rows are printed as they are read, before
/// the widest cell is known (a longer cell pushes the next ones of its row right).
const COLUMNS: [(&str, usize); 6] =
    [("INDEX", 5), ("ROUTE", 24), ("KIND", 12), ("ERROR", 48), ("ATTEMPTS", 8), ("FAILED_AT", 20)];

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
    /// Replay at most N dead letters (at least 1), the oldest first.
    #[arg(long, value_name = "N")]
    limit: Option<NonZeroUsize>,
}

/// End a read-only command: hand the messages back, then report, in this order of
/// precedence, a closed output (quietly), a failure of the read, a connection lost after
/// the last read (the output may be wrong: see [`lost_while_reading`]).
async fn finish<T>(dead: DeadLetters, read: Result<T, CliError>) -> Result<T, CliError> {
    let (queue, held) = (dead.queue().to_owned(), dead.held());
    let handed_back = dead.close().await;
    let read = read?;
    match handed_back {
        HandBack::InOrder => Ok(read),
        HandBack::ByTheBroker => Err(lost_while_reading(&queue, held)),
    }
}

/// Ctrl-C, caught so that a command ends cleanly: it is checked between dead letters, never
/// in the middle of one (a replay finishes the copy and removal it began, so nothing is
/// replayed twice), and the dead letters held are handed back in their order, as at a normal
/// end (a process killed midway leaves the broker to return them channel by channel, which
/// reorders a quorum queue). A second Ctrl-C exits at once.
#[derive(Clone, Debug)]
struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    fn watch() -> Interrupt {
        let pressed = Arc::new(AtomicBool::new(false));
        let set = pressed.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                set.store(true, Ordering::SeqCst);
                eprintln!(
                    "interrupted: handing the dead letters back in their order \
                     (Ctrl-C again to quit at once, which may reorder a quorum queue)"
                );
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        });
        Interrupt(pressed)
    }

    fn pressed(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Ctrl-C during `list` or `show`, `done` (`listed 12`) so far: the rest of the queue read and
/// held, so that [`DeadLetters::close`] hands every dead letter back in order (a quorum queue
/// puts those handed back after those never read); the error that says how far it went.
async fn stop_reading(dead: &mut DeadLetters, done: &str) -> CliError {
    loop {
        match dead.read().await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(error) => return error,
        }
    }
    let (total, queue) = (dead.held(), dead.queue());
    CliError::interrupted(format!(
        "{done} of {total} dead letters; all are back in {queue} in their order"
    ))
}

/// `dlq list`: a table of the dead letters, a row printed as each is read.
pub async fn list(uri: &str, args: QueueArg) -> Result<ExitCode, CliError> {
    let interrupt = Interrupt::watch();
    let mut dead = DeadLetters::open(uri, &args.queue).await?;
    let queue = dead.queue().to_owned();
    let listed = list_rows(&mut dead, &interrupt).await;
    if finish(dead, listed).await? == 0 {
        eprintln!("no dead letters in {queue}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Print the table (its header first, when there is a dead letter); how many rows.
async fn list_rows(dead: &mut DeadLetters, interrupt: &Interrupt) -> Result<usize, CliError> {
    let mut widths = COLUMNS.map(|(_, width)| width);
    widths[0] = widths[0].max(dead.count().saturating_sub(1).to_string().len());
    let mut stdout = std::io::stdout();
    while let Some(letter) = dead.read().await? {
        if interrupt.pressed() {
            let done = format!("listed {}", letter.index);
            return Err(stop_reading(dead, &done).await);
        }
        if letter.index == 0 {
            let header = COLUMNS.map(|(name, _)| name.to_owned());
            stdout.write_all(table::line(&header, &widths).as_bytes())?;
        }
        let summary = DeadLetterSummary::of(&letter.properties.headers);
        let row = [
            letter.index.to_string(),
            table::cell(&summary.route, CELL_WIDTH),
            table::cell(&summary.kind, CELL_WIDTH),
            table::cell(&summary.error, ERROR_WIDTH),
            table::cell(&summary.attempts, CELL_WIDTH),
            table::cell(&summary.failed_at, CELL_WIDTH),
        ];
        stdout.write_all(table::line(&row, &widths).as_bytes())?;
    }
    Ok(dead.held())
}

/// `dlq show`: the dead letters (or one) in full, as JSON, each printed as it is read.
pub async fn show(uri: &str, args: ShowArgs) -> Result<ExitCode, CliError> {
    let interrupt = Interrupt::watch();
    let mut dead = DeadLetters::open(uri, &args.queue.queue).await?;
    let queue = dead.queue().to_owned();
    let shown = show_letters(&mut dead, args.index, &interrupt).await;
    let found = finish(dead, shown).await?;
    match args.index {
        Some(index) if index >= found => {
            Err(CliError::failure(format!("{queue} holds {found} dead letters: no index {index}")))
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// Print the dead letter at `index`, or all as a JSON array; how many read.
///
/// The queue is read to its end even for one dead letter: a quorum queue delivers the
/// messages handed back after those it holds never delivered, or handed back before them,
/// so handing back the first few only would move them behind the rest.
async fn show_letters(
    dead: &mut DeadLetters,
    index: Option<usize>,
    interrupt: &Interrupt,
) -> Result<usize, CliError> {
    let mut stdout = std::io::stdout();
    while let Some(letter) = dead.read().await? {
        let read = letter.index;
        if interrupt.pressed() {
            return Err(stop_reading(dead, &format!("read {read}")).await);
        }
        // the JSON value is dropped before the text is written: one of them at a time
        let text = match index {
            // an element of the array, indented as `serde_json` pretty-prints one
            None => json::pretty(&describe(letter), 1)?,
            Some(wanted) if wanted == read => json::pretty(&describe(letter), 0)?,
            Some(_) => continue,
        };
        match index {
            None => write!(stdout, "{}{text}", if read == 0 { "[\n  " } else { ",\n  " })?,
            Some(_) => writeln!(stdout, "{text}")?,
        }
    }
    if index.is_none() {
        writeln!(stdout, "{}", if dead.held() == 0 { "[]" } else { "\n]" })?;
    }
    Ok(dead.held())
}

/// A dead letter as JSON: where it was published, properties, headers and body (see
/// [`body::insert`]).
fn describe(letter: DeadLetter) -> Value {
    let mut described = Map::new();
    described.insert("index".into(), letter.index.into());
    described.insert("exchange".into(), letter.exchange.into());
    described.insert("routing_key".into(), letter.routing_key.into());
    described.insert("properties".into(), properties_to_json(&letter.properties).into());
    described.insert("headers".into(), table_to_json(&letter.properties.headers).into());
    body::insert(&mut described, &letter.body);
    Value::Object(described)
}

/// True for the headers a replay removes: the failure (`x-mf-*`, retry counters included)
/// and the broker's dead-letter history. The original `user_id` and `CC` stay: they say who
/// sent it and to whom.
fn is_failure_header(key: &str) -> bool {
    (key.starts_with("x-mf-") && key != HEADER_ORIGINAL_USER_ID && key != HEADER_ORIGINAL_CC)
        || key.starts_with("x-first-death-")
        || key.starts_with("x-last-death-")
        || key == "x-death"
        || key == "x-delivery-count"
}

/// The properties of the replayed copy of a dead letter: failure headers removed, the
/// `user_id` (which RabbitMQ would refuse from another user) moved to a header, and the routing
/// headers `CC` and `BCC` set aside (they would route the copy to other queues too).
fn replay_properties(dead_letter: &Properties) -> Properties {
    let mut properties = dead_letter.clone();
    properties.headers.retain(|key, _| !is_failure_header(key));
    set_aside_routing_headers(&mut properties.headers);
    if let Some(user_id) = properties.user_id.take() {
        properties.headers.insert(HEADER_ORIGINAL_USER_ID.into(), HeaderValue::from(user_id));
    }
    properties
}

/// `dlq replay`: publish each dead letter back to its original queue, then remove it.
pub async fn replay(uri: &str, args: ReplayArgs) -> Result<ExitCode, CliError> {
    let interrupt = Interrupt::watch();
    let mut dead = DeadLetters::open(uri, &args.queue.queue).await?;
    // only the messages there now: a replayed message that fails again is not replayed twice
    let total = args.limit.map_or(dead.count(), |limit| limit.get().min(dead.count()));
    let progress = Progress::new(total);
    let (mut replayed, mut orphans, mut headless) = (0, 0, 0);
    let mut failure = None;
    for _ in 0..total {
        if interrupt.pressed() {
            break;
        }
        let delivery = match dead.take().await {
            Ok(Some(delivery)) => delivery,
            Ok(None) => break,
            Err(error) => {
                failure = Some(error.to_string());
                break;
            }
        };
        let Some(original) =
            delivery.properties.headers.get(HEADER_ORIGINAL_QUEUE).and_then(HeaderValue::as_str)
        else {
            orphans += 1;
            dead.hold(delivery.acker);
            continue;
        };
        let original = original.to_owned();
        let mut properties = replay_properties(&delivery.properties);
        let first = |name| delivery.properties.headers.get(name).and_then(HeaderValue::as_str);
        if let (Some(exchange), Some(routing_key)) =
            (first(HEADER_ORIGINAL_EXCHANGE), first(HEADER_ORIGINAL_ROUTING_KEY))
        {
            // its handler reads the route it was first published with, not its queue's name
            mark_first_route(&mut properties.headers, exchange, routing_key);
        }
        let dropped_headers = delivery.properties.headers.contains_key(HEADER_HEADERS_DROPPED);
        let message = OutgoingMessage { body: delivery.body.clone(), properties };
        let options = PublishOptions { mandatory: true };
        if let Err(error) = dead.transport().publish("", &original, message, options).await {
            dead.hold(delivery.acker);
            // the name is from the wire: it may be anything, of any length
            let original = bounded(&original, names::MAX_SHORT_STRING);
            failure = Some(format!("cannot publish to '{original}': {error}"));
            break;
        }
        if let Err(error) = delivery.acker.ack().await {
            failure = Some(format!(
                "replayed a message to '{}' but cannot remove it from '{}' ({error}): \
                 it may be replayed twice",
                bounded(&original, names::MAX_SHORT_STRING),
                dead.queue()
            ));
            break;
        }
        replayed += 1;
        headless += usize::from(dropped_headers);
        progress.update(replayed);
    }
    progress.finish(replayed);
    // A quorum queue delivers the messages handed back after those never read: with dead
    // letters held (stopped early, orphans, a limit), the rest is read and held too, so that
    // all go back in their order, as `list` and `show` leave them.
    if dead.held() > 0 {
        loop {
            match dead.read().await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(error) => {
                    failure.get_or_insert(error.to_string());
                    break;
                }
            }
        }
    }
    let queue = dead.queue().to_owned();
    // the dead letters left, if any, go back whichever way: nothing in the output depends on it
    let _ = dead.close().await;
    if headless > 0 {
        // the framework dead-lettered these without their headers, which did not fit in a frame
        // with its own: their handlers get the body and properties alone
        eprintln!(
            "warning: {headless} of the dead letters replayed had lost their original headers \
             when dead-lettered ({HEADER_HEADERS_DROPPED}): they were replayed without them"
        );
    }
    let reported =
        writeln!(std::io::stdout(), "replayed {replayed} of {total} dead letters from {queue}");
    if let Some(failure) = failure {
        return Err(CliError::failure(format!("replay stopped after {replayed}: {failure}")));
    }
    if interrupt.pressed() {
        // each dead letter replayed was removed once its copy was confirmed: none twice
        return Err(CliError::interrupted(format!(
            "replayed {replayed} of {total}; the others stay in {queue}"
        )));
    }
    if orphans > 0 {
        return Err(CliError::failure(format!(
            "{orphans} dead letters have no {HEADER_ORIGINAL_QUEUE} header and stay in {queue}"
        )));
    }
    reported?;
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
        if self.total < PROGRESS_EVERY || !done.is_multiple_of(PROGRESS_EVERY) || done == self.total
        {
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
    let purged = dead.transport().purge_queue(dead.queue()).await;
    let queue = dead.queue().to_owned();
    // nothing held, nothing to hand back
    let _ = dead.close().await;
    let purged =
        purged.map_err(|error| CliError::failure(format!("cannot purge '{queue}': {error}")))?;
    writeln!(std::io::stdout(), "purged {purged} dead letters from {queue}")?;
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
        let kept = ["nameko.call_id_stack", "x-custom", "x-mfa"];
        for key in kept.into_iter().chain([HEADER_ORIGINAL_USER_ID, HEADER_ORIGINAL_CC]) {
            assert!(!is_failure_header(key), "{key}");
        }
    }

    #[test]
    fn replays_move_the_user_id_to_a_header() {
        let mut dead_letter = Properties { user_id: Some("alice".into()), ..Properties::default() };
        dead_letter.headers.insert("x-mf-error".into(), HeaderValue::from("boom"));
        let copy = replay_properties(&dead_letter);
        assert_eq!(copy.user_id, None);
        assert_eq!(copy.headers.get(HEADER_ORIGINAL_USER_ID), Some(&HeaderValue::from("alice")));
        assert!(!copy.headers.contains_key("x-mf-error"));
        // a copy of a copy keeps the first sender
        assert_eq!(replay_properties(&copy).headers, copy.headers);
    }

    #[test]
    fn replays_carry_no_cc_or_bcc_and_keep_the_original_cc() {
        let cc = HeaderValue::Array(vec![HeaderValue::from("jobs2")]);
        let mut dead_letter = Properties::default();
        dead_letter.headers.insert("CC".into(), cc.clone());
        dead_letter.headers.insert("BCC".into(), HeaderValue::Array(vec!["jobs3".into()]));
        let copy = replay_properties(&dead_letter);
        assert!(!copy.headers.contains_key("CC"), "{:?}", copy.headers);
        assert!(!copy.headers.contains_key("BCC"), "{:?}", copy.headers);
        assert_eq!(copy.headers.get(HEADER_ORIGINAL_CC), Some(&cc));
        assert_eq!(replay_properties(&copy).headers, copy.headers);
    }
}
