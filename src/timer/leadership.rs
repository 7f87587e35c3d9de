//! Cluster-wide leadership for timers: the instance whose connection owns an exclusive queue
//! leads. The broker deletes that queue with the connection, also when the connection's node
//! stops or dies, so another instance, on any node, takes over.
//!
//! A follower claims the queue only once it is gone: at each tick it publishes an empty
//! message to it (mandatory), which the broker returns when no such queue exists. Claiming
//! at every tick had the broker refuse each claim (`405`) and close a channel for it: an
//! error line per tick, and a reconnection whenever the connection's channel numbers ran out
//! (lapin never opens a channel number the broker closed again). The leader removes what
//! the followers sent.
//!
//! The queue is declared for the connection only, not again after a reconnect: another
//! instance may hold it by then, and a queue declared again would take the lock back on a
//! connection whose instance no longer knows it leads (no instance fired, the others finding
//! the queue held). An instance that loses leadership deletes the queue (refused when another
//! instance holds it) in case its connection holds it still, and a leader that stops deletes
//! it at once, rather than holding it until its connection closes after its other routes'
//! calls.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio_util::task::AbortOnDropHandle;

use crate::pipeline::RouteHandle;
use crate::transport::{
    ConsumeOptions, Consumer, OutgoingMessage, PublishOptions, QueueSpec, SharedTransport,
    TransportError,
};

/// How many followers' messages the leader's consumer takes before it has acknowledged them.
const PREFETCH: u16 = 64;

/// How often the leader's consumer checks whether its connection was lost.
const CONNECTION_CHECK: Duration = Duration::from_millis(250);

/// How long a stopping leader waits for its lock queue's deletion: the connection's close, a
/// moment later, deletes the queue anyway, so the stop is not held up for it.
const RESIGN_WAIT: Duration = Duration::from_secs(2);

/// An instance's claim to lead one route across the cluster.
pub(crate) struct Leadership {
    queue: QueueSpec,
    held: Option<Held>,
    /// This instance's connection may hold the queue, though it does not lead (leadership
    /// lost, or a claim that did not end with a consumer): it is deleted before the next
    /// claim, or when the route ends.
    release: bool,
}

/// Leadership held: the task consuming the lock queue, and the connection it was taken on.
struct Held {
    /// Acknowledges the followers' messages as they come, and ends soon after the
    /// connection's loss: a consumer read only at the ticks held the service's readiness,
    /// which waits for every consumer to subscribe again, until the next tick. Dropped with
    /// leadership, its consumer with it. Finished once the consumer ended (the queue is gone,
    /// or the broker cancelled it) or the connection was lost.
    task: AbortOnDropHandle<()>,
    /// The transport's reconnection count when leadership was taken.
    reconnects: u64,
}

impl Leadership {
    /// Leadership of `route`: the exclusive queue `timer-{service}-{route}.lock`.
    pub(crate) fn of(route: &RouteHandle) -> Self {
        let name = format!("timer-{}-{}.lock", route.service_name(), route.name());
        let queue = QueueSpec { durable: false, exclusive: true, ..QueueSpec::durable(name) };
        Leadership { queue, held: None, release: false }
    }

