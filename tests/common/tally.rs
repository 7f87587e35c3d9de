//! Unique ids counted end to end: when each was sent, how often it was handled, whether its
//! RPC call got the reply, and how long the flows took to recover from a fault.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// The path an id takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// An event published to the service.
    Event,
    /// An RPC call to the service, retried until replied.
    Rpc,
}

struct Entry {
    flow: Flow,
    sent: Instant,
    handled: u64,
    replied: bool,
    done: Option<Instant>,
}

impl Entry {
    fn is_done(&self) -> bool {
        self.handled > 0 && (self.flow == Flow::Event || self.replied)
    }
}

#[derive(Default)]
struct Inner {
    entries: HashMap<u64, Entry>,
    publish_retries: u64,
    rpc_retries: u64,
}

/// Shared by the load and the service's routes.
#[derive(Default)]
pub struct Tally {
    inner: Mutex<Inner>,
}

/// How the flows came through a fault that took effect at some instant.
#[derive(Debug)]
pub struct Recovery {
    /// From the fault to the first event sent after it and handled.
    pub event: Duration,
    /// From the fault to the first RPC call made after it and replied.
    pub rpc: Duration,
    /// From the fault to the moment every id sent before it was done (zero if all were done
    /// before the fault).
    pub in_flight: Duration,
}

/// The end result.
#[derive(Debug)]
pub struct Summary {
    pub sent: u64,
    pub done: u64,
    /// Executions beyond the first, over all ids.
    pub duplicates: u64,
    /// Ids not done, with their flow.
    pub lost: Vec<(u64, Flow)>,
    pub publish_retries: u64,
    pub rpc_retries: u64,
}

impl Tally {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `id` is about to be sent for the first time.
    pub fn sent(&self, id: u64, flow: Flow) {
        let entry = Entry { flow, sent: Instant::now(), handled: 0, replied: false, done: None };
        self.inner().entries.insert(id, entry);
    }

    /// The service ran its target for `id`.
    pub fn handled(&self, id: u64) {
        self.update(id, |entry| entry.handled += 1);
    }

    /// The RPC call of `id` got its reply.
    pub fn replied(&self, id: u64) {
        self.update(id, |entry| entry.replied = true);
    }

    fn update(&self, id: u64, change: impl FnOnce(&mut Entry)) {
        let mut inner = self.inner();
        let entry = inner.entries.get_mut(&id).unwrap_or_else(|| panic!("id {id} was never sent"));
        change(entry);
        if entry.done.is_none() && entry.is_done() {
            entry.done = Some(Instant::now());
        }
    }

    pub fn publish_retry(&self) {
        self.inner().publish_retries += 1;
    }

    pub fn rpc_retry(&self) {
        self.inner().rpc_retries += 1;
    }

    /// How the flows came through a fault at `fault`, once both flows have an id sent after
    /// it done and every id sent before it is done; `None` until then.
    pub fn recovery(&self, fault: Instant) -> Option<Recovery> {
        let inner = self.inner();
        let first_done = |flow: Flow| {
            inner
                .entries
                .values()
                .filter(|entry| entry.flow == flow && entry.sent >= fault)
                .filter_map(|entry| entry.done)
                .min()
                .map(|done| done.saturating_duration_since(fault))
        };
        let mut in_flight = Duration::ZERO;
        for entry in inner.entries.values().filter(|entry| entry.sent < fault) {
            in_flight = in_flight.max(entry.done?.saturating_duration_since(fault));
        }
        Some(Recovery { event: first_done(Flow::Event)?, rpc: first_done(Flow::Rpc)?, in_flight })
    }

    /// The longest time in `from..to` in which no id of `flow` got done: how long the flow
    /// stalled.
    pub fn longest_stall(&self, flow: Flow, from: Instant, to: Instant) -> Duration {
        let inner = self.inner();
        let mut done: Vec<Instant> = inner
            .entries
            .values()
            .filter(|entry| entry.flow == flow)
            .filter_map(|entry| entry.done)
            .filter(|done| (from..to).contains(done))
            .collect();
        done.sort();
        let mut stall = Duration::ZERO;
        let mut last = from;
        for instant in done.into_iter().chain([to]) {
            stall = stall.max(instant.saturating_duration_since(last));
            last = instant;
        }
        stall
    }

    /// What [`Tally::recovery`] still waits for after a fault at `fault`, for a failure's
    /// message: per flow, the ids sent since and how many are done; the earlier ids not done
    /// (the first ten, with how far each got); the retries so far.
    pub fn awaited(&self, fault: Instant) -> String {
        let inner = self.inner();
        let since = |flow: Flow| {
            let sent = inner.entries.values().filter(|e| e.flow == flow && e.sent >= fault);
            let (sent, done) =
                sent.fold((0, 0), |(sent, done), e| (sent + 1, done + u64::from(e.is_done())));
            format!("{flow:?}: {sent} sent since, {done} done")
        };
        let mut earlier: Vec<_> = inner
            .entries
            .iter()
            .filter(|(_, e)| e.sent < fault && !e.is_done())
            .map(|(id, e)| (*id, e.flow, e.handled, e.replied))
            .collect();
        earlier.sort_by_key(|(id, ..)| *id);
        format!(
            "{}; {}; {} earlier ids not done (id, flow, handled, replied): {:?}; retries: \
             {} publishes, {} calls",
            since(Flow::Event),
            since(Flow::Rpc),
            earlier.len(),
            &earlier[..earlier.len().min(10)],
            inner.publish_retries,
            inner.rpc_retries,
        )
    }

    /// Ids sent and not done yet.
    pub fn outstanding(&self) -> usize {
        self.inner().entries.values().filter(|entry| !entry.is_done()).count()
    }

    pub fn summary(&self) -> Summary {
        let inner = self.inner();
        let mut lost: Vec<(u64, Flow)> = inner
            .entries
            .iter()
            .filter(|(_, entry)| !entry.is_done())
            .map(|(id, entry)| (*id, entry.flow))
            .collect();
        lost.sort_by_key(|(id, _)| *id);
        Summary {
            sent: inner.entries.len() as u64,
            done: inner.entries.values().filter(|entry| entry.is_done()).count() as u64,
            duplicates: inner.entries.values().map(|entry| entry.handled.saturating_sub(1)).sum(),
            lost,
            publish_retries: inner.publish_retries,
            rpc_retries: inner.rpc_retries,
        }
    }
}
