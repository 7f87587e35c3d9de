//! [`ReplyListener`]: the reply queue of a caller, shared by all its calls, routing each
//! reply to the call waiting for its correlation id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::amqp::rpc::error::RpcError;
use crate::amqp::rpc::naming::{reply_queue, ufw_reply_queue};
use crate::amqp::rpc::unfinished::Unfinished;
use crate::config::Protocol;
use crate::data::json_properties;
use crate::data::{nameko_wire, ufw_wire};
use crate::transport::limits::check_received_size;
use crate::transport::{
    BindingSpec, ClosedPart, ConsumeOptions, Consumer, Delivery, ExchangeSpec, Headers, Limit,
    OutgoingMessage, PublishOptions, SharedTransport, Transport, TransportError,
};

/// How many replies the reply consumer may hold unacknowledged.
const REPLY_PREFETCH: u16 = 1000;

/// How many calls of one service instance may wait for replies at once: a flood of calls
/// to a service that does not answer ends in a clear error, not in unbounded memory.
pub(crate) const MAX_PENDING_CALLS: usize = 65_536;

/// How often a reply queue checks whether its connection reconnected, to hand its waiting
/// calls over to a queue of the new connection.
const RECONNECTION_WATCH: Duration = Duration::from_secs(1);

/// How long a probe of the reply path may take before the path counts as broken.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The least time between two probes of one reply queue: calls that time out by the thousand
/// cost one probe, not one each.
const PROBE_SPACING: Duration = Duration::from_secs(5);

/// How long the caller's stop waits for a reply queue's consumer to end and the queue to be
/// deleted, then (connected) to delete it itself: the broker may be away, and the queue
/// expires by itself (`x-expires`).
const END_WAIT: Duration = Duration::from_secs(5);

/// What a reply carries: the result, or why there is none (a remote error, an unreadable
/// reply).
pub(crate) type ReplyOutcome = Result<serde_json::Value, RpcError>;

/// The reply queues of one caller (a service instance, kept in its `ServiceState`, or a
/// standalone client), one per wire protocol, each set up on first use and again if its
/// consumer ends.
#[derive(Debug)]
pub(crate) struct ReplyListener {
    service: String,
    /// `MAX_MESSAGE_SIZE`: the largest reply read.
    max_size: usize,
    /// The caller stops: no queue is set up any more.
    closed: AtomicBool,
    /// The calls waiting on every queue of the caller's (both protocols, retired queues
    /// included), bounded by [`MAX_PENDING_CALLS`].
    waiting: Arc<AtomicUsize>,
    /// Ended reply queues whose deletion failed (their node away): a durable one would come
    /// back with its node, holding replies no call waits for, until it expires.
    undeleted: Mutex<Vec<String>>,
    nameko: QueueSlot,
    micro_framework: QueueSlot,
}

/// The reply queue of one protocol. Every call reads `live`, held for a clone only; `starting`
/// lets one call at a time set a queue up, an await on the broker no lock of `live` spans.
#[derive(Debug, Default)]
struct QueueSlot {
    live: Mutex<Option<Arc<ReplyQueue>>>,
    starting: tokio::sync::Mutex<()>,
    /// The queues replaced while calls may still wait on them (retired ones), for the caller
    /// to delete when it stops before they end.
    replaced: Mutex<Vec<Weak<ReplyQueue>>>,
}

impl QueueSlot {
    /// The queue, unless none was set up yet, its consumer has ended, or it was set up before
    /// the connection's last reconnection, `reconnects` (see [`ReplyListener::queue`]).
    fn live(&self, reconnects: u64) -> Option<Arc<ReplyQueue>> {
        let live = self.live.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let usable = |queue: &&Arc<ReplyQueue>| {
            !queue.closed.load(Ordering::Acquire) && queue.reconnects == reconnects
        };
        live.as_ref().filter(usable).cloned()
    }

