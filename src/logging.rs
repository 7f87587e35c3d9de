//! Default log output for services started with [`Runner::start`](crate::Runner::start), and
//! the helpers that make text from the wire safe to log or print.

use std::io::{self, Write};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;
pub use crate::data::{bounded, escape_wire_text, MAX_ERROR_TEXT};

/// Install a stderr logger filtered by `RUST_LOG` (default `info`): readable lines, or one
/// JSON object per line (with the `call` span's service, route and call ids) for
/// `LOG_FORMAT=json`. Does nothing if the program installed a `tracing` subscriber already.
///
/// Text from the wire (routing keys, error texts quoting a bad body, WebSocket frames) cannot
/// forge a line: in readable lines every control or invisible formatting character is
/// escaped (see [`escape_wire_text`]), so one event is always one line (and colours are off,
/// as an escape sequence would be escaped too); JSON lines escape control characters anyway.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(false).with_writer(OneLinePerEvent).try_init(),
        LogFormat::Json => {
            builder.with_writer(io::stderr).json().with_current_span(true).try_init()
        }
    };
}

/// Writes each formatted event to stderr with its text escaped, keeping only the final
/// newline.
struct OneLinePerEvent;

impl<'a> MakeWriter<'a> for OneLinePerEvent {
    type Writer = EscapingWriter;

    fn make_writer(&'a self) -> Self::Writer {
        EscapingWriter
    }
}

struct EscapingWriter;

impl Write for EscapingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        io::stderr().lock().write_all(escape_event(buf).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// One formatted event (the formatter writes each in one call) as one escaped line.
fn escape_event(buf: &[u8]) -> String {
    let text = String::from_utf8_lossy(buf);
    let (line, newline) = match text.strip_suffix('\n') {
        Some(line) => (line, "\n"),
        None => (text.as_ref(), ""),
    };
    format!("{}{newline}", escape_wire_text(line))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_stays_one_line() {
        let event = b"INFO route: bad key a\nERROR forged \x1b[2J\n";
        assert_eq!(escape_event(event), "INFO route: bad key a\\nERROR forged \\u{1b}[2J\n");
    }
}
