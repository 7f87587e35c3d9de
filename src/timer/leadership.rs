//! Cluster-wide leadership for timers: a token in a queue that the broker delivers to one
//! consumer at a time.
//!
//! Every instance consumes the queue `timer-{service}-{route}.leadership`, declared with
//! `x-single-active-consumer`, and puts a token in it when it claims; the instance holding a
//! token leads. When the leader stops, or its connection or its broker node goes away, the
//! broker hands the token back and delivers it to the next consumer, on any node. A follower
//! does nothing at a tick: it is never refused (a refused operation closes its channel, and
//! a claim refused at every tick cost each tick a channel and an error line). The queue is
//! transient and auto-deleted: the broker deletes it with its last consumer, or when its
//! node stops, and each instance then claims again.

use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};

use crate::data::HeaderValue;
use crate::pipeline::RouteHandle;
use crate::transport::{
    ConsumeOptions, Consumer, Delivery, OutgoingMessage, PublishOptions, QueueSpec, SharedTransport,
};

/// How long a fresh claim waits for the token: the broker delivers it at once to an instance
/// whose turn it is, and a first tick missed for lack of it would be a cron's whole period.
const FIRST_TOKEN_WAIT: Duration = Duration::from_millis(500);

/// An instance's claim to lead one route across the cluster.
pub(crate) struct Leadership {
    queue: QueueSpec,
    claim: Option<Claim>,
}

/// A consumer of the leadership queue, and the token it holds while this instance leads.
struct Claim {
    /// Ends if the broker deletes the queue or cancels the consumer.
    consumer: Consumer,
    /// The transport's reconnection count when this instance last put a token in the queue;
    /// `None` until it has. After a reconnection the queue may be a new, empty one.
    tokened_at: Option<u64>,
    /// The token while this instance leads, with the transport's reconnection count when it
    /// arrived: a token of an earlier connection went back to the queue with it.
    token: Option<(Delivery, u64)>,
}

impl Leadership {
    /// Leadership of `route`, through the queue `timer-{service}-{route}.leadership`.
    pub(crate) fn of(route: &RouteHandle) -> Self {
        let name = format!("timer-{}-{}.leadership", route.service_name(), route.name());
        let mut queue = QueueSpec { durable: false, auto_delete: true, ..QueueSpec::durable(name) };
        queue.arguments.insert("x-single-active-consumer".to_owned(), HeaderValue::Bool(true));
        Leadership { queue, claim: None }
    }

    /// True when this instance leads: it holds the token on its current connection. While
    /// disconnected it never leads: another instance may have taken over.
    pub(crate) async fn lead(&mut self, route: &RouteHandle) -> bool {
        let transport = route.transport();
        if let Some(claim) = &mut self.claim {
            if !claim.take_deliveries(route) {
                if claim.token.is_some() {
                    tracing::warn!(route = route.name(), "timer leadership lost: its queue went");
                }
                self.claim = None;
            }
        }
        if !transport.is_connected() {
            return false;
        }
        if self.claim.is_none() && !self.claim(route).await {
            return false;
        }
        let Some(claim) = &mut self.claim else { return false };
        if claim.tokened_at != Some(transport.reconnects()) {
            claim.put_token(route, &self.queue.name).await;
        }
        if claim.token.as_ref().is_some_and(|token| stale(token, transport)) {
            tracing::warn!(route = route.name(), "timer leadership lost with the connection");
            claim.token = None;
        }
        claim.token.is_some()
    }

    /// Declares the queue and consumes it; waits briefly for the token, which comes at once
    /// when it is this instance's turn.
    /// False when the broker refused.
    async fn claim(&mut self, route: &RouteHandle) -> bool {
        let transport = route.transport();
        if let Err(error) = transport.declare_queue(&self.queue).await {
            tracing::warn!(route = route.name(), "cannot declare {}: {error}", self.queue.name);
            return false;
        }
        // Two: a token beyond the one held is delivered, and removed (`take_deliveries`).
        let options = ConsumeOptions { prefetch: 2, exclusive: false, consumer_tag: String::new() };
        let consumer = match transport.consume(&self.queue.name, options).await {
            Ok(consumer) => consumer,
            Err(error) => {
                tracing::warn!(route = route.name(), "cannot claim timer leadership: {error}");
                return false;
            }
        };
        let claim = self.claim.insert(Claim { consumer, tokened_at: None, token: None });
        claim.put_token(route, &self.queue.name).await;
        if let Ok(Some(delivery)) =
            tokio::time::timeout(FIRST_TOKEN_WAIT, claim.consumer.next()).await
        {
            claim.keep(delivery, route);
        }
        true
    }
}

impl Claim {
    /// Takes what the queue delivered without waiting: the first token is kept, any other is
    /// removed (every claim adds one). False once the consumer ended.
    fn take_deliveries(&mut self, route: &RouteHandle) -> bool {
        loop {
            match self.consumer.next().now_or_never() {
                None => return true,
                Some(None) => return false,
                Some(Some(delivery)) => self.keep(delivery, route),
            }
        }
    }

    /// Keeps `delivery` as the token unless a live one is held; removes it otherwise.
    fn keep(&mut self, delivery: Delivery, route: &RouteHandle) {
        let transport = route.transport();
        if self.token.as_ref().is_some_and(|token| !stale(token, transport)) {
            // Settled in the background: a lost acknowledgement only leaves the extra token
            // in the queue, to be removed at the next delivery.
            tokio::spawn(async move { delivery.acker.ack().await });
        } else {
            tracing::info!(route = route.name(), "this instance now leads the timer");
            self.token = Some((delivery, transport.reconnects()));
        }
    }

    /// Puts a token in the queue (a claim's own, or one after a reconnection, when the queue
    /// may have been deleted and declared again empty).
    async fn put_token(&mut self, route: &RouteHandle, queue: &str) {
        let transport = route.transport();
        let reconnects = transport.reconnects();
        let token = OutgoingMessage { body: Bytes::new(), properties: Default::default() };
        // Mandatory: a queue deleted meanwhile fails it, and the next tick puts it again.
        let options = PublishOptions { mandatory: true };
        match transport.publish("", queue, token, options).await {
            Ok(()) => self.tokened_at = Some(reconnects),
            Err(error) => {
                tracing::warn!(
                    route = route.name(),
                    "cannot put the timer's leadership token: {error}"
                )
            }
        }
    }
}

/// True when `token` came on an earlier connection, or its channel is gone: the broker took
/// it back and may have given it to another instance.
fn stale((token, reconnects): &(Delivery, u64), transport: &SharedTransport) -> bool {
    *reconnects != transport.reconnects() || token.acker.channel_lost()
}