    /// The queues of the slot that calls still wait on (the live one, if it has been
    /// replaced in all but the slot, and those retired).
    fn waited_on(&self) -> Vec<Arc<ReplyQueue>> {
        let live = self.live.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        let replaced: Vec<_> = self.replaced().iter().filter_map(Weak::upgrade).collect();
        let queues = live.into_iter().chain(replaced);
        queues.filter(|queue| !queue.pending().is_empty()).collect()
    }

    fn replace(&self, queue: Option<Arc<ReplyQueue>>) -> Option<Arc<ReplyQueue>> {
        let mut live = self.live.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        std::mem::replace(&mut live, queue)
    }

    fn replaced(&self) -> MutexGuard<'_, Vec<Weak<ReplyQueue>>> {
        self.replaced.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Set `queue` up in place of the one before, which is retired (it ends once no call
    /// waits on it, at once if none does) and remembered while it lives (its consumer and the
    /// calls waiting on it hold it).
    fn set_up(&self, queue: Arc<ReplyQueue>) {
        if let Some(before) = self.replace(Some(queue)) {
            before.retire();
            let mut replaced = self.replaced();
            replaced.retain(|queue| queue.strong_count() > 0);
            replaced.push(Arc::downgrade(&before));
        }
    }

    /// Empty the slot: the live queue, and those replaced that still live.
    fn take_all(&self) -> Vec<Arc<ReplyQueue>> {
        let replaced = std::mem::take(&mut *self.replaced());
        let live = self.replace(None);
        live.into_iter().chain(replaced.iter().filter_map(Weak::upgrade)).collect()
    }
}

impl ReplyListener {
    /// A listener for `service`'s calls (queues `rpc.reply-{service}-{uuid}` and
    /// `ufw-reply-{uuid}`), reading replies of at most `max_size` bytes.
    pub(crate) fn new(service: &str, max_size: usize) -> Self {
        ReplyListener {
            service: service.to_owned(),
            max_size,
            closed: AtomicBool::new(false),
            waiting: Arc::default(),
            undeleted: Mutex::default(),
            nameko: QueueSlot::default(),
            micro_framework: QueueSlot::default(),
        }
    }

    fn undeleted(&self) -> MutexGuard<'_, Vec<String>> {
        self.undeleted.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Delete the ended queues whose deletion failed, in the background; those that fail
    /// again are kept for the next try.
    fn delete_undeleted(self: &Arc<Self>, transport: &SharedTransport) {
        let names = std::mem::take(&mut *self.undeleted());
        if names.is_empty() {
            return;
        }
        let (listener, transport) = (self.clone(), transport.clone());
        tokio::spawn(async move {
            for name in names {
                if !gone(&transport.delete_queue(&name).await) {
                    listener.undeleted().push(name);
                }
            }
        });
    }

    fn slot(&self, protocol: Protocol) -> &QueueSlot {
        match protocol {
            Protocol::Nameko => &self.nameko,
            Protocol::MicroFramework => &self.micro_framework,
        }
    }

