//! Default log output for services started with [`Runner::start`](crate::Runner::start), and
//! the helpers that make text from the wire safe to log or print.

use std::borrow::Cow;
use std::io::{self, IsTerminal, Write};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;
pub use crate::data::text::{bounded, escape_wire_text, MAX_ERROR_TEXT};

/// Install a stderr logger filtered by `RUST_LOG` (default `info`): readable lines, or one
/// JSON object per line (with the `call` span's service, route and call ids) for
/// `LOG_FORMAT=json`. Does nothing if the program installed a `tracing` subscriber already.
///
/// Text from the wire (routing keys, error texts quoting a bad body, WebSocket frames) cannot
/// forge a line: in readable lines every control or invisible formatting character is
/// escaped (see [`escape_wire_text`]), so one event is always one line; JSON lines escape
/// control characters anyway. Readable lines are coloured only on a terminal, and never with
/// `NO_COLOR` set: a file or a log collector gets plain text. Lines that cannot be written
/// (stderr closed) are dropped, and the service goes on.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let filter = quiet_returned_messages(filter, std::env::var("RUST_LOG").ok().as_deref());
    // A log line that cannot be written (stderr a pipe whose reader is gone: a log shipper
    // restarted, `| tee` killed) is dropped. tracing-subscriber would report it with
    // `eprintln!`, which panics on that same stderr: in whatever thread or task logged, the
    // signal watcher's included, so a SIGTERM no longer stopped the service.
    let builder = tracing_subscriber::fmt().with_env_filter(filter).log_internal_errors(false);
    let _ = match format {
        LogFormat::Text => {
            let colours = colours(io::stderr().is_terminal(), std::env::var_os("NO_COLOR"));
            builder.with_ansi(colours).with_writer(OneLinePerEvent { colours }).try_init()
        }
        LogFormat::Json => {
            builder.with_writer(io::stderr).json().with_current_span(true).try_init()
        }
    };
}

/// Where lapin logs, at `WARN`, every message the broker returned as unroutable.
const RETURNED_MESSAGES: &str = "lapin::returned_messages";

/// `filter` without lapin's warning about each returned message, unless `rust_log` names
/// its target: the warning holds the whole message, headers and body (an RPC request to a
/// service that is not there: its arguments), where the logs never hold either; the
/// transport reports the return itself (an RPC call fails with `UnknownService`).
fn quiet_returned_messages(filter: EnvFilter, rust_log: Option<&str>) -> EnvFilter {
    if rust_log.is_some_and(|directives| directives.contains(RETURNED_MESSAGES)) {
        return filter;
    }
    match format!("{RETURNED_MESSAGES}=error").parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

/// Colours on a terminal unless `NO_COLOR` is set to anything but nothing (no-color.org).
fn colours(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|value| value.is_empty())
}

/// Writes each formatted event to stderr with its text escaped, keeping only the final
/// newline (and, with colours, the formatter's escape sequences: it escapes those in the
/// events' own texts itself).
struct OneLinePerEvent {
    colours: bool,
}

impl<'a> MakeWriter<'a> for OneLinePerEvent {
    type Writer = EscapingWriter;

    fn make_writer(&'a self) -> Self::Writer {
        EscapingWriter { colours: self.colours }
    }
}

struct EscapingWriter {
    colours: bool,
}

impl Write for EscapingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        io::stderr().lock().write_all(escape_event(buf, self.colours).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// One formatted event (the formatter writes each in one call) as one escaped line; the
/// event itself, uncopied, when nothing in it needs escaping (the usual case).
fn escape_event(buf: &[u8], colours: bool) -> Cow<'_, str> {
    let text = String::from_utf8_lossy(buf);
    let (line, newline) = match text.strip_suffix('\n') {
        Some(line) => (line, "\n"),
        None => (text.as_ref(), ""),
    };
    if !colours {
        return match escape_wire_text(line) {
            Cow::Borrowed(_) => text,
            Cow::Owned(escaped) => Cow::Owned(escaped + newline),
        };
    }
    let escaped: Vec<_> = line.split('\u{1b}').map(escape_wire_text).collect();
    Cow::Owned(format!("{}{newline}", escaped.join("\u{1b}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_stays_one_line() {
        let event = b"INFO route: bad key a\nERROR forged \x1b[2J\n";
        let plain = escape_event(event, false);
        assert_eq!(plain, "INFO route: bad key a\\nERROR forged \\u{1b}[2J\n");
        // with colours the formatter's own sequences stay (it escapes the events' texts)
        let coloured = escape_event(b"\x1b[32mINFO\x1b[0m key a\nb\n", true);
        assert_eq!(coloured, "\x1b[32mINFO\x1b[0m key a\\nb\n");
    }

    #[test]
    fn returned_messages_are_quiet_unless_rust_log_names_them() {
        let quiet = quiet_returned_messages(EnvFilter::new("info"), Some("info"));
        assert!(quiet.to_string().contains("lapin::returned_messages=error"), "{quiet}");
        let named = "info,lapin::returned_messages=warn";
        let kept = quiet_returned_messages(EnvFilter::new(named), Some(named));
        assert!(!kept.to_string().contains("=error"), "{kept}");
    }

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(colours(true, None));
        assert!(colours(true, Some("".into())));
        assert!(!colours(true, Some("1".into())));
        assert!(!colours(false, None));
    }
}
