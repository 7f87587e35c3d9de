//! [`BackoffQueue`]: the consumer of a route's backoff queue (see
//! [`delayed_message`](crate::pipeline::delayed_message)), which runs the retries that Python
//! or Rust instances of the service scheduled there.

use async_trait::async_trait;

use super::DeliveryHandler;
use crate::data::{Failure, Handled};
use crate::pipeline::delayed_message::{self, RetryMeta};
use crate::pipeline::settle::{dead_letter_unread, settle};
use crate::pipeline::RouteHandle;
use crate::transport::Delivery;

/// Handles the retries of one route: each is unwrapped and handled by the route like a
/// message of its own queue, then settled as one (dead letters go to `{queue}.dlq`); a body
/// that is not a retry is dead-lettered there as it came, with the reason.
pub(crate) struct BackoffQueue {
    pub route: RouteHandle,
    /// The route's own queue.
    pub queue: String,
    /// Whether the backoff queue is a quorum queue.
    pub quorum: bool,
    /// The backoff queue consumed.
    pub backoff_queue: String,
}

impl BackoffQueue {
    /// Dead-letter a delivery that is not a retry in the layout, as it came.
    async fn refuse_unread(&self, delivery: Delivery, reason: String) -> Option<Handled> {
        let failure = Failure::bad_input(format!(
            "not an AsyncBackOff retry (fn_args, fn_kwargs, _meta) in {}: {reason}",
            self.backoff_queue
        ));
        dead_letter_unread(&self.route, &self.queue, &self.backoff_queue, delivery, failure).await
    }

    async fn settle(&self, delivery: Delivery, handled: &Handled, meta: &RetryMeta) {
        if let Some(done) = settle(&self.route, &self.queue, delivery, handled, meta).await {
            self.route.settled(&done);
        }
    }
}

#[async_trait]
impl DeliveryHandler for BackoffQueue {
    async fn handle(&self, mut delivery: Delivery) {
        let route = &self.route;
        // The slot first: a retry handed back goes back as it came, still wrapped.
        let Some(permit) = route.acquire().await else {
            let queue = &self.backoff_queue;
            super::hand_back(route, queue, self.quorum, delivery, route.name()).await;
            return;
        };
        let meta = match delayed_message::unwrap(&mut delivery) {
            Ok(meta) => meta,
            Err(reason) => {
                drop(permit);
                if let Some(done) = self.refuse_unread(delivery, reason).await {
                    route.settled(&done);
                }
                return;
            }
        };
        let handled = route.handle(permit, delivery.message()).await;
        self.settle(delivery, &handled, &meta).await;
    }

    /// Dead-letter the retry with the reason (unwrapped when it can be).
    async fn refuse(&self, mut delivery: Delivery, failure: Failure) {
        match delayed_message::unwrap(&mut delivery) {
            Ok(meta) => self.settle(delivery, &Handled::Failed(failure), &meta).await,
            Err(_) => {
                let (route, queue, from) = (&self.route, &self.queue, &self.backoff_queue);
                if let Some(done) = dead_letter_unread(route, queue, from, delivery, failure).await
                {
                    route.settled(&done);
                }
            }
        }
    }

    fn quorum(&self) -> bool {
        self.quorum
    }

    fn give_up(&self) {
        self.route.give_up();
    }
}
