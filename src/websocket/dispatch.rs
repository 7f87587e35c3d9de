//! What a request frame asks for: an answer at once (an error, a built-in command) or a call
//! of a route in a worker slot taken now.

use serde_json::Value;

use crate::data::ufw_wire::{answer_builtin, reply_frame, RemoteError, Request};
use crate::data::Handled;
use crate::data::{json_properties, Message};
use crate::pipeline::spawners::WorkerPermit;
use crate::pipeline::RouteHandle;
use crate::websocket::registry::WsRegistry;
use crate::websocket::MAX_CALLS_PER_CONNECTION;

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
    if let Some(answer) = answer_builtin(
        &request,
        |target| registry.target_detail(target),
        || registry.target_details(),
    ) {
        return reply(answer);
    }
    match registry.route(&request.command) {
        None => reply(Err(RemoteError::target_does_not_exist(&request.command))),
        Some(route) if in_flight >= MAX_CALLS_PER_CONNECTION => {
            route.refused("connection_limit");
            reply(Err(refusal(format!(
                "{MAX_CALLS_PER_CONNECTION} calls already running on this connection"
            ))))
        }
        Some(route) => match route.try_acquire() {
            None if route.stopping().is_cancelled() => {
                route.refused("stopping");
                reply(Err(refusal("the service is stopping".into())))
            }
            None => {
                route.refused("busy");
                reply(Err(refusal(format!(
                    "all {} workers of context '{}' are busy",
                    route.pool().size(),
                    route.pool().context()
                ))))
            }
            Some(permit) => Step::Call(Box::new(Call::new(route, permit, request))),
        },
    }
}

/// The message a WebSocket command hands its route: the request's arguments as an RPC
/// payload (what [`Args`](crate::amqp::rpc::Args) reads), the command as routing key.
pub(crate) fn command_message(request: Request) -> Message {
    request.into_message(json_properties())
}

/// A call refused for want of a worker: the Python original's `MaxConnectionsReached`
/// ("No Available Workers"), on which its client tries again.
fn refusal(why: String) -> RemoteError {
    RemoteError::framework(MAX_CONNECTIONS_REACHED, format!("No Available Workers: {why}"))
}

impl Call {
    fn new(route: RouteHandle, permit: WorkerPermit, request: Request) -> Self {
        let id = request.id.clone();
        Call { route, permit, message: command_message(request), id }
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