    /// The live reply queue of `protocol`, declared, bound to `exchange` and consumed if
    /// needed.
    ///
    /// A queue set up before the connection's last reconnection is retired, and a new one set
    /// up, which is bound with the routing keys of the queues calls still wait on too, and
    /// hands their replies over. When the client saw the connection's loss before the broker
    /// did, the broker keeps the old connection's exclusive consumer of the old queue, and
    /// sends that dead connection the replies to it, until it notices the loss (up to about
    /// two heartbeats); calls sent meanwhile would wait for those replies until then, or
    /// time out.
    pub(crate) async fn queue(
        self: &Arc<Self>,
        transport: &SharedTransport,
        protocol: Protocol,
        exchange: &ExchangeSpec,
    ) -> Result<Arc<ReplyQueue>, TransportError> {
        let slot = self.slot(protocol);
        let reconnects = transport.reconnects();
        if let Some(queue) = slot.live(reconnects) {
            return Ok(queue);
        }
        let _starting = slot.starting.lock().await;
        // a call that waited here finds the queue the call before it set up
        let reconnects = transport.reconnects();
        if let Some(queue) = slot.live(reconnects) {
            return Ok(queue);
        }
        // read under `starting`, which `close` takes after setting the flag: a queue set up
        // after the caller deleted its own would be left, unconsumed, until it expires
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed {
                what: ClosedPart::Transport,
                reason: "the caller stops: no RPC reply queue is set up any more".into(),
            });
        }
        let predecessors = slot.waited_on();
        let setup = Setup {
            listener: self,
            service: &self.service,
            max_size: self.max_size,
            protocol,
            exchange,
            reconnects,
            waiting: &self.waiting,
            predecessors: &predecessors,
        };
        // the queues it takes over are retired: the one in the slot just below, the others
        // when they were replaced
        let (queue, unfinished) = ReplyQueue::start(transport, setup).await?;
        // no await from the end of the set-up to here: a caller that gives up meanwhile
        // cannot leave a queue that neither the guard nor the slot deletes
        slot.set_up(queue.clone());
        unfinished.finish();
        self.delete_undeleted(transport);
        Ok(queue)
    }

    /// The caller stops: set up no more reply queues, and delete those made, retired ones
    /// that calls still wait on included: each consumer is cancelled, then its queue deleted,
    /// within [`END_WAIT`]. Calls still running fail.
    pub(crate) async fn close(&self, transport: &SharedTransport) {
        self.closed.store(true, Ordering::Release);
        for protocol in [Protocol::Nameko, Protocol::MicroFramework] {
            let slot = self.slot(protocol);
            let _starting = slot.starting.lock().await;
            for queue in slot.take_all() {
                queue.stop_listening.cancel();
                // Its consumer cancelled first, then the queue deleted (by the listener): a
                // queue deleted under its consumer has the broker cancel the consumer, which
                // the transport warns of as a consumer lost.
                if tokio::time::timeout(END_WAIT, queue.listened.cancelled()).await.is_ok() {
                    continue;
                }
                let deleted = match transport.is_connected() {
                    true => tokio::time::timeout(END_WAIT, transport.delete_queue(&queue.name))
                        .await
                        .ok(),
                    false => None,
                };
                if !matches!(deleted, Some(Ok(_))) {
                    tracing::debug!("the reply queue {} is left to expire", queue.name);
                }
            }
        }
        let undeleted = std::mem::take(&mut *self.undeleted());
        for name in undeleted.into_iter().filter(|_| transport.is_connected()) {
            if !matches!(
                tokio::time::timeout(END_WAIT, transport.delete_queue(&name)).await,
                Ok(Ok(_))
            ) {
                tracing::debug!("the reply queue {name} is left to expire");
            }
        }
    }
}

/// What a new reply queue is set up with.
struct Setup<'a> {
    listener: &'a Arc<ReplyListener>,
    service: &'a str,
    max_size: usize,
    protocol: Protocol,
    exchange: &'a ExchangeSpec,
    /// The connection's reconnections when it is set up.
    reconnects: u64,
    /// The caller's count of waiting calls.
    waiting: &'a Arc<AtomicUsize>,
    /// The queues it takes over from: it is bound with their routing keys too, and hands
    /// their calls' replies over.
    predecessors: &'a [Arc<ReplyQueue>],
}

