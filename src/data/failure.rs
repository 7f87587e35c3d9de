//! [`Failure`]: why a call did not succeed, as plain data (it crosses process boundaries and
//! travels in dead-letter headers).

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::data::text::{bounded, MAX_ERROR_TEXT};
use crate::data::BoxError;

/// What kind of failure it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FailureKind {
    /// The message could not be turned into the target's arguments (undecodable body,
    /// wrong shape, translator error). Never retried.
    BadInput,
    /// The target (or a dependency) returned an error.
    Error,
    /// The target panicked.
    Panic,
    /// The call ran past its time limit.
    TimedOut,
    /// The worker running the call died.
    Crashed,
    /// The target's return value could not be serialized.
    Unserializable,
}

impl FailureKind {
    /// The kind's name, as written in dead-letter headers.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::BadInput => "bad_input",
            FailureKind::Error => "error",
            FailureKind::Panic => "panic",
            FailureKind::TimedOut => "timed_out",
            FailureKind::Crashed => "crashed",
            FailureKind::Unserializable => "unserializable",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a call failed. Callback targets receive it as an argument. Shown as its kind, its
/// message and its causes ([`Failure::full_message`]): the message alone may not say what went
/// wrong.
///
/// ```
/// use micro_framework::{Failure, FailureKind};
/// let failure = Failure::bad_input("body is not valid JSON");
/// assert_eq!(failure.kind, FailureKind::BadInput);
/// assert_eq!(failure.to_string(), "bad_input: body is not valid JSON");
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// The kind of failure.
    pub kind: FailureKind,
    /// The Rust type name of the error, when there was one (e.g. `std::io::Error`).
    pub error_type: String,
    /// The error's message.
    pub message: String,
    /// Messages of the error's sources, outermost first.
    pub causes: Vec<String>,
    /// Whether the route's retry policy accepts this failure (bad input never).
    #[serde(default)]
    pub retryable: bool,
}

impl Failure {
    /// A failure of the given kind with a message.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Failure {
            retryable: kind != FailureKind::BadInput,
            kind,
            error_type: String::new(),
            message: bounded_text(message.into()),
            causes: Vec::new(),
        }
    }

    /// Bad input: the message cannot be handled whatever happens.
    pub fn bad_input(message: impl Into<String>) -> Self {
        Failure::new(FailureKind::BadInput, message)
    }

    /// A failure from an error value, keeping its source chain.
    pub fn from_error(error: &BoxError, error_type: &str) -> Self {
        let mut causes = Vec::new();
        let mut source = error.source();
        while let Some(cause) = source {
            causes.push(bounded_text(cause.to_string()));
            source = cause.source();
        }
        Failure {
            kind: FailureKind::Error,
            error_type: error_type.to_owned(),
            message: bounded_text(error.to_string()),
            causes,
            retryable: true,
        }
    }

    /// The failure an error returned by a target or a dependency makes. A [`Failure`] returned
    /// as the error says itself what it is: its kind, and whether it may be retried at all
    /// (bad input never is); its error type is `error_type` when it names none. Any other
    /// error is an [`FailureKind::Error`] of type `error_type`, with its source chain. A
    /// retryable result is then for the route's retry policy to judge.
    pub(crate) fn from_returned(error: &BoxError, error_type: &str) -> Self {
        let Some(made) = error.downcast_ref::<Failure>() else {
            return Failure::from_error(error, error_type);
        };
        let failure = Failure {
            error_type: match made.error_type.is_empty() {
                true => error_type.to_owned(),
                false => made.error_type.clone(),
            },
            causes: made.causes.clone(),
            ..Failure::new(made.kind, made.message.clone())
        };
        let retryable = failure.retryable && made.retryable;
        Failure { retryable, ..failure }
    }

    /// This failure of a route's callback, called back for `target`'s failure: its message
    /// also says why the target failed, causes included (the target's error alone may not
    /// say what went wrong), within the bound of a message.
    pub(crate) fn of_callback_after(self, target: &Failure) -> Self {
        let message =
            format!("callback failed: {} (after: {})", self.message, target.full_message());
        Failure { message: bounded_text(message), ..self }
    }

    /// The message followed by its causes, as one line of at most [`MAX_ERROR_TEXT`] bytes
    /// (plus the note of a cut).
    pub fn full_message(&self) -> String {
        let full = std::iter::once(self.message.as_str())
            .chain(self.causes.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(": ");
        // each part was bounded when made: a message cut then must keep its note of the full
        // size, which cutting it again would replace by the size of the cut text
        bounded_to(full, MAX_ERROR_TEXT + CUT_NOTE)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.full_message())
    }
}

/// Its causes are kept as text, in the message shown: none is a source of its own.
impl std::error::Error for Failure {}

/// Room for the note [`bounded`] appends to a cut text ("… (truncated: N bytes in all)").
const CUT_NOTE: usize = 64;

/// An error text may quote its input (a serde error quotes the bad value): keep at most
/// [`MAX_ERROR_TEXT`] bytes of it.
fn bounded_text(text: String) -> String {
    bounded_to(text, MAX_ERROR_TEXT)
}

fn bounded_to(text: String, limit: usize) -> String {
    match bounded(&text, limit) {
        Cow::Borrowed(_) => text,
        Cow::Owned(cut) => cut,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot save order")]
    struct SaveError(#[source] std::io::Error);

    #[test]
    fn keeps_the_source_chain() {
        let error: BoxError = Box::new(SaveError(std::io::Error::other("disk full")));
        let failure = Failure::from_error(&error, "SaveError");
        assert_eq!(failure.kind, FailureKind::Error);
        assert_eq!(failure.causes, vec!["disk full".to_owned()]);
        assert_eq!(failure.full_message(), "cannot save order: disk full");
    }

    /// What a callback printing `{failure}` shows: the causes too (it showed "error: cannot
    /// save order", without the "disk full" that said what went wrong).
    #[test]
    fn shown_with_its_causes() {
        let error: BoxError = Box::new(SaveError(std::io::Error::other("disk full")));
        let failure = Failure::from_error(&error, "SaveError");
        assert_eq!(failure.to_string(), "error: cannot save order: disk full");
        assert_eq!(Failure::bad_input("not JSON").to_string(), "bad_input: not JSON");
    }

    #[test]
    fn a_failed_callback_says_why_the_target_failed_within_bounds() {
        let error: BoxError = Box::new(SaveError(std::io::Error::other("disk full")));
        let target = Failure::from_error(&error, "SaveError");
        let callback = Failure::new(FailureKind::Panic, "mail server down");
        let failed = callback.of_callback_after(&target);
        assert_eq!(failed.kind, FailureKind::Panic);
        assert_eq!(
            failed.message,
            "callback failed: mail server down (after: cannot save order: disk full)"
        );
        let long = Failure::new(FailureKind::Error, "x".repeat(10_000));
        let failed = long.clone().of_callback_after(&long);
        assert!(failed.message.len() < MAX_ERROR_TEXT + CUT_NOTE, "{}", failed.message.len());
    }

    #[test]
    fn a_cut_message_keeps_its_full_size() {
        let failure = Failure::bad_input("x".repeat(1 << 20));
        let note = format!("(truncated: {} bytes in all)", 1 << 20);
        assert!(failure.message.ends_with(&note), "{}", &failure.message[4000..]);
        assert_eq!(failure.full_message(), failure.message);
        let long_causes = Failure { causes: vec!["y".repeat(10_000)], ..failure };
        assert!(long_causes.full_message().len() < MAX_ERROR_TEXT + 2 * CUT_NOTE);
    }
}
