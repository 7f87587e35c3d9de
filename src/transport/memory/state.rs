//! The broker's state and every operation on it. Runs under the broker's mutex: nothing
//! here blocks, awaits, or drops a delivery (dropped senders and deliveries go to
//! [`Garbage`], released once the lock is let go).

use std::collections::HashMap;
use std::mem;
use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::transport::{
    BindingSpec, Delivery, ExchangeKind, ExchangeSpec, Headers, Limit, QueueInfo, QueueSpec,
    TransportError,
};

use super::acker::MemoryAcker;
use super::arguments::{self, QueueArgs};
use super::broker::MemoryBroker;
use super::dead_letter::Reason;
use super::delayed::{self, HeldMessages};
use super::queue::{Entry, Message, Queue, ReadyBytes, MESSAGE_OVERHEAD};
use super::routing::{self, Exchange};

mod consumers;
mod delayed_messages;
mod flow;

/// Buffer of a consumer with unlimited prefetch (a full buffer pauses its deliveries).
const UNLIMITED_BUFFER: usize = 4096;

/// Things to drop after the broker lock is released (their drop may re-enter the broker).
#[derive(Default)]
pub(super) struct Garbage {
    senders: Vec<mpsc::Sender<Delivery>>,
    deliveries: Vec<Delivery>,
}

/// What the broker's timer task needs once the lock is let go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TimerCall {
    /// Nothing.
    None,
    /// An earlier deadline came: wake it.
    Wake,
    /// A deadline came and no timer task runs: start one.
    Start,
}

/// A delivery handed out and not settled yet.
struct Unacked {
    queue: String,
    queue_id: u64,
    consumer: Option<u64>,
    connection: u64,
    entry: Entry,
}

/// A message on its way to a dead-letter exchange.
struct DeadLetter {
    queue: String,
    reason: Reason,
    message: Message,
    exchange: String,
    routing_key: Option<String>,
}

/// What a new consumer needs outside the lock.
pub(super) struct NewConsumer {
    /// Its tag.
    pub tag: String,
    /// Its deliveries.
    pub deliveries: mpsc::Receiver<Delivery>,
    /// Its queue's id.
    pub queue_id: u64,
    /// Its id.
    pub id: u64,
}

/// Bookkeeping shared by the operations, split from the queue and exchange maps so both
/// can be borrowed at once.
struct Core {
    broker: Weak<MemoryBroker>,
    unacked: HashMap<u64, Unacked>,
    next_id: u64,
    /// The earliest deadline of the timer's work, if any.
    timer_deadline: Option<Instant>,
    /// Whether a timer task runs (or is about to).
    timer_running: bool,
    /// Whether the timer task must wake before its deadline.
    notify_timer: bool,
    garbage: Garbage,
}

/// Exchanges, queues and deliveries of one broker.
pub(super) struct State {
    exchanges: HashMap<String, Exchange>,
    queues: HashMap<String, Queue>,
    core: Core,
    /// The most memory ready messages may take (see [`MemoryBroker::set_max_bytes`]).
    max_bytes: u64,
    /// Whether the delayed-message plugin is enabled.
    delayed_message_plugin: bool,
    /// The messages its delayed exchanges hold.
    held: HeldMessages,
    /// What the ready messages of its queues take.
    ready: ReadyBytes,
}

/// The default bound of an in-process broker's ready messages.
pub(super) const DEFAULT_MAX_BYTES: u64 = 256 * 1024 * 1024;

fn not_found_queue(name: &str) -> TransportError {
    TransportError::NotFound(format!("no {}", arguments::queue_resource(name)))
}

fn not_found_exchange(name: &str) -> TransportError {
    TransportError::NotFound(format!("no exchange '{name}' in vhost '/'"))
}

fn default_exchange_refused() -> TransportError {
    TransportError::AccessRefused(
        "ACCESS_REFUSED - operation not permitted on the default exchange".to_owned(),
    )
}

fn locked(name: &str) -> TransportError {
    TransportError::ResourceLocked(format!(
        "cannot obtain exclusive access to locked {}. It could be originally declared on \
         another connection or the exclusive property value does not match that of the \
         original declaration.",
        arguments::queue_resource(name)
    ))
}

/// A per-message `expiration`: decimal milliseconds up to ten years, as RabbitMQ checks it.
fn parse_expiration(expiration: Option<&str>) -> Result<Option<Duration>, TransportError> {
    expiration
        .map(|text| {
            let invalid = |why: &str| {
                TransportError::PreconditionFailed(format!("invalid expiration '{text}'{why}"))
            };
            let digits = text.strip_prefix('+').unwrap_or(text);
            if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
                return Err(invalid(""));
            }
            match digits.parse::<u64>() {
                Ok(ms) if ms <= arguments::MAX_EXPIRY_MS => Ok(Duration::from_millis(ms)),
                _ => Err(invalid(&format!(": {{value_too_large,{text}}}"))),
            }
        })
        .transpose()
}