/// A consumed reply queue and the calls waiting on it.
#[derive(Debug)]
pub(crate) struct ReplyQueue {
    name: String,
    routing_key: String,
    protocol: Protocol,
    /// `MAX_MESSAGE_SIZE`: a bigger reply fails its call unread.
    max_size: usize,
    /// The connection's reconnections when the queue was set up: after another, new calls
    /// go to a new queue.
    reconnects: u64,
    /// Keyed by correlation id, shared with the call's [`RpcReply`](super::RpcReply).
    pending: Mutex<HashMap<Arc<str>, oneshot::Sender<ReplyOutcome>>>,
    /// The calls waiting on every queue of the caller's (see [`ReplyListener`]).
    waiting: Arc<AtomicUsize>,
    /// The queues set up before this one whose replies this one takes too.
    predecessors: Vec<Weak<ReplyQueue>>,
    /// Takes no more calls: retired, or its consumer ended.
    closed: AtomicBool,
    /// The connection the queue was set up on (to probe and delete the queue), held weakly:
    /// the queue's consumer lives as long as the connection, which closes when its last
    /// handle is dropped.
    transport: Weak<dyn Transport>,
    /// The exchange the queue is bound to.
    exchange: ExchangeSpec,
    /// The caller's listener, which sets up the queue that takes over from this one after a
    /// reconnection.
    listener: Weak<ReplyListener>,
    /// Whether that queue is being set up.
    succeeding: AtomicBool,
    /// No probe starts before this instant.
    next_probe: Mutex<Option<Instant>>,
    /// Wakes the consumer of a retired queue (whose replies no longer arrive) to see whether
    /// calls still wait on it.
    retired: Notify,
    /// Asks the consumer to end: the caller stops.
    stop_listening: CancellationToken,
    /// Cancelled once the consumer has ended and the queue was deleted.
    listened: CancellationToken,
}

impl ReplyQueue {
    async fn start(
        transport: &SharedTransport,
        setup: Setup<'_>,
    ) -> Result<(Arc<ReplyQueue>, Unfinished), TransportError> {
        let Setup {
            listener,
            service,
            max_size,
            protocol,
            exchange,
            reconnects,
            waiting,
            predecessors,
        } = setup;
        let id = uuid::Uuid::new_v4().to_string();
        // Nameko binds its reply queue with the bare id, micro-framework with the queue's name
        let (spec, routing_key) = match protocol {
            Protocol::Nameko => (reply_queue(service, &id), id),
            Protocol::MicroFramework => {
                let spec = ufw_reply_queue(&id);
                let name = spec.name.clone();
                (spec, name)
            }
        };
        transport.declare_exchange(exchange).await?;
        let unfinished = Unfinished::new(transport, &spec.name);
        transport.declare_queue(&spec).await?;
        let keys = std::iter::once(&routing_key).chain(predecessors.iter().map(|q| &q.routing_key));
        for key in keys {
            let binding = BindingSpec {
                queue: spec.name.clone(),
                exchange: exchange.name.clone(),
                routing_key: key.clone(),
                arguments: Headers::new(),
            };
            transport.bind_queue(&binding).await?;
        }
        let options = ConsumeOptions {
            prefetch: REPLY_PREFETCH,
            exclusive: true,
            ..ConsumeOptions::default()
        };
        let consumer = transport.consume(&spec.name, options).await?;
        tracing::debug!("RPC replies arrive on {}", spec.name);
        let queue = Arc::new(ReplyQueue {
            name: spec.name.clone(),
            routing_key,
            protocol,
            max_size,
            reconnects,
            pending: Mutex::default(),
            waiting: waiting.clone(),
            predecessors: predecessors.iter().map(Arc::downgrade).collect(),
            closed: AtomicBool::new(false),
            transport: Arc::downgrade(transport),
            exchange: exchange.clone(),
            listener: Arc::downgrade(listener),
            succeeding: AtomicBool::new(false),
            next_probe: Mutex::default(),
            retired: Notify::new(),
            stop_listening: CancellationToken::new(),
            listened: CancellationToken::new(),
        });
        tokio::spawn(queue.clone().listen(consumer));
        Ok((queue, unfinished))
    }

