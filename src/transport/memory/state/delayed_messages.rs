//! The messages of delayed exchanges: held when published, routed when due.

use std::time::Duration;

use tokio::time::Instant;

use super::flow::Routing;
use super::{parse_expiration, State};
use crate::transport::memory::delayed::Held;
use crate::transport::memory::queue::Message;

impl State {
    /// Hold a copy of `message` in each delayed exchange of `held_by` for its delay.
    pub(super) fn hold(
        &mut self,
        message: &Message,
        held_by: Vec<(String, Duration)>,
        now: Instant,
    ) {
        for (by, delay) in held_by {
            let seq = self.core.next_id();
            let due = now.checked_add(delay).unwrap_or(now);
            self.held.hold(due, seq, Held { by, message: message.clone(), delay });
            self.core.schedule(Some(due));
        }
    }

    /// Route the held messages due at `now` from the exchanges holding them (a message whose
    /// exchange is gone, or that reaches no queue, is dropped).
    pub(super) fn release_due(&mut self, now: Instant) {
        let mut work = Vec::new();
        let mut dead = Vec::new();
        for held in self.held.take_due(now) {
            let by = held.by.clone();
            let message = held.released();
            let headers = &message.properties.headers;
            let Ok(Routing { queues, held_by }) = self.route(&by, &message.routing_keys(), headers)
            else {
                continue;
            };
            self.hold(&message, held_by, now);
            // Checked when it was published.
            let expiration = parse_expiration(message.properties.expiration.as_deref());
            let expiration = expiration.ok().flatten();
            for queue in &queues {
                self.enqueue(queue, message.clone(), expiration, now, &mut dead);
            }
            work.extend(queues);
        }
        self.run(work, dead, now);
    }
}
