//! [`ConsumerLinks`]: the connection each consumer of the transport is subscribed on. After a
//! reconnect each consumer subscribes again by itself, when it is next read; until every one
//! has, some queues have no consumer, so the service is not ready although connected.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// By consumer, the generation of the link its subscription is on.
#[derive(Debug, Default)]
pub(crate) struct ConsumerLinks {
    next_id: AtomicU64,
    on: Mutex<HashMap<u64, u64>>,
}

impl ConsumerLinks {
    fn on(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u64>> {
        self.on.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A consumer subscribed on link `generation`: its id.
    pub(crate) fn subscribed(&self, generation: u64) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.on().insert(id, generation);
        id
    }

    /// Consumer `id` subscribed again, on link `generation`.
    pub(crate) fn resumed(&self, id: u64, generation: u64) {
        if let Some(on) = self.on().get_mut(&id) {
            *on = generation;
        }
    }

    /// Consumer `id` ended: it subscribes no more.
    pub(crate) fn ended(&self, id: u64) {
        self.on().remove(&id);
    }

    /// Whether every consumer is subscribed on link `generation`.
    pub(crate) fn all_on(&self, generation: u64) -> bool {
        self.on().values().all(|on| *on == generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_consumer_is_on_the_link_once_each_resumed_or_ended() {
        let links = ConsumerLinks::default();
        assert!(links.all_on(1), "no consumer");
        let (a, b, c) = (links.subscribed(1), links.subscribed(1), links.subscribed(1));
        assert!(links.all_on(1));
        // a reconnect: link 2
        assert!(!links.all_on(2));
        links.resumed(a, 2);
        links.resumed(b, 2);
        assert!(!links.all_on(2), "c is still on the lost link");
        links.ended(c);
        assert!(links.all_on(2));
        links.ended(c);
        links.resumed(c, 1);
        assert!(links.all_on(2), "an ended consumer stays ended");
    }
}