    /// The routing key of the queue: the requests' `reply_to`.
    pub(crate) fn routing_key(&self) -> &str {
        &self.routing_key
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<Arc<str>, oneshot::Sender<ReplyOutcome>>> {
        self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Wait for the reply with `correlation_id` (register before sending the request).
    /// Refused when the queue takes no more calls (retired, or its consumer ended: a
    /// [`TransportError::Closed`] error, for the caller to register on the live queue
    /// instead), or when [`MAX_PENDING_CALLS`] calls wait already.
    pub(crate) fn await_reply(
        &self,
        correlation_id: &Arc<str>,
    ) -> Result<oneshot::Receiver<ReplyOutcome>, TransportError> {
        let (sender, receiver) = oneshot::channel();
        let mut pending = self.pending();
        // read under the lock `retire` and `shut` set the flag with: a call either waits or
        // is refused
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed {
                what: ClosedPart::Consumer,
                reason: format!("the reply queue {} takes no more calls", self.name),
            });
        }
        let waiting = self.waiting.load(Ordering::Acquire);
        if waiting >= MAX_PENDING_CALLS {
            return Err(TransportError::LimitReached {
                what: Limit::PendingCalls,
                size: waiting as u64 + 1,
                limit: MAX_PENDING_CALLS as u64,
                reason: format!(
                    "{MAX_PENDING_CALLS} RPC calls of this service instance wait for replies already; call refused"
                ),
            });
        }
        if pending.insert(correlation_id.clone(), sender).is_none() {
            self.waiting.fetch_add(1, Ordering::AcqRel);
        }
        Ok(receiver)
    }

    /// Stop waiting for the reply with `correlation_id` (timed out, or given up).
    pub(crate) fn forget(&self, correlation_id: &str) {
        drop(self.take_waiting(correlation_id));
    }

    /// The call waiting for the reply with `correlation_id`, no longer waiting on the queue.
    fn take_waiting(&self, correlation_id: &str) -> Option<oneshot::Sender<ReplyOutcome>> {
        let mut pending = self.pending();
        let sender = pending.remove(correlation_id);
        if sender.is_some() {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
        }
        if pending.is_empty() && self.closed.load(Ordering::Acquire) {
            // the last call waiting on a retired queue: its consumer may end
            self.retired.notify_one();
        }
        sender
    }

    /// Whether the queue was retired (or its consumer ended) and no call waits on it.
    fn drained(&self) -> bool {
        self.closed.load(Ordering::Acquire) && self.pending().is_empty()
    }

    /// What the reply `body` says, read as the queue's protocol writes replies; a body over
    /// `MAX_MESSAGE_SIZE` is not read, as no other body received is.
    fn outcome(&self, body: &[u8]) -> ReplyOutcome {
        check_received_size("RPC reply", body.len(), self.max_size)?;
        match self.protocol {
            Protocol::Nameko => match nameko_wire::parse_reply(body) {
                Ok(outcome) => outcome.map_err(RpcError::from),
                Err(unreadable) => Err(RpcError::InvalidReply(unreadable)),
            },
            Protocol::MicroFramework => match ufw_wire::parse_reply(body) {
                Ok(outcome) => outcome.map_err(RpcError::from),
                Err(unreadable) => Err(RpcError::InvalidReply(unreadable)),
            },
        }
    }

