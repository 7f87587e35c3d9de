//! A queue's state: its declaration, parsed arguments, ready messages and consumers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::transport::{Delivery, HeaderValue, Properties, QueueSpec};

use super::arguments::QueueArgs;

/// What a ready message counts for besides its body, so empty messages count too.
pub(super) const MESSAGE_OVERHEAD: u64 = 256;

/// What the ready messages of every queue of a broker take (bodies and
/// [`MESSAGE_OVERHEAD`] each), kept up to date by the queues: the broker's bound is checked on
/// every publish, which adding the queues up would make cost more with every queue.
pub(super) type ReadyBytes = Arc<AtomicU64>;

/// A message as it sits in a queue.
#[derive(Clone, Debug)]
pub(super) struct Message {
    /// Exchange it was (last) published to.
    pub exchange: String,
    /// Routing key it was (last) published with.
    pub routing_key: String,
    /// The keys of its `CC` and `BCC` headers when published, which route it besides
    /// `routing_key` (kept for its dead-lettering, as RabbitMQ keeps them: `BCC` is gone
    /// from its headers).
    pub header_routes: Vec<String>,
    /// The body.
    pub body: Bytes,
    /// The properties.
    pub properties: Properties,
}

impl Message {
    /// Every key it is routed with: its routing key, then those of its `CC` and `BCC`.
    pub fn routing_keys(&self) -> Vec<&str> {
        let header_routes = self.header_routes.iter().map(String::as_str);
        std::iter::once(self.routing_key.as_str()).chain(header_routes).collect()
    }
}

/// A message in a queue (ready or unacknowledged) with its per-queue bookkeeping.
#[derive(Debug)]
pub(super) struct Entry {
    /// Enqueue order; requeued entries go back to their place by this number.
    pub seq: u64,
    /// The message.
    pub message: Message,
    /// Delivered before and handed back.
    pub redelivered: bool,
    /// Times handed back (quorum `x-delivery-count`).
    pub delivery_count: u32,
    /// When it expires (queue TTL or per-message expiration), fixed at enqueue.
    pub expires_at: Option<Instant>,
}

/// A consumer attached to a queue.
#[derive(Debug)]
pub(super) struct ConsumerSlot {
    /// Broker-wide consumer id.
    pub id: u64,
    /// Consumer tag.
    pub tag: String,
    /// Connection (transport handle) it belongs to.
    pub connection: u64,
    /// Maximum unacknowledged deliveries (0 = unlimited).
    pub prefetch: u16,
    /// Unacknowledged deliveries it holds.
    pub unacked: u32,
    /// Exclusive consumer.
    pub exclusive: bool,
    /// Where its deliveries go.
    pub sender: mpsc::Sender<Delivery>,
}

impl ConsumerSlot {
    /// Whether it may receive one more delivery now.
    fn has_credit(&self) -> bool {
        (self.prefetch == 0 || self.unacked < u32::from(self.prefetch))
            && self.sender.capacity() > 0
    }
}

/// A declared queue.
#[derive(Debug)]
pub(super) struct Queue {
    /// Broker-wide id, distinguishing a re-created queue from a deleted one of the same name.
    pub id: u64,
    /// The declaration.
    pub spec: QueueSpec,
    /// Parsed arguments.
    pub args: QueueArgs,
    /// The connection owning an exclusive queue.
    pub owner: Option<u64>,
    /// Ready messages, in `seq` order.
    pub ready: VecDeque<Entry>,
    /// Sum of the body sizes of the ready messages.
    pub ready_bytes: u64,
    /// Attached consumers, in attach order.
    pub consumers: Vec<ConsumerSlot>,
    /// Round-robin cursor into `consumers`.
    pub cursor: usize,
    /// Whether it ever had a consumer (auto-delete only fires after the first one).
    pub had_consumer: bool,
    /// Last declare, get or consumer activity (for `x-expires`).
    pub last_used: Instant,
    /// The broker's count, this queue's messages included.
    broker_ready: ReadyBytes,
}

impl Queue {
    /// A new empty queue.
    pub fn new(
        id: u64,
        spec: QueueSpec,
        args: QueueArgs,
        owner: Option<u64>,
        now: Instant,
        broker_ready: ReadyBytes,
    ) -> Self {
        Queue {
            id,
            spec,
            args,
            owner,
            ready: VecDeque::new(),
            ready_bytes: 0,
            consumers: Vec::new(),
            cursor: 0,
            had_consumer: false,
            last_used: now,
            broker_ready,
        }
    }

    /// Appends a ready message.
    pub fn push_back(&mut self, entry: Entry) {
        self.count_in(&entry);
        self.ready.push_back(entry);
    }

    /// Puts a handed-back message at its original place (by enqueue order).
    pub fn requeue(&mut self, entry: Entry) {
        self.count_in(&entry);
        let at = self.ready.partition_point(|other| other.seq < entry.seq);
        self.ready.insert(at, entry);
    }

