//! The names the CLI sends as AMQP short strings (exchange, queue, routing key): checked
//! before connecting, so that an over-long one is bad input (exit code 2), not a failure the
//! connection reports (exit code 1).

use crate::error::CliError;

/// The most bytes an AMQP short string holds.
pub const MAX_SHORT_STRING: usize = 255;

/// Refuse `name` (described as `what`, e.g. "the routing key") over [`MAX_SHORT_STRING`]
/// bytes, quoting only its start.
pub fn check(what: &str, name: &str) -> Result<(), CliError> {
    if name.len() <= MAX_SHORT_STRING {
        return Ok(());
    }
    let start: String = name.chars().take(32).collect();
    Err(CliError::usage(format!(
        "{what} '{start}...' is {} bytes long: AMQP allows at most {MAX_SHORT_STRING} bytes",
        name.len()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_over_255_bytes_are_usage_errors() {
        assert!(check("the queue", &"é".repeat(127)).is_ok());
        let error = check("the queue", &"é".repeat(128)).unwrap_err();
        assert_eq!(error.code, 2);
        assert!(error.to_string().contains("is 256 bytes long"), "{error}");
    }
}