impl Core {
    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Makes sure the timer wakes up by `deadline`.
    fn schedule(&mut self, deadline: Option<Instant>) {
        if let Some(deadline) = deadline {
            if self.timer_deadline.is_none_or(|current| deadline < current) {
                self.timer_deadline = Some(deadline);
                self.notify_timer = true;
            }
        }
    }

    /// A delivery of `entry` from `queue` with a fresh tag, taken by a `basic.get` when
    /// `fetched`.
    fn delivery(&mut self, queue: &Queue, entry: &Entry, fetched: bool) -> (u64, Delivery) {
        let tag = self.next_id();
        let delivery = Delivery {
            exchange: entry.message.exchange.clone(),
            routing_key: entry.message.routing_key.clone(),
            redelivered: entry.redelivered,
            body: entry.message.body.clone(),
            properties: queue.delivery_properties(entry, fetched),
            acker: Box::new(MemoryAcker::new(self.broker.clone(), tag)),
        };
        (tag, delivery)
    }

    /// Sends `entry` to the consumer at `index`; a consumer whose receiver is gone is
    /// detached and the message goes back to the queue.
    fn deliver(&mut self, queue: &mut Queue, index: usize, entry: Entry) {
        let (tag, delivery) = self.delivery(queue, &entry, false);
        let slot = &mut queue.consumers[index];
        match slot.sender.try_send(delivery) {
            Ok(()) => {
                slot.unacked += 1;
                let unacked = Unacked {
                    queue: queue.spec.name.clone(),
                    queue_id: queue.id,
                    consumer: Some(slot.id),
                    connection: slot.connection,
                    entry,
                };
                self.unacked.insert(tag, unacked);
            }
            Err(error) => {
                self.garbage.deliveries.push(error.into_inner());
                let id = slot.id;
                if let Some(slot) = queue.remove_consumer(id) {
                    self.garbage.senders.push(slot.sender);
                }
                queue.requeue(entry);
            }
        }
    }
}

/// Queues `entry`'s message for dead-lettering if `queue` has a dead-letter exchange.
fn discard(queue: &Queue, entry: Entry, reason: Reason, dead: &mut Vec<DeadLetter>) {
    if let Some(exchange) = &queue.args.dead_letter_exchange {
        dead.push(DeadLetter {
            queue: queue.spec.name.clone(),
            reason,
            message: entry.message,
            exchange: exchange.clone(),
            routing_key: queue.args.dead_letter_routing_key.clone(),
        });
    }
}

impl State {
    /// Bound the memory ready messages may take.
    pub fn set_max_bytes(&mut self, max_bytes: u64) {
        self.max_bytes = max_bytes;
    }

    /// Enable the emulation of the `rabbitmq_delayed_message_exchange` plugin.
    pub fn enable_delayed_message_plugin(&mut self) {
        self.delayed_message_plugin = true;
    }

    /// Refuse a message of `size` bytes routed to `copies` queues when the ready messages
    /// would take more than the broker's bound.
    fn check_room(&self, size: usize, copies: usize) -> Result<(), TransportError> {
        let held: u64 = self.ready.load(Ordering::Relaxed)
            + self.held.bytes()
            + self.held.len() as u64 * MESSAGE_OVERHEAD;
        let wanted = (size as u64 + MESSAGE_OVERHEAD) * copies as u64;
        if held + wanted > self.max_bytes {
            return Err(TransportError::LimitReached {
                what: Limit::BrokerMemory,
                size: held + wanted,
                limit: self.max_bytes,
                reason: format!(
                    "the in-process broker holds {held} bytes of ready messages and its bound is \
                     {} (memory://NAME?max_bytes=N); publish refused until consumers catch up",
                    self.max_bytes
                ),
            });
        }
        Ok(())
    }

