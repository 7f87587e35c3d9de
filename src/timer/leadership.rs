//! Cluster-wide leadership for timers: the instance whose connection owns an exclusive queue
//! leads. The broker deletes that queue with the connection, also when the connection's node
//! stops or dies, so another instance, on any node, takes over.

use futures::{FutureExt, StreamExt};

use crate::pipeline::RouteHandle;
use crate::transport::{ConsumeOptions, Consumer, QueueSpec, TransportError};

/// An instance's claim to lead one route across the cluster.
pub(crate) struct Leadership {
    queue: QueueSpec,
    held: Option<Held>,
}

/// Leadership held: the consumer of the lock queue, and the connection it was taken on.
struct Held {
    /// Ends if the broker deletes the queue or cancels the consumer.
    consumer: Consumer,
    /// The transport's reconnection count when leadership was taken.
    reconnects: u64,
}

impl Leadership {
    /// Leadership of `route`: the exclusive queue `timer-{service}-{route}.lock`, which never
    /// receives a message.
    pub(crate) fn of(route: &RouteHandle) -> Self {
        let name = format!("timer-{}-{}.lock", route.service_name(), route.name());
        let queue = QueueSpec { durable: false, exclusive: true, ..QueueSpec::durable(name) };
        Leadership { queue, held: None }
    }

    /// True when this instance leads: it holds the lock queue on its current connection, or
    /// just took it. While disconnected it never leads: another instance may have taken over.
    pub(crate) async fn lead(&mut self, route: &RouteHandle) -> bool {
        let transport = route.transport();
        if let Some(held) = &mut self.held {
            // A live consumer of the lock never gets deliveries; `Some(None)` means it ended.
            let ended = matches!(held.consumer.next().now_or_never(), Some(None));
            let same_connection =
                transport.is_connected() && transport.reconnects() == held.reconnects;
            if same_connection && !ended {
                return true;
            }
            // After a reconnection the queue was declared again if it was free: claimed
            // again below (or by whoever took it meanwhile).
            tracing::warn!(route = route.name(), "timer leadership lost");
            self.held = None;
        }
        if !transport.is_connected() {
            return false;
        }
        let reconnects = transport.reconnects();
        match transport.declare_queue(&self.queue).await {
            Ok(_) => {}
            // another instance leads
            Err(TransportError::ResourceLocked(_)) => return false,
            Err(error) => {
                tracing::warn!(route = route.name(), "cannot declare {}: {error}", self.queue.name);
                return false;
            }
        }
        // Not exclusive: the queue is, and a consumer of a previous claim may still be there.
        let options = ConsumeOptions { prefetch: 1, exclusive: false, consumer_tag: String::new() };
        match transport.consume(&self.queue.name, options).await {
            Ok(consumer) => {
                tracing::info!(route = route.name(), "this instance now leads the timer");
                self.held = Some(Held { consumer, reconnects });
                true
            }
            Err(error) => {
                tracing::warn!(route = route.name(), "cannot claim timer leadership: {error}");
                false
            }
        }
    }
}
