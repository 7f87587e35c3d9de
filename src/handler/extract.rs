//! Extractors: how a target's parameters are taken from the [`WorkerContext`].
//!
//! Every parameter type of a target implements [`FromContext`]. Built in: [`Payload<T>`] (the
//! payload deserialized with serde), [`RawBody`], [`MessageHeaders`], [`Message`],
//! [`CallContext`], `Arc<Config>`, [`Failure`] (callbacks only), [`Dep<T>`](crate::Dep) and the
//! AMQP dependencies such as `Producer`.
//!
//! [`FromContext::check`] runs when the service starts, so a parameter that can never be
//! provided stops the start, not the first message.

use std::any::TypeId;
use std::sync::Arc;

use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::config::Config;
use crate::data::CallContext;
use crate::data::Failure;
use crate::data::Message;
use crate::data::{kombu_types_as_text, may_hold_kombu_types};
use crate::data::{BackOffData, TargetRole};
use crate::handler::named_fields::fills_named_fields;
use crate::handler::WorkerContext;
use crate::transport::Headers;

/// Why an argument could not be extracted.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ExtractError {
    /// The message does not fit the parameter (bad input: dead-lettered, never retried).
    #[error("{0}")]
    BadInput(String),
    /// The parameter cannot be provided for this call (a failure).
    #[error("{0}")]
    Unavailable(String),
}

/// Why a parameter can never be provided on a route ([`FromContext::check`]): the service
/// does not start.
///
/// ```
/// use micro_framework::extract::TargetSetup;
/// use micro_framework::{ExtractError, FromContext, SetupError, TargetRole, WorkerContext};
///
/// /// What failed, as text: a callback's parameter.
/// struct Reason(String);
///
/// impl FromContext for Reason {
///     fn from_context(ctx: &WorkerContext) -> Result<Self, ExtractError> {
///         let failure = ctx.failure().ok_or(ExtractError::Unavailable("not called back".into()))?;
///         Ok(Reason(failure.to_string()))
///     }
///
///     fn check(setup: &TargetSetup) -> Result<(), SetupError> {
///         match setup.role {
///             TargetRole::Callback => Ok(()),
///             TargetRole::Target => Err(SetupError::new("Reason is only given to a callback")),
///         }
///     }
/// }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct SetupError {
    reason: String,
}

impl SetupError {
    /// An error that says why.
    pub fn new(reason: impl Into<String>) -> Self {
        SetupError { reason: reason.into() }
    }

    /// Why the parameter cannot be provided.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl From<String> for SetupError {
    fn from(reason: String) -> Self {
        SetupError { reason }
    }
}

impl From<&str> for SetupError {
    fn from(reason: &str) -> Self {
        SetupError::new(reason)
    }
}

/// What [`FromContext::check`] sees of the route when the service starts.
#[derive(Clone, Debug)]
pub struct TargetSetup {
    /// The route's name.
    pub route: String,
    /// Whether the checked function is the route's target or its callback.
    pub role: TargetRole,
    pub(crate) provided: Vec<TypeId>,
    /// The entrypoint, described, when what it hands the route is never a call with
    /// arguments (an event's payload, a timer's firing): `Args` is refused there.
    pub(crate) no_call_arguments: Option<String>,
}

impl TargetSetup {
    /// True when a dependency of the route provides values of this type.
    pub fn provides(&self, type_id: TypeId) -> bool {
        self.provided.contains(&type_id)
    }
}

/// A type that can be taken from a call's context, to be a target's parameter.
///
/// ```
/// use micro_framework::{FromContext, ExtractError, WorkerContext};
///
/// /// The user id from the `nameko.user_id` context header.
/// struct UserId(Option<i64>);
///
/// impl FromContext for UserId {
///     fn from_context(ctx: &WorkerContext) -> Result<Self, ExtractError> {
///         Ok(UserId(ctx.call().data.get("user_id").and_then(|v| v.as_i64())))
///     }
/// }
/// ```
///
/// A parameter type that is not an extractor is refused at compile time, with a note that
/// lists what can be extracted:
///
/// ```compile_fail
/// use micro_framework::prelude::*;
/// struct NotAnExtractor;
/// fn target(_: NotAnExtractor) {}
/// let _ = Route::new(target);
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a parameter of a target",
    label = "not an extractor",
    note = "a target's parameters implement `FromContext`: `Payload<T>`, `RawBody`, \
            `MessageHeaders`, `Message`, `CallContext`, `Arc<Config>`, `BackOffData`, \
            `Failure` (callbacks), `Dep<T>` (a dependency's output), `Producer`, `RpcProxy`, \
            `Args<T>` (RPC and WebSocket), `Path<T>`, `Query<T>`, `HttpRequest` (HTTP), or a \
            type of yours that implements `FromContext`"
)]
pub trait FromContext: Sized + Send + 'static {
    /// Take the value from the context of a call.
    fn from_context(ctx: &WorkerContext) -> Result<Self, ExtractError>;

    /// Whether the value can ever be provided on this route; checked at start-up, where an
    /// error stops the service (see [`SetupError`]).
    fn check(_setup: &TargetSetup) -> Result<(), SetupError> {
        Ok(())
    }
}

