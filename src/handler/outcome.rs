//! What a target's call ends with: its return value converted by [`IntoOutcome`] into a
//! [`TargetResult`], or why it failed ([`TargetError`], a panic's text).
//!
//! Public through [`targets`](super::targets), which re-exports it.

use std::any::{type_name, Any};
use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use serde_json::Value;

use crate::data::BoxError;
use crate::handler::extract::ExtractError;

/// How a target's call ended, before it becomes an [`Outcome`](crate::data::Outcome).
#[doc(hidden)]
pub type TargetResult = Result<Value, TargetError>;

/// Why a target's call failed.
#[doc(hidden)]
#[derive(Debug)]
#[non_exhaustive]
pub enum TargetError {
    /// An argument could not be extracted.
    Extract(ExtractError),
    /// The target returned an error.
    Error {
        /// The error.
        error: BoxError,
        /// Its Rust type name.
        type_name: &'static str,
    },
    /// The target panicked, with the panic's message.
    Panic(String),
    /// The returned value could not be serialized.
    Unserializable(String),
}

impl From<ExtractError> for TargetError {
    fn from(error: ExtractError) -> Self {
        TargetError::Extract(error)
    }
}

/// A target's return value: `()`, a serializable value, or `Result<T, E>` for any error type.
pub trait IntoOutcome {
    /// Whether the result is an HTTP `Response` (feature `http`): only the result of
    /// a target declared to return one is read as one, so a plain value shaped like a
    /// response (a client's own data, echoed back) stays a value.
    #[doc(hidden)]
    const CARRIES_RESPONSE: bool = false;

    /// The call's result.
    #[doc(hidden)]
    fn into_outcome(self) -> TargetResult;
}

impl IntoOutcome for () {
    fn into_outcome(self) -> TargetResult {
        Ok(Value::Null)
    }
}

impl<T: Serialize, E: Into<BoxError>> IntoOutcome for Result<T, E> {
    fn into_outcome(self) -> TargetResult {
        match self {
            Ok(value) => value.into_outcome_value(),
            Err(error) => {
                Err(TargetError::Error { error: error.into(), type_name: type_name::<E>() })
            }
        }
    }
}

/// Any serializable value, as a target's return value (`Json(my_struct)`), also inside a
/// `Result`, an `Option` or a `Vec`, which it serializes as the value it holds (see
/// [`RunningService`](crate::RunningService)'s example).
#[derive(Clone, Debug, PartialEq)]
pub struct Json<T>(pub T);

impl<T: Serialize> Serialize for Json<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<T: Serialize> IntoOutcome for Json<T> {
    fn into_outcome(self) -> TargetResult {
        self.0.into_outcome_value()
    }
}

trait SerializeOutcome {
    fn into_outcome_value(self) -> TargetResult;
}

impl<T: Serialize> SerializeOutcome for T {
    fn into_outcome_value(self) -> TargetResult {
        serde_json::to_value(self).map_err(|error| TargetError::Unserializable(error.to_string()))
    }
}

macro_rules! value_outcomes {
    ($($ty:ty),*) => {$(
        impl IntoOutcome for $ty {
            fn into_outcome(self) -> TargetResult {
                self.into_outcome_value()
            }
        }
    )*};
}

value_outcomes!(
    Value,
    String,
    &'static str,
    bool,
    i8,
    i16,
    i32,
    i64,
    isize,
    u8,
    u16,
    u32,
    u64,
    usize,
    f32,
    f64
);

impl<T: Serialize> IntoOutcome for Vec<T> {
    fn into_outcome(self) -> TargetResult {
        self.into_outcome_value()
    }
}

impl<T: Serialize> IntoOutcome for Option<T> {
    fn into_outcome(self) -> TargetResult {
        self.into_outcome_value()
    }
}

impl<T: Serialize> IntoOutcome for HashMap<String, T> {
    fn into_outcome(self) -> TargetResult {
        self.into_outcome_value()
    }
}

impl<T: Serialize> IntoOutcome for BTreeMap<String, T> {
    fn into_outcome(self) -> TargetResult {
        self.into_outcome_value()
    }
}

/// The text of a panic payload.
pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}
