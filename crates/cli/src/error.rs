//! [`CliError`]: what went wrong, as the one `error: ...` line the command prints.

use std::fmt;

use micro_framework::config::mask_uri;
use micro_framework::logging::escape_wire_text;

/// A failed command: its message (credentials masked) and exit code.
#[derive(Debug)]
pub struct CliError {
    message: String,
    /// The process exit code: 2 for bad input, 130 when interrupted (128 plus another
    /// signal's number), 1 for anything else, 0 when the reader of the output closed it.
    pub code: u8,
}

impl CliError {
    /// Bad input from the operator (malformed JSON, an unknown format, ...): exit code 2.
    pub fn usage(message: impl Into<String>) -> Self {
        CliError { message: mask_secrets(&message.into()), code: 2 }
    }

    /// Interrupted by Ctrl-C (SIGINT): exit code 130, as a shell reports a command it ended.
    pub fn interrupted(message: impl Into<String>) -> Self {
        CliError { message: format!("interrupted: {}", mask_secrets(&message.into())), code: 130 }
    }

    /// Ended by the signal `name`, number `number` (other than SIGINT): exit code 128 plus
    /// the number, as a shell reports a command the signal ended.
    pub fn signalled(name: &str, number: u8, message: impl Into<String>) -> Self {
        let message = format!("{name}: {}", mask_secrets(&message.into()));
        CliError { message, code: 128 + number }
    }

    /// Anything else (broker down, missing queue, unknown service, ...): exit code 1.
    pub fn failure(message: impl Into<String>) -> Self {
        CliError { message: mask_secrets(&message.into()), code: 1 }
    }

    /// The reader of the output went away (`dlq list q | head -2`): the command stops there,
    /// without a word and with exit code 0. The reader took what it wanted; as `ls | head`
    /// ends silently, an error line would only be noise, and an exit code other than 0 (the
    /// 141 of a process killed by SIGPIPE) would fail a `set -o pipefail` script for what its
    /// author asked for.
    pub fn output_closed() -> Self {
        CliError { message: String::new(), code: 0 }
    }

    /// True when nothing is to be said: the output was closed by its reader.
    pub fn is_output_closed(&self) -> bool {
        self.code == 0
    }
}

impl fmt::Display for CliError {
    /// One line: newlines in the message become spaces, and what else could forge a line or
    /// drive the terminal (the message may quote the wire: a queue name from a header, the
    /// broker's error text) is escaped.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for line in self.message.lines().map(str::trim).filter(|line| !line.is_empty()) {
            if !first {
                f.write_str(" ")?;
            }
            f.write_str(&escape_wire_text(line))?;
            first = false;
        }
        Ok(())
    }
}

impl From<std::io::Error> for CliError {
    /// An output closed by its reader (`EPIPE`: Rust ignores SIGPIPE, so a write to a closed
    /// pipe fails instead of ending the process) is no failure; any other I/O error is.
    fn from(error: std::io::Error) -> Self {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            CliError::output_closed()
        } else {
            CliError::failure(error.to_string())
        }
    }
}

impl From<serde_json::Error> for CliError {
    fn from(error: serde_json::Error) -> Self {
        CliError::failure(format!("cannot write JSON: {error}"))
    }
}

/// Mask the password of every `scheme://user:password@host` URI in `text`.
pub fn mask_secrets(text: &str) -> String {
    text.split_inclusive(char::is_whitespace)
        .map(|word| {
            if !word.contains("://") {
                return word.to_owned();
            }
            let body = word.trim_end();
            let trailing = &word[body.len()..];
            let start = body.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(0);
            let (lead, uri) = body.split_at(start);
            let end = uri.trim_end_matches(['\'', '"', ')', ',', ';', '`']).len();
            let (uri, tail) = uri.split_at(end);
            format!("{lead}{}{tail}{trailing}", mask_uri(uri))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_uris_are_masked() {
        assert_eq!(
            mask_secrets("cannot connect to 'amqp://ops:s3cret@mq:5672/' (refused)"),
            "cannot connect to 'amqp://ops:***@mq:5672/' (refused)"
        );
        assert_eq!(mask_secrets("no uri here"), "no uri here");
        assert_eq!(CliError::failure("a\n  b\n").to_string(), "a b");
        assert_eq!(CliError::failure("a\u{1b}[2J\rb").to_string(), "a\\u{1b}[2J\\rb");
    }

    #[test]
    fn a_closed_output_is_no_failure() {
        let closed = CliError::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(closed.is_output_closed());
        assert_eq!(closed.code, 0);
        let full = CliError::from(std::io::Error::from(std::io::ErrorKind::StorageFull));
        assert!(!full.is_output_closed());
        assert_eq!(full.code, 1);
    }
}
