//! [`Subscriptions`]: the start of a service waits until each of its consumers has subscribed
//! to its queue, so that once it reports ready (`/health/ready`, `Runner::spawn` returning) it
//! consumes every queue. Without the wait a big service (2,000 routes) reported ready while
//! its consumers subscribed one by one behind it, and a rolling deploy could stop the
//! instance it replaced while its queues had no consumer for seconds.
//!
//! Each consumer holds a [`Subscribing`] from before the runner spawns the routes' tasks
//! until its first subscription is made (or has failed): the start waits until none is held.

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

/// Held by a consumer until it has subscribed: dropping it tells the start.
#[derive(Clone, Debug)]
pub(crate) struct Subscribing {
    _held: mpsc::Sender<()>,
}

/// The consumers of one service that have not subscribed yet.
#[derive(Clone, Debug)]
pub(crate) struct Subscriptions(Arc<Mutex<Pending>>);

#[derive(Debug)]
struct Pending {
    /// Cloned for each consumer while the start sets the routes up; `None` once it waits.
    sender: Option<mpsc::Sender<()>>,
    receiver: Option<mpsc::Receiver<()>>,
}

impl Default for Subscriptions {
    fn default() -> Self {
        let (sender, receiver) = mpsc::channel(1);
        Subscriptions(Arc::new(Mutex::new(Pending {
            sender: Some(sender),
            receiver: Some(receiver),
        })))
    }
}

impl Subscriptions {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What a consumer made during the start holds until it has subscribed; `None` once the
    /// start has stopped waiting (a consumer made later holds up nothing).
    pub(crate) fn subscribing(&self) -> Option<Subscribing> {
        self.pending().sender.clone().map(|held| Subscribing { _held: held })
    }

    /// Resolves once every consumer made so far has subscribed (or failed to); consumers
    /// made after it is called are not waited for.
    pub(crate) async fn all_subscribed(&self) {
        let receiver = {
            let mut pending = self.pending();
            pending.sender = None;
            pending.receiver.take()
        };
        if let Some(mut receiver) = receiver {
            // nothing is ever sent: `None` once every sender is dropped
            while receiver.recv().await.is_some() {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_wait_ends_once_every_consumer_has_subscribed() {
        let subscriptions = Subscriptions::default();
        let (first, second) = (subscriptions.subscribing(), subscriptions.subscribing());
        let waiting = tokio::spawn({
            let subscriptions = subscriptions.clone();
            async move { subscriptions.all_subscribed().await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(subscriptions.subscribing().is_none(), "made once the wait began: not waited for");
        drop(first);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiting.is_finished(), "one consumer has not subscribed yet");
        drop(second);
        tokio::time::timeout(Duration::from_secs(1), waiting).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_service_without_consumers_waits_for_nothing() {
        Subscriptions::default().all_subscribed().await;
    }
}