    /// An empty broker state with the predeclared `amq.*` exchanges.
    pub fn new(broker: Weak<MemoryBroker>) -> Self {
        let mut exchanges = HashMap::new();
        for (name, kind) in [
            ("amq.direct", ExchangeKind::Direct),
            ("amq.fanout", ExchangeKind::Fanout),
            ("amq.topic", ExchangeKind::Topic),
            ("amq.headers", ExchangeKind::Headers),
            ("amq.match", ExchangeKind::Headers),
        ] {
            let spec = ExchangeSpec {
                name: name.to_owned(),
                kind,
                durable: true,
                auto_delete: false,
                arguments: Headers::new(),
            };
            exchanges.insert(name.to_owned(), Exchange::new(spec, None));
        }
        State {
            exchanges,
            max_bytes: DEFAULT_MAX_BYTES,
            delayed_message_plugin: false,
            held: HeldMessages::default(),
            ready: ReadyBytes::default(),
            queues: HashMap::new(),
            core: Core {
                broker,
                unacked: HashMap::new(),
                next_id: 0,
                timer_deadline: None,
                timer_running: false,
                notify_timer: false,
                garbage: Garbage::default(),
            },
        }
    }

    /// A fresh id for a connection.
    pub fn next_id(&mut self) -> u64 {
        self.core.next_id()
    }

    /// Takes what must be dropped outside the lock, and what the timer task needs.
    pub fn take_garbage(&mut self) -> (Garbage, TimerCall) {
        let notify = mem::take(&mut self.core.notify_timer);
        let timer = if self.core.timer_deadline.is_none() {
            TimerCall::None
        } else if !self.core.timer_running {
            self.core.timer_running = true;
            TimerCall::Start
        } else if notify {
            TimerCall::Wake
        } else {
            TimerCall::None
        };
        (mem::take(&mut self.core.garbage), timer)
    }

    /// The timer task ended before its work was done: whether another must start (it is
    /// then counted as running).
    pub fn timer_lost(&mut self) -> bool {
        self.core.timer_running = self.core.timer_deadline.is_some();
        self.core.timer_running
    }