    /// Puts a message its consumer handed back where RabbitMQ 3.10 does: at its original
    /// place in a classic queue, behind the messages never delivered in a quorum queue.
    pub fn hand_back(&mut self, entry: Entry) {
        match self.args.quorum {
            true => self.push_back(entry),
            false => self.requeue(entry),
        }
    }

    /// Removes the head message.
    pub fn pop_front(&mut self) -> Option<Entry> {
        let entry = self.ready.pop_front()?;
        let size = entry.message.body.len() as u64;
        self.ready_bytes -= size;
        self.broker_ready.fetch_sub(size + MESSAGE_OVERHEAD, Ordering::Relaxed);
        Some(entry)
    }

    fn count_in(&mut self, entry: &Entry) {
        let size = entry.message.body.len() as u64;
        self.ready_bytes += size;
        self.broker_ready.fetch_add(size + MESSAGE_OVERHEAD, Ordering::Relaxed);
    }

    /// What its ready messages take, as the broker counts them.
    fn held(&self) -> u64 {
        self.ready_bytes + self.ready.len() as u64 * MESSAGE_OVERHEAD
    }

    /// Removes every ready message, returning how many there were.
    pub fn purge(&mut self) -> u32 {
        let count = self.ready.len();
        self.broker_ready.fetch_sub(self.held(), Ordering::Relaxed);
        self.ready.clear();
        self.ready_bytes = 0;
        u32::try_from(count).unwrap_or(u32::MAX)
    }

    /// Ready message count.
    pub fn message_count(&self) -> u32 {
        u32::try_from(self.ready.len()).unwrap_or(u32::MAX)
    }

    /// Consumer count.
    pub fn consumer_count(&self) -> u32 {
        u32::try_from(self.consumers.len()).unwrap_or(u32::MAX)
    }

    /// Whether the ready messages exceed `x-max-length` / `x-max-length-bytes`.
    pub fn over_limit(&self) -> bool {
        self.args.max_length.is_some_and(|max| self.ready.len() as u64 > max)
            || self.args.max_length_bytes.is_some_and(|max| self.ready_bytes > max)
    }

    /// Whether one more message of `size` bytes is over the limits. A quorum queue of
    /// RabbitMQ 3.10 takes the message that crosses a limit and refuses while it is over it;
    /// a classic one refuses the message that would cross it.
    pub fn would_overflow(&self, size: usize) -> bool {
        if self.args.quorum {
            return self.over_limit();
        }
        self.args.max_length.is_some_and(|max| self.ready.len() as u64 + 1 > max)
            || self.args.max_length_bytes.is_some_and(|max| self.ready_bytes + size as u64 > max)
    }

    /// When the queue expires for lack of use (`x-expires`), if it has no consumers.
    pub fn unused_deadline(&self) -> Option<Instant> {
        if self.consumers.is_empty() {
            self.args.expires.map(|expires| self.last_used + expires)
        } else {
            None
        }
    }

    /// The next instant at which the timer has something to do for this queue.
    pub fn deadline(&self) -> Option<Instant> {
        let head = self.ready.front().and_then(|entry| entry.expires_at);
        match (head, self.unused_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The index of the next consumer (round-robin) that may take a delivery, advancing
    /// the cursor past it.
    pub fn next_consumer(&mut self) -> Option<usize> {
        let count = self.consumers.len();
        if count == 0 {
            return None;
        }
        if self.args.single_active_consumer {
            return self.consumers[0].has_credit().then_some(0);
        }
        for step in 0..count {
            let index = (self.cursor + step) % count;
            if self.consumers[index].has_credit() {
                self.cursor = (index + 1) % count;
                return Some(index);
            }
        }
        None
    }

    /// Detaches a consumer, returning it.
    pub fn remove_consumer(&mut self, id: u64) -> Option<ConsumerSlot> {
        let index = self.consumers.iter().position(|slot| slot.id == id)?;
        let slot = self.consumers.remove(index);
        if self.cursor > index {
            self.cursor -= 1;
        }
        if self.cursor >= self.consumers.len() {
            self.cursor = 0;
        }
        Some(slot)
    }

    /// The headers of a delivery of `entry` from this queue: a quorum queue adds
    /// `x-delivery-count` to what a `basic.get` takes (`fetched`), and to a consumer's
    /// delivery once the message has been handed back (RabbitMQ 3.10).
    pub fn delivery_properties(&self, entry: &Entry, fetched: bool) -> Properties {
        let mut properties = entry.message.properties.clone();
        if self.args.quorum && (fetched || entry.delivery_count > 0) {
            properties.headers.insert(
                "x-delivery-count".to_owned(),
                HeaderValue::Int(i64::from(entry.delivery_count)),
            );
        }
        properties
    }
}

impl Drop for Queue {
    /// A deleted queue's messages go with it.
    fn drop(&mut self) {
        self.broker_ready.fetch_sub(self.held(), Ordering::Relaxed);
    }
}
