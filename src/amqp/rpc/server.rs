//! Serving RPC requests: one consumer of `rpc-{service}` dispatches each request to the route
//! of its method, replies, then acks.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use crate::amqp::rpc::registry::RpcRegistry;
use crate::amqp::rpc::wire::{reply_body, request_arguments, RemoteException};
use crate::data::Failure;
use crate::data::Handled;
use crate::data::{json_properties, Message};
use crate::error::Result;
use crate::pipeline::RouteHandle;
use crate::transport::limits::check_size;
use crate::transport::{ConsumeOptions, Delivery, OutgoingMessage, PublishOptions};

const RECONSUME_PAUSE: Duration = Duration::from_secs(1);
const DRAIN_WAIT: Duration = Duration::from_secs(5);
const REQUEUE_PAUSE: Duration = Duration::from_secs(1);

/// Consume the request queue `queue` for every method of `registry` until the service
/// stops; `route` is the route whose entrypoint runs the consumer. Shutdown follows the
/// worker mode, as for the other queue entrypoints.
pub(crate) async fn serve(
    registry: Arc<RpcRegistry>,
    route: RouteHandle,
    queue: String,
) -> Result<()> {
    let options = ConsumeOptions {
        prefetch: registry.prefetch(route.config().prefetch_count),
        ..ConsumeOptions::default()
    };
    let tasks = TaskTracker::new();
    let mut consumer = route.transport().consume(&queue, options.clone()).await?;
    loop {
        tokio::select! {
            biased;
            _ = route.stopping().cancelled() => break,
            delivery = consumer.next() => match delivery {
                Some(delivery) => {
                    tasks.spawn(handle(registry.clone(), route.clone(), delivery));
                }
                None => {
                    tracing::warn!("consumer of {queue} ended; consuming again");
                    tokio::select! {
                        _ = route.stopping().cancelled() => break,
                        _ = tokio::time::sleep(RECONSUME_PAUSE) => {}
                    }
                    match route.transport().consume(&queue, options.clone()).await {
                        Ok(next) => consumer = next,
                        Err(error) => tracing::error!("cannot consume {queue}: {error}"),
                    }
                }
            }
        }
    }
    consumer.cancel();
    while let Ok(Some(delivery)) = tokio::time::timeout(DRAIN_WAIT, consumer.next()).await {
        tasks.spawn(handle(registry.clone(), route.clone(), delivery));
    }
    tasks.close();
    let limit = route.config().shutdown_timeout;
    if tokio::time::timeout(limit, tasks.wait()).await.is_err() {
        tracing::warn!(
            "RPC calls still running after SHUTDOWN_TIMEOUT ({limit:?}); their requests go back to {queue}"
        );
    }
    RpcRegistry::forget(route.transport());
    Ok(())
}

/// Handle one request: find the method's route, run it, reply, ack.
async fn handle(registry: Arc<RpcRegistry>, consumer_route: RouteHandle, delivery: Delivery) {
    let message = delivery.message();
    let prefix = format!("{}.", consumer_route.service_name());
    let method = message.routing_key.strip_prefix(&prefix).unwrap_or(&message.routing_key);
    let (outcome, route, handled) = match registry.route(method) {
        None => (Err(RemoteException::nameko("MethodNotFound", method)), consumer_route, None),
        Some(route) => match well_formed(&message, route.config().max_message_size) {
            Err(reason) => {
                let handled = Handled::Failed(Failure::bad_input(reason.clone()));
                (Err(RemoteException::nameko("MalformedRequest", reason)), route, Some(handled))
            }
            Ok(()) => {
                let Some(permit) = route.acquire().await else {
                    if let Err(error) = delivery.acker.nack(true).await {
                        tracing::warn!(route = route.name(), "cannot hand a request back: {error}");
                    }
                    return;
                };
                let handled = route.handle(permit, message.clone()).await;
                let outcome = reply_outcome(&handled);
                (outcome, route, Some(handled))
            }
        },
    };
    if let Err(error) = &outcome {
        tracing::warn!(
            route = route.name(),
            "RPC {method} failed: {} {}",
            error.exc_type,
            error.value
        );
    }
    let replied = reply(&route, &message, &outcome).await;
    let settled = match replied {
        Ok(()) => delivery.acker.ack().await,
        Err(error) => {
            tracing::error!(
                route = route.name(),
                "cannot reply to an RPC request ({error}); it goes back to the queue"
            );
            tokio::time::sleep(REQUEUE_PAUSE).await;
            delivery.acker.nack(true).await
        }
    };
    if let Err(error) = settled {
        tracing::warn!(route = route.name(), "cannot settle an RPC request ({error})");
    }
    if let Some(handled) = handled {
        route.settled(&handled);
    }
}

/// What to reply for how the route handled the request. RPC replies at once: a broker-side
/// retry (`AsyncBackOff`) is not scheduled, its failure is replied.
fn reply_outcome(handled: &Handled) -> std::result::Result<serde_json::Value, RemoteException> {
    match handled {
        Handled::Succeeded(value) => Ok(value.clone()),
        Handled::CalledBack(failure)
        | Handled::Failed(failure)
        | Handled::Retry { failure, .. } => Err(RemoteException::from_failure(failure)),
    }
}

/// A request is at most `MAX_MESSAGE_SIZE` bytes of `{"args": [...], "kwargs": {...}}` in JSON.
fn well_formed(message: &Message, max_size: usize) -> std::result::Result<(), String> {
    if message.body.len() > max_size {
        return Err(format!(
            "request of {} bytes exceeds MAX_MESSAGE_SIZE ({max_size} bytes)",
            message.body.len()
        ));
    }
    let body = message.decode()?;
    request_arguments(&body)
        .map(|_| ())
        .ok_or_else(|| "Message missing `args` or `kwargs`".to_owned())
}

/// Publish the reply (confirmed) to `reply_to` on the RPC exchange; nothing to do without
/// `reply_to`.
async fn reply(
    route: &RouteHandle,
    request: &Message,
    outcome: &std::result::Result<serde_json::Value, RemoteException>,
) -> std::result::Result<(), crate::transport::TransportError> {
    let Some(reply_to) = request.properties.reply_to.as_deref() else {
        tracing::info!(
            route = route.name(),
            "RPC request {} without reply_to: handled, no reply sent",
            request.routing_key
        );
        return Ok(());
    };
    let mut properties = json_properties();
    properties.correlation_id = request.properties.correlation_id.clone();
    let mut body = reply_body(outcome);
    let max_size = route.config().max_message_size;
    if let Err(too_large) = check_size("RPC reply", body.len(), max_size) {
        tracing::warn!(route = route.name(), "{too_large}: replying an error instead");
        let reason =
            format!("result of {} bytes exceeds MAX_MESSAGE_SIZE ({max_size} bytes)", body.len());
        body = reply_body(&Err(RemoteException::nameko("UnserializableValueError", reason)));
    }
    let message = OutgoingMessage { body, properties };
    route
        .transport()
        .publish(&route.config().rpc_exchange, reply_to, message, PublishOptions::default())
        .await
}
