//! Cluster-wide leadership for timers: the instance holding the exclusive consumer of a
//! queue leads; when it dies its connection closes and another instance takes over.

use futures::{FutureExt, StreamExt};

use crate::pipeline::RouteHandle;
use crate::transport::{ConsumeOptions, Consumer, HeaderValue, QueueSpec, TransportError};

/// An instance's claim to lead one route across the cluster.
pub(crate) struct Leadership {
    queue: QueueSpec,
    held: Option<Consumer>,
}

impl Leadership {
    /// Leadership of `route`: queue `timer-{service}-{route}.leader` (never receives a
    /// message; deleted by the broker an hour after its last use).
    pub(crate) fn of(route: &RouteHandle) -> Self {
        let mut queue =
            QueueSpec::durable(format!("timer-{}-{}.leader", route.service_name(), route.name()));
        queue.arguments.insert("x-expires".into(), HeaderValue::Int(3_600_000));
        Leadership { queue, held: None }
    }

    /// True when this instance leads: it holds the exclusive consumer, or just took it.
    pub(crate) async fn lead(&mut self, route: &RouteHandle) -> bool {
        if let Some(consumer) = &mut self.held {
            // A live exclusive consumer never gets deliveries; `Some(None)` means it ended.
            if !matches!(consumer.next().now_or_never(), Some(None)) {
                return true;
            }
            tracing::warn!(route = route.name(), "timer leadership lost");
            self.held = None;
        }
        let transport = route.transport();
        match transport.declare_queue(&self.queue).await {
            // another instance leads; trying its exclusive consumer would only be refused
            // (and logged by the AMQP client)
            Ok(info) if info.consumer_count > 0 => return false,
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(route = route.name(), "cannot declare {}: {error}", self.queue.name);
                return false;
            }
        }
        let options = ConsumeOptions { prefetch: 1, exclusive: true, consumer_tag: String::new() };
        match transport.consume(&self.queue.name, options).await {
            Ok(consumer) => {
                tracing::info!(route = route.name(), "this instance now leads the timer");
                self.held = Some(consumer);
                true
            }
            Err(TransportError::ResourceLocked(_)) => false,
            Err(error) => {
                tracing::warn!(route = route.name(), "cannot claim timer leadership: {error}");
                false
            }
        }
    }
}
