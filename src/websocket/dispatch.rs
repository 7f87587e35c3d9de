//! What a request frame asks for: an answer at once (an error, a built-in command) or a call
//! of a route in a worker slot taken now.

use bytes::Bytes;
use serde_json::{json, Value};

use crate::data::Handled;
use crate::data::{json_properties, Message};
use crate::pipeline::spawners::WorkerPermit;
use crate::pipeline::RouteHandle;
use crate::websocket::frames::{reply_frame, RemoteError, Request};
use crate::websocket::registry::WsRegistry;
use crate::websocket::MAX_CALLS_PER_CONNECTION;

/// Lists every command (the Python original's built-in command).
const LIST_TARGETS: &str = "__list_targets__";
/// Describes one command.
const GET_TARGET: &str = "__get_target__";
/// The refusal of a call for want of a worker.
const MAX_CONNECTIONS_REACHED: &str = "MaxConnectionsReached";

/// What to do with a frame.
#[derive(Debug)]
pub(crate) enum Step {
    /// Send this reply frame now.
    Reply(String),
    /// Run this call; its reply comes when it finishes.
    Call(Box<Call>),
}

/// A call admitted into a worker slot.
#[derive(Debug)]
pub(crate) struct Call {
    route: RouteHandle,
    permit: WorkerPermit,
    message: Message,
    id: Option<Value>,
}

/// Read `frame` from a connection that has `in_flight` calls running.
pub(crate) fn dispatch(registry: &WsRegistry, frame: &[u8], in_flight: usize) -> Step {
    let request = match Request::parse(frame) {
        Ok(request) => request,
        Err(malformed) => {
            tracing::warn!("WebSocket frame refused: {}", malformed.error.message);
            return Step::Reply(reply_frame(malformed.id.as_ref(), &Err(malformed.error)));
        }
    };
    let reply = |outcome: Result<Value, RemoteError>| {
        match &outcome {
            // refusals for want of a worker come in floods under load: not worth a warning each
            Err(error) if error.is_framework(MAX_CONNECTIONS_REACHED) => {
                tracing::debug!("WebSocket command {} refused: {error}", request.command)
            }
            Err(error) => tracing::warn!("WebSocket command {} refused: {error}", request.command),
            Ok(_) => {}
        }
        Step::Reply(reply_frame(request.id.as_ref(), &outcome))
    };
    match request.command.as_str() {
        LIST_TARGETS => reply(Ok(Value::Array(registry.target_details()))),
        GET_TARGET => reply(get_target(registry, &request)),
        command => match registry.route(command) {
            None => reply(Err(RemoteError::framework(
                "RPCTargetDoesNotExist",
                format!("{command} does not exist or is not exposed through a RPC method."),
            ))),
            Some(_) if in_flight >= MAX_CALLS_PER_CONNECTION => reply(Err(refusal(format!(
                "{MAX_CALLS_PER_CONNECTION} calls already running on this connection"
            )))),
            Some(route) => match route.try_acquire() {
                None if route.stopping().is_cancelled() => {
                    reply(Err(refusal("the service is stopping".into())))
                }
                None => reply(Err(refusal(format!(
                    "all {} workers of context '{}' are busy",
                    route.pool().size(),
                    route.pool().context()
                )))),
                Some(permit) => Step::Call(Box::new(Call::new(route, permit, request))),
            },
        },
    }
}

/// A call refused for want of a worker: the Python original's `MaxConnectionsReached`
/// ("No Available Workers"), on which its client tries again.
fn refusal(why: String) -> RemoteError {
    RemoteError::framework(MAX_CONNECTIONS_REACHED, format!("No Available Workers: {why}"))
}

/// `__get_target__(target)`: a command's detail; an unknown one is Python's `KeyError`.
fn get_target(registry: &WsRegistry, request: &Request) -> Result<Value, RemoteError> {
    let target = request.args.first().or_else(|| request.kwargs.get("target"));
    let Some(Value::String(target)) = target else {
        return Err(RemoteError::builtin(
            "TypeError",
            format!("{GET_TARGET}() missing 1 required positional argument: 'target'"),
        ));
    };
    registry.target_detail(target).ok_or_else(|| RemoteError {
        args: vec![Value::String(target.clone())],
        ..RemoteError::builtin("KeyError", format!("'{target}'"))
    })
}

impl Call {
    fn new(route: RouteHandle, permit: WorkerPermit, request: Request) -> Self {
        let body = json!({ "args": request.args, "kwargs": request.kwargs });
        let message = Message {
            body: Bytes::from(body.to_string()),
            properties: json_properties(),
            routing_key: request.command,
            ..Message::default()
        };
        Call { route, permit, message, id: request.id }
    }

    /// Run the call; its reply frame.
    pub(crate) async fn run(self) -> String {
        let Call { route, permit, message, id } = self;
        let handled = route.handle(permit, message).await;
        let outcome = match &handled {
            Handled::Succeeded(value) => Ok(value.clone()),
            // no broker-side retry here: the failure is replied
            Handled::CalledBack(failure)
            | Handled::Failed(failure)
            | Handled::Retry { failure, .. } => Err(RemoteError::from_failure(failure)),
        };
        if let Err(error) = &outcome {
            tracing::warn!(route = route.name(), "WebSocket call failed: {error}");
        }
        route.settled(&handled);
        reply_frame(id.as_ref(), &outcome)
    }
}