    async fn listen(self: Arc<Self>, mut consumer: Consumer) {
        // The acks in flight, driven here beside the consumer: awaiting each one before the
        // next reply would make every reply wait for the previous reply's ack to be written,
        // and a task per ack would cost a spawn and a wake-up per call.
        let mut acks = FuturesUnordered::new();
        // made once, and again only when it fires: a new one per reply would register with
        // the `Notify` on every reply
        let retired = self.retired.notified();
        tokio::pin!(retired);
        let mut reconnection_watch = tokio::time::interval(RECONNECTION_WATCH);
        reconnection_watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cancelled = false;
        loop {
            let delivery = tokio::select! {
                delivery = consumer.next() => delivery,
                _ = reconnection_watch.tick() => {
                    self.hand_over_after_reconnection();
                    continue;
                }
                () = self.stop_listening.cancelled(), if !cancelled => {
                    // the replies already sent to the consumer still come, then it ends
                    consumer.cancel();
                    cancelled = true;
                    continue;
                }
                Some(acked) = acks.next(), if !acks.is_empty() => {
                    warn_unacked(acked);
                    continue;
                }
                () = &mut retired => {
                    if self.drained() {
                        break;
                    }
                    retired.set(self.retired.notified());
                    continue;
                }
            };
            let Some(delivery) = delivery else { break };
            self.hand_over(&delivery);
            let acker = delivery.acker;
            acks.push(async move { acker.ack().await });
            if self.drained() {
                break;
            }
        }
        match !cancelled && self.reconnected() && !self.drained() {
            // Its consumer ended after a reconnection (the queue went with its node): the
            // calls waiting on it are handed to the queue set up in its place, bound with
            // this one's routing key, to end with their replies or their own timeouts.
            true => {
                self.retire();
                self.set_up_successor();
            }
            false => self.shut(),
        }
        while let Some(acked) = acks.next().await {
            warn_unacked(acked);
        }
        // No call uses the queue again. Deleted, it also leaves the declarations the
        // transport replays after a reconnect, which would set it up again with no consumer.
        if let Some(transport) = self.transport.upgrade() {
            let deleted = transport.delete_queue(&self.name).await;
            if let (false, Err(error)) = (gone(&deleted), &deleted) {
                tracing::debug!("cannot delete the ended reply queue {}: {error}", self.name);
                // its node may be away: tried again after the next set-up, and at the close
                if let Some(listener) = self.listener.upgrade() {
                    listener.undeleted().push(self.name.clone());
                }
            }
        }
        self.listened.cancel();
    }

    /// Whether the connection reconnected since the queue was set up.
    fn reconnected(&self) -> bool {
        let transport = self.transport.upgrade();
        transport.is_some_and(|transport| transport.reconnects() != self.reconnects)
    }

    /// Once the connection has reconnected, have the queue set up that takes over this one's
    /// waiting calls (see [`ReplyListener::queue`]), also when the caller makes no new call.
    fn hand_over_after_reconnection(self: &Arc<Self>) {
        if !self.reconnected() || self.closed.load(Ordering::Acquire) || self.pending().is_empty() {
            return;
        }
        self.set_up_successor();
    }

    /// Have the queue set up that takes over this one's waiting calls, in the background.
    fn set_up_successor(self: &Arc<Self>) {
        let Some(transport) = self.transport.upgrade() else { return };
        let Some(listener) = self.listener.upgrade() else { return };
        if self.succeeding.swap(true, Ordering::AcqRel) {
            return;
        }
        let queue = self.clone();
        tokio::spawn(async move {
            // retires this queue once the new one is up; tried again at the next watch if not
            let set_up = listener.queue(&transport, queue.protocol, &queue.exchange).await;
            if let Err(error) = set_up {
                tracing::debug!("cannot set up a reply queue after a reconnection: {error}");
            }
            queue.succeeding.store(false, Ordering::Release);
        });
    }

    /// Give the reply `delivery` to the call waiting for it, if one does, on this queue or on
    /// one it took over from.
    fn hand_over(&self, delivery: &Delivery) {
        let waiting = delivery.properties.correlation_id.as_deref().and_then(|correlation_id| {
            self.take_waiting(correlation_id).or_else(|| {
                let mut predecessors = self.predecessors.iter().filter_map(Weak::upgrade);
                predecessors.find_map(|queue| queue.take_waiting(correlation_id))
            })
        });
        match waiting {
            Some(sender) => {
                let _ = sender.send(self.outcome(&delivery.body));
            }
            None => tracing::debug!(
                "RPC reply with unknown correlation id {:?} dropped",
                delivery.properties.correlation_id
            ),
        }
    }