/// The payload, deserialized into `T` (use `serde_json::Value` to take anything).
///
/// A value kombu (5.3 and later) wrote as a typed envelope, `{"__type__": "datetime",
/// "__value__": "2026-01-02T03:04:05"}` (a Python `datetime`, `date`, `time`, `Decimal`,
/// `UUID` or `bytes`), reads as its text (`"2026-01-02T03:04:05"`).
///
/// ```
/// use micro_framework::Payload;
/// #[derive(serde::Deserialize)]
/// struct Order { id: u64 }
/// fn handle(Payload(order): Payload<Order>) -> u64 { order.id }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Payload<T>(pub T);

impl<T: DeserializeOwned + Send + 'static> FromContext for Payload<T> {
    fn from_context(ctx: &WorkerContext) -> Result<Self, ExtractError> {
        // Straight from the body, with no JSON value built in between, unless the payload
        // was decoded already (translated, or asked for). On any error the value's path
        // below runs again, so that what is accepted and how a refusal reads stay the same
        // (a struct given a key twice: a value keeps the last, the struct alone refuses it).
        // A body with kombu's typed envelopes takes the value's path, where they read as text.
        let body = &ctx.message().body;
        if !ctx.payload_decoded() && !may_hold_kombu_types(body) {
            if let Ok(payload) = ctx.message().decode_into::<T>() {
                let array = body.trim_ascii_start().starts_with(b"[");
                return no_array_for_a_struct::<T>(array).map(|()| Payload(payload));
            }
        }
        let value = ctx.payload().map_err(|error| ExtractError::BadInput(error.to_string()))?;
        no_array_for_a_struct::<T>(value.is_array())?;
        T::deserialize(&*kombu_types_as_text(body, value)).map(Payload).map_err(|error| {
            ExtractError::BadInput(format!(
                "payload does not fit {}: {error}",
                std::any::type_name::<T>()
            ))
        })
    }
}

/// serde reads a struct's fields from an array by position; a publisher that sent one where
/// an object was meant (another service's shape, a Python list) would fill the fields in
/// whatever order the array had, so it is refused.
fn no_array_for_a_struct<T: DeserializeOwned>(array: bool) -> Result<(), ExtractError> {
    match array && fills_named_fields::<T>() {
        true => Err(ExtractError::BadInput(format!(
            "payload is an array, where {} takes an object (its fields by name)",
            std::any::type_name::<T>()
        ))),
        false => Ok(()),
    }
}

/// The message's raw body.
#[derive(Clone, Debug, PartialEq)]
pub struct RawBody(pub Bytes);

impl FromContext for RawBody {
    fn from_context(ctx: &WorkerContext) -> Result<Self, ExtractError> {
        Ok(RawBody(ctx.message().body.clone()))
    }
}

/// The message's AMQP headers, as received.
#[derive(Clone, Debug, PartialEq)]
pub struct MessageHeaders(pub Headers);

impl FromContext for MessageHeaders {
    fn from_context(ctx: &WorkerContext) -> Result<Self, ExtractError> {
        Ok(MessageHeaders(ctx.message().properties.headers.clone()))
    }
}

impl FromContext for Message {
    fn from_context(ctx: &WorkerContext) -> Result<Self, ExtractError> {
        Ok(ctx.message().clone())
    }
}

impl FromContext for CallContext {
    fn from_context(ctx: &WorkerContext) -> Result<Self, ExtractError> {
        Ok(ctx.call().clone())
    }
}

impl FromContext for Arc<Config> {
    fn from_context(ctx: &WorkerContext) -> Result<Self, ExtractError> {
        Ok(ctx.config().clone())
    }
}

impl FromContext for BackOffData {
    fn from_context(ctx: &WorkerContext) -> Result<Self, ExtractError> {
        Ok(ctx.retry.clone())
    }
}

impl FromContext for Failure {
    fn from_context(ctx: &WorkerContext) -> Result<Self, ExtractError> {
        ctx.failure()
            .cloned()
            .ok_or_else(|| ExtractError::Unavailable("no failure: not called back".into()))
    }

    fn check(setup: &TargetSetup) -> Result<(), SetupError> {
        match setup.role {
            TargetRole::Callback => Ok(()),
            TargetRole::Target => {
                Err("a Failure parameter is only available to the callback of a \
                                       CallbackRoute"
                    .into())
            }
        }
    }
}