    /// True when this instance leads: it holds the lock queue on its current connection, or
    /// just took it. While disconnected it never leads: another instance may have taken over.
    pub(crate) async fn lead(&mut self, route: &RouteHandle) -> bool {
        let transport = route.transport();
        if let Some(held) = &mut self.held {
            if !held.task.is_finished() && on_connection(transport, held.reconnects) {
                return true;
            }
            tracing::warn!(route = route.name(), "timer leadership lost");
            self.held = None;
            self.release = true;
        }
        if !transport.is_connected() {
            return false;
        }
        if self.release {
            // Never awaited while disconnected: it would wait for the connection.
            if let Err(error) = transport.delete_queue(&self.queue.name).await {
                tracing::debug!(route = route.name(), "lock queue not deleted: {error}");
            }
            self.release = false;
        }
        if held_elsewhere(route, &self.queue.name).await {
            return false;
        }
        let reconnects = transport.reconnects();
        match transport.declare_queue_for_connection(&self.queue).await {
            // held by this connection from now on, until a consumer of it leads (a claim cut
            // short by the stop leaves it to `resign`)
            Ok(_) => self.release = true,
            // another instance took it since
            Err(TransportError::ResourceLocked(_)) => return false,
            Err(error) => {
                tracing::warn!(route = route.name(), "cannot declare {}: {error}", self.queue.name);
                return false;
            }
        }
        // Not exclusive: the queue is, and a consumer of a previous claim may still be there.
        let options =
            ConsumeOptions { prefetch: PREFETCH, exclusive: false, consumer_tag: "".into() };
        match transport.consume(&self.queue.name, options).await {
            Ok(consumer) => {
                tracing::info!(route = route.name(), "this instance now leads the timer");
                self.held = Some(Held::consuming(consumer, transport.clone(), reconnects));
                self.release = false;
                true
            }
            Err(error) => {
                tracing::warn!(route = route.name(), "cannot claim timer leadership: {error}");
                false
            }
        }
    }

    /// The route ends (the service stops): the lock queue this instance's connection holds
    /// is deleted at once, so that another instance leads from its next tick, not once this
    /// service's connection closes. Not while disconnected or blocked by an alarm (the broker
    /// would not read the deletion), and for at most [`RESIGN_WAIT`].
    pub(crate) async fn resign(self, route: &RouteHandle) {
        let transport = route.transport();
        let holds = self.held.is_some() || self.release;
        if !holds || !transport.is_connected() || transport.publishing_blocked() {
            return;
        }
        let deleted = tokio::time::timeout(RESIGN_WAIT, transport.delete_queue(&self.queue.name));
        match deleted.await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::debug!(route = route.name(), "lock queue not deleted: {error}")
            }
            Err(_) => {
                tracing::debug!(route = route.name(), "lock queue not deleted in {RESIGN_WAIT:?}")
            }
        }
    }
}

/// Whether `transport` is still on the connection it had after `reconnects` reconnections:
/// leadership taken on a connection ends with it.
fn on_connection(transport: &SharedTransport, reconnects: u64) -> bool {
    transport.is_connected() && transport.reconnects() == reconnects
}

/// True unless the lock `queue` is known gone: an empty message published to it (mandatory)
/// came back unroutable. True too when that cannot be told (publishing blocked or failing):
/// this instance then does not fire, as when disconnected.
async fn held_elsewhere(route: &RouteHandle, queue: &str) -> bool {
    let transport = route.transport();
    if transport.publishing_blocked() {
        return true;
    }
    let message = OutgoingMessage { body: Bytes::new(), properties: Default::default() };
    let options = PublishOptions { mandatory: true };
    match transport.publish("", queue, message, options).await {
        Ok(()) => true,
        Err(TransportError::Unroutable { .. }) => false,
        Err(error) => {
            tracing::warn!(
                route = route.name(),
                "cannot tell whether another instance leads the timer: {error}"
            );
            true
        }
    }
}

impl Held {
    /// Leadership held by `consumer` of the lock queue, taken after `reconnects`.
    fn consuming(mut consumer: Consumer, transport: SharedTransport, reconnects: u64) -> Held {
        let task = tokio::spawn(async move {
            // Leadership ends with the connection it was taken on: the consumer is
            // dropped soon after the connection's loss, not subscribed again to a queue
            // another instance may hold by then (where it would wait, the service not ready).
            let mut check = tokio::time::interval(CONNECTION_CHECK);
            loop {
                tokio::select! {
                    delivery = consumer.next() => {
                        let Some(delivery) = delivery else { break };
                        // a lost acknowledgement only hands the follower's message back,
                        // to be removed again
                        if let Err(error) = delivery.acker.ack().await {
                            tracing::debug!("a follower's message not acknowledged: {error}");
                        }
                    }
                    _ = check.tick() => {
                        if !on_connection(&transport, reconnects) {
                            break;
                        }
                    }
                }
            }
        });
        Held { task: AbortOnDropHandle::new(task), reconnects }
    }
}
