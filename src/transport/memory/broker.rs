//! [`MemoryBroker`]: the shared broker state, its process-wide registry and its timer.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};

use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::transport::TransportError;

use super::state::{State, TimerCall};
use super::transport::MemoryTransport;

/// How an unsettled delivery is settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Settle {
    /// Done: remove it.
    Ack,
    /// Hand it back to its queue (a nack, a reject).
    Requeue,
    /// Hand it back as its connection closed: a quorum queue of RabbitMQ 3.10 puts such
    /// messages back in front, where a nack puts them behind.
    Return,
    /// Dead-letter (reason `rejected`) or drop it.
    Discard,
}

/// An in-process AMQP 0-9-1 broker (one vhost, `/`).
///
/// Shared by every [`MemoryTransport`] connected to it. Brokers named through
/// [`MemoryBroker::named`] (or `memory://NAME` URIs) live for the rest of the process.
///
/// Message TTLs, `x-expires` and delayed messages fire without consumers, from a timer task
/// on the tokio runtime of the operation that set the first pending deadline (on a thread of
/// the broker's own when no runtime is current, or when that runtime ends first). Its times
/// are tokio's: under a paused clock (`tokio::time::pause`, `#[tokio::test(start_paused =
/// true)]`) they follow the test clock, so a test of a 10 s TTL takes no real time. A paused
/// test needs a broker of its own (`memory://` with a unique name, as `testing::test_config`
/// gives), so that no other runtime's clock drives its timer.
pub struct MemoryBroker {
    name: String,
    state: Mutex<State>,
    me: Weak<MemoryBroker>,
    wake_timer: Arc<Notify>,
}

impl MemoryBroker {
    /// A new, unregistered broker (dropped with its last handle).
    pub fn new(name: impl Into<String>) -> Arc<Self> {
        Arc::new_cyclic(|weak| MemoryBroker {
            name: name.into(),
            state: Mutex::new(State::new(weak.clone())),
            me: weak.clone(),
            wake_timer: Arc::new(Notify::new()),
        })
    }

    /// The process-wide broker called `name` (`""` is the default broker), created on first use.
    pub fn named(name: &str) -> Arc<Self> {
        static REGISTRY: OnceLock<Mutex<HashMap<String, Arc<MemoryBroker>>>> = OnceLock::new();
        let registry = REGISTRY.get_or_init(Mutex::default);
        let mut brokers = registry.lock().unwrap_or_else(PoisonError::into_inner);
        brokers.entry(name.to_owned()).or_insert_with(|| MemoryBroker::new(name)).clone()
    }

    /// Bound the memory its ready messages may take (default 256 MiB; bodies plus 256 bytes
    /// a message): a publish beyond it fails with [`TransportError::LimitReached`] and
    /// nothing is enqueued. `memory://NAME?max_bytes=N` sets it on connect.
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
    /// senders, undeliverable deliveries) and starts or wakes the timer if asked, outside the
    /// lock.
    pub(super) fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut state = self.lock();
        let result = f(&mut state);
        let (garbage, timer) = state.take_garbage();
        drop(state);
        match timer {
            TimerCall::None => {}
            TimerCall::Wake => self.wake_timer.notify_one(),
            TimerCall::Start => self.start_timer(Handle::try_current().ok()),
        }
        drop(garbage);
        result
    }

    /// Starts the timer task on `runtime`, or on the broker's own thread.
    fn start_timer(&self, runtime: Option<Handle>) {
        let task = run_timer(TimerRun { broker: self.me.clone(), done: false });
        match runtime.or_else(|| own_runtime().cloned()) {
            Some(runtime) => drop(runtime.spawn(task)),
            None => tracing::error!(
                broker = %self.name,
                "no tokio runtime for the in-memory broker's timer; TTLs, x-expires and \
                 delayed messages will not fire"
            ),
        }
    }

    /// Settles delivery `tag`.
    pub(super) fn settle(&self, tag: u64, how: Settle) -> Result<(), TransportError> {
        self.with_state(|state| state.settle(tag, how, Instant::now()))
    }
}

/// The timer task: routes delayed messages, expires messages and deletes unused queues when
/// due, by the clock of the runtime it runs on. It ends when nothing is due any more (the
/// next deadline starts another) or its broker is gone.
async fn run_timer(mut run: TimerRun) {
    loop {
        let Some(broker) = run.broker.upgrade() else { break };
        let next = broker.with_state(|state| state.tick(Instant::now()));
        let wake = Arc::clone(&broker.wake_timer);
        drop(broker);
        let Some(deadline) = next else { break };
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {}
            _ = wake.notified() => {}
        }
    }
    run.done = true;
}

/// A running timer task. Dropped before it is done (its runtime shut down, or it panicked),
/// it hands the broker's pending deadlines to the broker's own thread.
struct TimerRun {
    broker: Weak<MemoryBroker>,
    done: bool,
}

impl Drop for TimerRun {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some(broker) = self.broker.upgrade() {
            if broker.lock().timer_lost() {
                broker.start_timer(None);
            }
        }
    }
}

/// The runtime of the broker's own thread, started on first need, for timers set where no
/// runtime is current or whose runtime ended.
fn own_runtime() -> Option<&'static Handle> {
    static OWN: OnceLock<Option<Handle>> = OnceLock::new();
    OWN.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build();
        let started = runtime.and_then(|runtime| {
            let handle = runtime.handle().clone();
            std::thread::Builder::new()
                .name("memory-broker-timer".to_owned())
                .spawn(move || runtime.block_on(std::future::pending::<()>()))
                .map(|_| handle)
        });
        started
            .map_err(
                |error| tracing::error!(%error, "cannot start the in-memory broker's timer thread"),
            )
            .ok()
    })
    .as_ref()
}

impl fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBroker").field("name", &self.name).finish_non_exhaustive()
    }
}
