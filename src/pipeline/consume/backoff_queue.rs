//! [`BackoffQueue`]: the consumer of a route's backoff queue (see [`delayed_message`]), which
//! runs the retries that Python or Rust instances of the service scheduled there.

use async_trait::async_trait;

use super::DeliveryHandler;
use crate::data::{Failure, Handled, Message};
use crate::pipeline::delayed_message::{self, RetryMeta};
use crate::pipeline::settle::Copies;
use crate::pipeline::settle::{dead_letter_unread, settle, Origin};
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
    /// Where a delivery goes back when it cannot be settled now: to the backoff queue, as it
    /// came there (`original`, still wrapped, when the delivery was unwrapped).
    fn origin(&self, original: Option<Message>) -> Origin<'_> {
        Origin { queue: &self.backoff_queue, quorum: self.quorum, original }
    }

    /// Dead-letter a delivery that is not a retry in the layout, as it came.
    async fn refuse_unread(&self, delivery: Delivery, reason: String) -> Option<Handled> {
        let failure = Failure::bad_input(format!(
            "not an AsyncBackOff retry (fn_args, fn_kwargs, _meta) in {}: {reason}",
            self.backoff_queue
        ));
        self.dead_letter_as_it_came(delivery, failure).await
    }

    /// Dead-letter a delivery as it came, with `failure`.
    async fn dead_letter_as_it_came(
        &self,
        delivery: Delivery,
        failure: Failure,
    ) -> Option<Handled> {
        dead_letter_unread(&self.route, &self.origin(None), &self.queue, delivery, failure).await
    }

    /// Settle an unwrapped retry, which came as `original`.
    async fn settle(
        &self,
        original: Message,
        delivery: Delivery,
        handled: &Handled,
        meta: &RetryMeta,
    ) {
        let origin = self.origin(Some(original));
        if let Some(done) = settle(&self.route, &origin, &self.queue, delivery, handled, meta).await
        {
            self.route.settled(&done);
        }
    }
}

#[async_trait]
impl DeliveryHandler for BackoffQueue {
    async fn handle(&self, mut delivery: Delivery) {
        let route = &self.route;
        // The slot first: a retry handed back goes back as it came, still wrapped.
        let original = delivery.message();
        let (queue, copies) = (&self.backoff_queue, Copies::Straight { quorum: self.quorum });
        let acker = delivery.acker.as_ref();
        let Some(permit) = super::slot_for(route, queue, copies, &original, acker).await else {
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
        self.settle(original, delivery, &handled, &meta).await;
    }

    /// Dead-letter the retry with the reason (unwrapped when it can be).
    async fn refuse(&self, mut delivery: Delivery, failure: Failure) {
        let original = delivery.message();
        match delayed_message::unwrap(&mut delivery) {
            Ok(meta) => self.settle(original, delivery, &Handled::Failed(failure), &meta).await,
            Err(_) => {
                if let Some(done) = self.dead_letter_as_it_came(delivery, failure).await {
                    self.route.settled(&done);
                }
            }
        }
    }

    fn copies(&self) -> Copies {
        Copies::Straight { quorum: self.quorum }
    }

    async fn give_up(&self) {
        self.route.give_up().await;
    }
}
