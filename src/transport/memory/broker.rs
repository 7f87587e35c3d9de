//! [`MemoryBroker`]: the shared broker state, its process-wide registry and its timer.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use crate::transport::TransportError;

use super::state::State;
use super::transport::MemoryTransport;

/// How long the timer thread sleeps at most before checking whether its broker is gone.
const TIMER_IDLE: Duration = Duration::from_secs(1);

/// How an unsettled delivery is settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Settle {
    /// Done: remove it.
    Ack,
    /// Hand it back to its queue.
    Requeue,
    /// Dead-letter (reason `rejected`) or drop it.
    Discard,
}

/// An in-process AMQP 0-9-1 broker (one vhost, `/`).
///
/// Shared by every [`MemoryTransport`] connected to it. Brokers named through
/// [`MemoryBroker::named`] (or `memory://NAME` URIs) live for the rest of the process.
/// Message TTLs and `x-expires` are enforced by a background thread per broker, so they fire
/// without consumers and independently of any tokio runtime.
pub struct MemoryBroker {
    name: String,
    state: Mutex<State>,
    timer: Condvar,
}

impl MemoryBroker {
    /// A new, unregistered broker (dropped with its last handle).
    pub fn new(name: impl Into<String>) -> Arc<Self> {
        let name = name.into();
        let broker = Arc::new_cyclic(|weak| MemoryBroker {
            name: name.clone(),
            state: Mutex::new(State::new(weak.clone())),
            timer: Condvar::new(),
        });
        let weak = Arc::downgrade(&broker);
        let spawned = std::thread::Builder::new()
            .name("memory-broker-timer".to_owned())
            .spawn(move || run_timer(weak));
        if let Err(error) = spawned {
            tracing::error!(broker = %name, %error, "cannot start the in-memory broker timer; TTLs and x-expires will not fire");
        }
        broker
    }

    /// The process-wide broker called `name` (`""` is the default broker), created on first use.
    pub fn named(name: &str) -> Arc<Self> {
        static REGISTRY: OnceLock<Mutex<HashMap<String, Arc<MemoryBroker>>>> = OnceLock::new();
        let registry = REGISTRY.get_or_init(Mutex::default);
        let mut brokers = registry.lock().unwrap_or_else(PoisonError::into_inner);
        brokers.entry(name.to_owned()).or_insert_with(|| MemoryBroker::new(name)).clone()
    }

    /// Bound the memory its ready messages may take (default 256 MiB; bodies plus 256 bytes
    /// a message): a publish beyond it fails with
    /// [`TransportError::LimitReached`](crate::transport::TransportError::LimitReached)
    /// and nothing is enqueued. `memory://NAME?max_bytes=N` sets it on connect.
    pub fn set_max_bytes(&self, max_bytes: u64) {
        self.with_state(|state| state.set_max_bytes(max_bytes));
    }

    /// Emulate the `rabbitmq_delayed_message_exchange` plugin from now on (as
    /// `rabbitmq-plugins enable` does, for the whole broker): exchanges of type
    /// `x-delayed-message` are accepted, with an `x-delayed-type` of an existing type, and
    /// hold each message with an `x-delay` header (ms) that long before routing it like that
    /// type, its `x-delay` then negated. A held message reaches no queue when published, as on
    /// RabbitMQ: a mandatory publish of it fails as unroutable, although it is delivered once
    /// due. `memory://NAME?plugins=rabbitmq_delayed_message_exchange` enables it on connect.
    ///
    /// ```
    /// # async fn demo() -> Result<(), micro_framework::transport::TransportError> {
    /// use micro_framework::transport::memory::MemoryTransport;
    /// use micro_framework::transport::{ExchangeKind, ExchangeSpec, Transport};
    ///
    /// let delayed = ExchangeSpec {
    ///     kind: ExchangeKind::Custom("x-delayed-message".into()),
    ///     arguments: [("x-delayed-type".to_owned(), "direct".into())].into(),
    ///     ..ExchangeSpec::topic("later")
    /// };
    /// let stock = MemoryTransport::connect("memory://doc-stock")?;
    /// assert!(stock.declare_exchange(&delayed).await.is_err());
    /// let plugin = MemoryTransport::connect(
    ///     "memory://doc-plugin?plugins=rabbitmq_delayed_message_exchange",
    /// )?;
    /// plugin.declare_exchange(&delayed).await?;
    /// # Ok(())
    /// # }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
    /// ```
    pub fn enable_delayed_message_plugin(&self) {
        self.with_state(State::enable_delayed_message_plugin);
    }

    /// The broker's name (`""` for the default broker).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A new connection to this broker.
    pub fn connect(self: &Arc<Self>) -> MemoryTransport {
        let connection = self.with_state(State::next_id);
        MemoryTransport::new(Arc::clone(self), connection)
    }

    /// Names of the queues, sorted.
    pub fn queue_names(&self) -> Vec<String> {
        self.with_state(|state| state.queue_names())
    }

    /// Names of the exchanges, sorted (the default exchange `""` is not listed; the
    /// predeclared `amq.*` exchanges are).
    pub fn exchange_names(&self) -> Vec<String> {
        self.with_state(|state| state.exchange_names())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the state under the lock, then drops what it discarded (consumer
    /// senders, undeliverable deliveries) and wakes the timer if asked, outside the lock.
    pub(super) fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut state = self.lock();
        let result = f(&mut state);
        let (garbage, notify) = state.take_garbage();
        drop(state);
        if notify {
            self.timer.notify_one();
        }
        drop(garbage);
        result
    }

    /// Settles delivery `tag`.
    pub(super) fn settle(&self, tag: u64, how: Settle) -> Result<(), TransportError> {
        self.with_state(|state| state.settle(tag, how, Instant::now()))
    }
}

/// The timer thread: expires messages and queues when due, sleeping in between.
fn run_timer(broker: Weak<MemoryBroker>) {
    while let Some(broker) = broker.upgrade() {
        broker.with_state(|state| state.tick(Instant::now()));
        let state = broker.lock();
        if let Some(deadline) = state.timer_wait() {
            let timeout = deadline
                .map_or(TIMER_IDLE, |at| at.saturating_duration_since(Instant::now()))
                .min(TIMER_IDLE);
            let waited = broker.timer.wait_timeout(state, timeout);
            drop(waited.unwrap_or_else(PoisonError::into_inner));
        }
    }
}

impl fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBroker").field("name", &self.name).finish_non_exhaustive()
    }
}
