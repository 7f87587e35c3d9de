//! Counting every id end to end: what was sent, each execution reported, each RPC reply, and
//! when messages flow again after a fault.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use serde::Deserialize;

/// The path an id takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// driver → A (event) → B (RPC) → B (event) → driver (event).
    Event,
    /// driver → B (RPC, retried until replied) → driver (event).
    Rpc,
}

/// A `handled` event from B.
#[derive(Deserialize)]
pub struct Report {
    pub id: u64,
    pub exec: String,
}

struct Entry {
    flow: Flow,
    sent: Instant,
    /// Distinct executions reported.
    execs: HashSet<String>,
    /// The RPC call got its reply (RPC flow only).
    replied: bool,
}

impl Entry {
    fn done(&self) -> bool {
        !self.execs.is_empty() && (self.flow == Flow::Event || self.replied)
    }
}

/// Watching for the end of a fault: the first id of each flow sent after `effective` that
/// makes it end to end.
struct Watch {
    effective: Instant,
    event: Option<Instant>,
    rpc: Option<Instant>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<u64, Entry>,
    watch: Option<Watch>,
    reports: u64,
    unknown_reports: u64,
    rpc_retries: u64,
    publish_retries: u64,
}

/// Shared by the load, the collector route and the fault loop.
#[derive(Default)]
pub struct Tracker {
    inner: Mutex<Inner>,
}

/// The end result.
pub struct Summary {
    pub sent: u64,
    pub handled: u64,
    pub duplicates: u64,
    /// Lost ids with why (never handled, or handled but the call never replied).
    pub lost: Vec<(u64, Flow, &'static str)>,
    pub reports: u64,
    pub unknown_reports: u64,
    pub rpc_retries: u64,
    pub publish_retries: u64,
}

impl Tracker {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `id` is about to be sent for the first time.
    pub fn sent(&self, id: u64, flow: Flow) {
        let entry = Entry { flow, sent: Instant::now(), execs: HashSet::new(), replied: false };
        self.inner().entries.insert(id, entry);
    }

    /// B reported an execution of `id`.
    pub fn report(&self, report: Report) {
        let now = Instant::now();
        let mut inner = self.inner();
        inner.reports += 1;
        let Inner { entries, watch, unknown_reports, .. } = &mut *inner;
        let Some(entry) = entries.get_mut(&report.id) else {
            *unknown_reports += 1;
            return;
        };
        entry.execs.insert(report.exec);
        if let (Some(watch), Flow::Event) = (watch.as_mut(), entry.flow) {
            if entry.sent >= watch.effective && watch.event.is_none() {
                watch.event = Some(now);
            }
        }
    }

    /// The RPC call of `id` got its reply.
    pub fn replied(&self, id: u64) {
        let now = Instant::now();
        let mut inner = self.inner();
        let Inner { entries, watch, .. } = &mut *inner;
        let Some(entry) = entries.get_mut(&id) else { return };
        entry.replied = true;
        if let Some(watch) = watch.as_mut() {
            if entry.sent >= watch.effective && watch.rpc.is_none() {
                watch.rpc = Some(now);
            }
        }
    }

    pub fn rpc_retry(&self) {
        self.inner().rpc_retries += 1;
    }

    pub fn publish_retry(&self) {
        self.inner().publish_retries += 1;
    }

    /// Start watching for recovery from a fault that took effect at `effective`.
    pub fn watch(&self, effective: Instant) {
        self.inner().watch = Some(Watch { effective, event: None, rpc: None });
    }

    /// When both flows got an id sent after the fault end to end, if they did: (events, RPC).
    pub fn recovered(&self) -> Option<(Instant, Instant)> {
        let inner = self.inner();
        let watch = inner.watch.as_ref()?;
        Some((watch.event?, watch.rpc?))
    }

    /// Ids sent and not done yet.
    pub fn outstanding(&self) -> usize {
        self.inner().entries.values().filter(|entry| !entry.done()).count()
    }

    /// (sent, done) so far.
    pub fn progress(&self) -> (usize, usize) {
        let inner = self.inner();
        (inner.entries.len(), inner.entries.values().filter(|entry| entry.done()).count())
    }

    pub fn summary(&self) -> Summary {
        let inner = self.inner();
        let mut lost = Vec::new();
        let (mut handled, mut duplicates) = (0, 0);
        for (id, entry) in &inner.entries {
            if entry.done() {
                handled += 1;
            } else {
                let why = if entry.execs.is_empty() { "never handled" } else { "never replied" };
                lost.push((*id, entry.flow, why));
            }
            duplicates += (entry.execs.len() as u64).saturating_sub(1);
        }
        lost.sort_by_key(|(id, _, _)| *id);
        Summary {
            sent: inner.entries.len() as u64,
            handled,
            duplicates,
            lost,
            reports: inner.reports,
            unknown_reports: inner.unknown_reports,
            rpc_retries: inner.rpc_retries,
            publish_retries: inner.publish_retries,
        }
    }
}
