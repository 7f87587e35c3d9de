//! [`ConsumerLinks`]: the connection each consumer of the transport is subscribed on. After a
//! reconnect each consumer subscribes again by itself, when it is next read; until every one
//! has, some queues have no consumer, so the service is not ready although connected. A
//! consumer that ended by itself (refused, cancelled by the broker) counts as unsubscribed
//! until its owner drops or cancels it: a route holds it while it tries to consume again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The generation of no link: a consumer on it is subscribed nowhere.
const NOWHERE: u64 = 0;

/// By consumer, the generation of the link its subscription is on.
#[derive(Debug, Default)]
pub(crate) struct ConsumerLinks {
    next_id: AtomicU64,
    on: Mutex<HashMap<u64, u64>>,
}

/// A consumer's entry in [`ConsumerLinks`], removed when dropped (with its `Consumer`, or
/// when that is cancelled).
#[derive(Debug)]
pub(crate) struct Entry {
    links: Arc<ConsumerLinks>,
    pub(crate) id: u64,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.links.on().remove(&self.id);
    }
}

impl ConsumerLinks {
    fn on(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u64>> {
        self.on.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A consumer subscribed on link `generation`: its entry.
    pub(crate) fn subscribed(self: &Arc<Self>, generation: u64) -> Entry {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.on().insert(id, generation);
        Entry { links: self.clone(), id }
    }

    /// Consumer `id` subscribed again, on link `generation`.
    pub(crate) fn resumed(&self, id: u64, generation: u64) {
        if let Some(on) = self.on().get_mut(&id) {
            *on = generation;
        }
    }

    /// Consumer `id` ended by itself: subscribed nowhere while its owner keeps it.
    pub(crate) fn unsubscribed(&self, id: u64) {
        self.resumed(id, NOWHERE);
    }

    /// Whether every consumer is subscribed on link `generation` (one that is up: never 0).
    pub(crate) fn all_on(&self, generation: u64) -> bool {
        self.on().values().all(|on| *on == generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_consumer_is_on_the_link_once_each_resumed_or_dropped() {
        let links = Arc::new(ConsumerLinks::default());
        assert!(links.all_on(1), "no consumer");
        let (a, b, c) = (links.subscribed(1), links.subscribed(1), links.subscribed(1));
        assert!(links.all_on(1));
        // a reconnect: link 2
        assert!(!links.all_on(2));
        links.resumed(a.id, 2);
        links.resumed(b.id, 2);
        assert!(!links.all_on(2), "c is still on the lost link");
        let c_id = c.id;
        drop(c);
        assert!(links.all_on(2));
        links.resumed(c_id, 1);
        assert!(links.all_on(2), "a dropped consumer stays dropped");
    }

    #[test]
    fn a_consumer_that_ended_by_itself_is_subscribed_nowhere_until_dropped() {
        let links = Arc::new(ConsumerLinks::default());
        let (kept, ended) = (links.subscribed(1), links.subscribed(1));
        links.unsubscribed(ended.id);
        assert!(!links.all_on(1), "its queue has no consumer");
        drop(ended);
        assert!(links.all_on(1));
        drop(kept);
    }
}