    /// After a call timed out: check that replies still reach this queue, by sending one to
    /// it. A probe that does not come back within [`PROBE_TIMEOUT`] means the reply path is
    /// broken (the queue or its binding vanished while the consumer was not told, as RabbitMQ
    /// may do when the queue's node stops), or so slow that a new queue serves better; the
    /// queue is then retired: the next call sets up a new queue, and once no call waits on the
    /// old one (each ends with its reply or its own timeout), its consumer ends and it is
    /// deleted. The waiting calls are not failed: their replies may still come, and a call
    /// failed although it ran invites a retry that runs it twice. At most one probe per
    /// [`PROBE_SPACING`].
    pub(crate) async fn probe(self: Arc<Self>) {
        let Some(transport) = self.transport.upgrade() else { return };
        if !self.probe_due() {
            return;
        }
        let correlation_id: Arc<str> = format!("probe-{}", uuid::Uuid::new_v4()).into();
        let Ok(receiver) = self.await_reply(&correlation_id) else { return };
        let mut properties = json_properties();
        properties.correlation_id = Some(correlation_id.to_string());
        properties.delivery_mode = Some(1);
        let message = OutgoingMessage { body: bytes::Bytes::from_static(b"{}"), properties };
        let sent = tokio::time::timeout(
            PROBE_TIMEOUT,
            transport.publish(
                &self.exchange.name,
                &self.routing_key,
                message,
                PublishOptions::default(),
            ),
        )
        .await;
        let arrived = match sent {
            // A probe that cannot be sent proves nothing about the queue: the connection is
            // down, and the consumer resumes by itself when it is back.
            Ok(Err(_)) | Err(_) => {
                self.forget(&correlation_id);
                return;
            }
            Ok(Ok(())) => tokio::time::timeout(PROBE_TIMEOUT, receiver).await,
        };
        self.forget(&correlation_id);
        if arrived.is_err() {
            tracing::warn!(
                queue = %self.name,
                "RPC replies no longer reach their queue (a probe did not come back within \
                 {PROBE_TIMEOUT:?}): the next call sets up a new reply queue; this one is \
                 deleted once the calls waiting on it end"
            );
            self.retire();
        }
    }

    /// Take no more calls, and let the consumer end once the waiting ones have.
    fn retire(&self) {
        // under the lock `await_reply` reads the flag with
        let _pending = self.pending();
        self.closed.store(true, Ordering::Release);
        self.retired.notify_one();
    }

    /// Take no more calls and fail the waiting ones: dropping their senders tells them that
    /// no reply will come.
    fn shut(&self) {
        let mut pending = self.pending();
        self.closed.store(true, Ordering::Release);
        self.waiting.fetch_sub(pending.len(), Ordering::AcqRel);
        pending.clear();
    }

    /// Whether a probe may start now; if so, the next one waits [`PROBE_SPACING`].
    fn probe_due(&self) -> bool {
        let mut next = self.next_probe.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        if next.is_some_and(|next| now < next) || self.closed.load(Ordering::Acquire) {
            return false;
        }
        *next = Some(now + PROBE_SPACING);
        true
    }
}

/// Whether a queue whose deletion ended with `deleted` is gone: deleted, or not found, but
/// for a durable queue whose node is away (RabbitMQ answers `404` for it, and it comes back
/// with its node).
fn gone<T>(deleted: &Result<T, TransportError>) -> bool {
    match deleted {
        Ok(_) => true,
        Err(TransportError::NotFound(reason)) => !reason.contains("down or inaccessible"),
        Err(_) => false,
    }
}

/// A reply that could not be acked goes back to its queue; it is logged, not retried here.
/// Its call has its reply: one whose channel closed comes again, and is dropped as a reply
/// no call waits for, so that is no warning (a connection's loss would log one per reply in
/// flight).
fn warn_unacked(acked: Result<(), TransportError>) {
    match acked {
        Ok(()) => {}
        Err(error @ TransportError::Closed { .. }) => {
            tracing::debug!("cannot ack an RPC reply, which comes again: {error}");
        }
        Err(error) => tracing::warn!("cannot ack an RPC reply: {error}"),
    }
}