    /// Sorted queue names.
    pub fn queue_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.queues.keys().cloned().collect();
        names.sort();
        names
    }

    /// Sorted exchange names (without the default exchange).
    pub fn exchange_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.exchanges.keys().cloned().collect();
        names.sort();
        names
    }

    fn queue(&self, connection: u64, name: &str) -> Result<&Queue, TransportError> {
        let queue = self.queues.get(name).ok_or_else(|| not_found_queue(name))?;
        if queue.owner.is_some_and(|owner| owner != connection) {
            return Err(locked(name));
        }
        Ok(queue)
    }

    fn queue_mut(&mut self, connection: u64, name: &str) -> Result<&mut Queue, TransportError> {
        self.queue(connection, name)?;
        self.queues.get_mut(name).ok_or_else(|| not_found_queue(name))
    }

    // ----- declarations -----

    /// `exchange.declare`.
    pub fn declare_exchange(&mut self, spec: &ExchangeSpec) -> Result<(), TransportError> {
        if spec.name.is_empty() {
            return Err(default_exchange_refused());
        }
        let kind = match spec.kind.as_str() {
            delayed::EXCHANGE_TYPE if self.delayed_message_plugin => spec.kind.clone(),
            _ => routing::normalize_kind(&spec.kind)?,
        };
        if let Some(existing) = self.exchanges.get(&spec.name) {
            let current = &existing.spec;
            let resource = format!("exchange '{}' in vhost '/'", spec.name);
            let fields = [
                ("type", current.kind.as_str().to_owned(), kind.as_str().to_owned()),
                ("durable", current.durable.to_string(), spec.durable.to_string()),
                ("auto_delete", current.auto_delete.to_string(), spec.auto_delete.to_string()),
            ];
            for (field, now, asked) in fields {
                if now != asked {
                    return Err(TransportError::PreconditionFailed(format!(
                        "inequivalent arg '{field}' for {resource}: received '{asked}' but \
                         current is '{now}'"
                    )));
                }
            }
            let now = current.arguments.get("alternate-exchange");
            let asked = spec.arguments.get("alternate-exchange");
            if now != asked {
                return Err(TransportError::PreconditionFailed(format!(
                    "inequivalent arg 'alternate-exchange' for {resource}: received {} but \
                     current is {}",
                    arguments::describe_value(asked),
                    arguments::describe_value(now)
                )));
            }
            return Ok(());
        }
        if spec.name.starts_with("amq.") {
            return Err(TransportError::AccessRefused(format!(
                "ACCESS_REFUSED - exchange name '{}' contains reserved prefix 'amq.*'",
                spec.name
            )));
        }
        let delayed = match &kind {
            ExchangeKind::Custom(_) => Some(delayed::delayed_type(spec)?),
            _ => None,
        };
        let spec = ExchangeSpec { kind, ..spec.clone() };
        self.exchanges.insert(spec.name.clone(), Exchange::new(spec, delayed));
        Ok(())
    }

    /// `queue.declare`.
    pub fn declare_queue(
        &mut self,
        connection: u64,
        spec: &QueueSpec,
        now: Instant,
    ) -> Result<QueueInfo, TransportError> {
        if spec.name.is_empty() {
            return Err(TransportError::Invalid("queue name must not be empty".to_owned()));
        }
        let owner = spec.exclusive.then_some(connection);
        if let Some(queue) = self.queues.get_mut(&spec.name) {
            if queue.owner != owner {
                return Err(locked(&spec.name));
            }
            arguments::check_equivalence(&queue.spec, spec)?;
            queue.last_used = now;
            return Ok(QueueInfo {
                message_count: queue.message_count(),
                consumer_count: queue.consumer_count(),
            });
        }
        if spec.name.starts_with("amq.") {
            return Err(TransportError::AccessRefused(format!(
                "ACCESS_REFUSED - queue name '{}' contains reserved prefix 'amq.*'",
                spec.name
            )));
        }
        let args = QueueArgs::parse(spec)?;
        let id = self.core.next_id();
        let queue = Queue::new(id, spec.clone(), args, owner, now, self.ready.clone());
        self.core.schedule(queue.deadline());
        self.queues.insert(spec.name.clone(), queue);
        Ok(QueueInfo::default())
    }

    /// Passive `queue.declare`. Like an active one, it counts as use of the queue: on
    /// RabbitMQ it restarts the `x-expires` countdown, so a queue polled for its length does
    /// not expire.
    pub fn queue_info(
        &mut self,
        connection: u64,
        name: &str,
        now: Instant,
    ) -> Result<QueueInfo, TransportError> {
        let queue = self.queue_mut(connection, name)?;
        queue.last_used = now;
        Ok(QueueInfo {
            message_count: queue.message_count(),
            consumer_count: queue.consumer_count(),
        })
    }

    /// `queue.bind`.
    pub fn bind(&mut self, connection: u64, binding: &BindingSpec) -> Result<(), TransportError> {
        if binding.exchange.is_empty() {
            return Err(default_exchange_refused());
        }
        self.queue(connection, &binding.queue)?;
        let exchange = self
            .exchanges
            .get_mut(&binding.exchange)
            .ok_or_else(|| not_found_exchange(&binding.exchange))?;
        if *exchange.routes_like() == ExchangeKind::Headers {
            routing::check_x_match(&binding.arguments)?;
        }
        exchange.bind(&binding.queue, &binding.routing_key, &binding.arguments);
        Ok(())
    }

    /// `queue.delete` (idempotent, as on RabbitMQ): the ready count of the deleted queue.
    pub fn delete_queue(&mut self, connection: u64, name: &str) -> Result<u32, TransportError> {
        if !self.queues.contains_key(name) {
            return Ok(0);
        }
        self.queue(connection, name)?;
        Ok(self.remove_queue(name).unwrap_or(0))
    }

    /// Removes a queue, ending its consumers and dropping its bindings (auto-deleting
    /// exchanges left without bindings). Its unacknowledged deliveries settle as no-ops.
    pub(super) fn remove_queue(&mut self, name: &str) -> Option<u32> {
        let mut queue = self.queues.remove(name)?;
        let consumers = mem::take(&mut queue.consumers);
        self.core.garbage.senders.extend(consumers.into_iter().map(|slot| slot.sender));
        let mut emptied = Vec::new();
        for (exchange_name, exchange) in &mut self.exchanges {
            if exchange.unbind_queue(name)
                && exchange.bindings.is_empty()
                && exchange.spec.auto_delete
            {
                emptied.push(exchange_name.clone());
            }
        }
        for exchange in emptied {
            self.exchanges.remove(&exchange);
        }
        Some(u32::try_from(queue.ready.len()).unwrap_or(u32::MAX))
    }

    /// `exchange.delete` (idempotent, as on RabbitMQ).
    pub fn delete_exchange(&mut self, name: &str) -> Result<(), TransportError> {
        if name.is_empty() {
            return Err(default_exchange_refused());
        }
        if name.starts_with("amq.") {
            return Err(TransportError::AccessRefused(format!(
                "ACCESS_REFUSED - deletion of system exchange '{name}' in vhost '/' is not allowed"
            )));
        }
        self.exchanges.remove(name);
        Ok(())
    }

    /// `queue.purge`.
    pub fn purge(
        &mut self,
        connection: u64,
        name: &str,
        now: Instant,
    ) -> Result<u32, TransportError> {
        let count = self.queue_mut(connection, name)?.purge();
        self.run(vec![name.to_owned()], Vec::new(), now);
        Ok(count)
    }
}
