//! Consumers, `basic.get`, settlement, connection close and the timer's work.

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::transport::{ClosedPart, ConsumeOptions, Delivery, TransportError};

use super::{discard, not_found_queue, DeadLetter, NewConsumer, State, Unacked, UNLIMITED_BUFFER};
use crate::transport::memory::arguments;
use crate::transport::memory::broker::Settle;
use crate::transport::memory::dead_letter::Reason;
use crate::transport::memory::queue::{ConsumerSlot, Queue};

impl State {
    /// `basic.consume`.
    pub fn consume(
        &mut self,
        connection: u64,
        name: &str,
        options: &ConsumeOptions,
        now: Instant,
    ) -> Result<NewConsumer, TransportError> {
        let queue = self.queue(connection, name)?;
        if queue.consumers.iter().any(|slot| slot.exclusive)
            || (options.exclusive && !queue.consumers.is_empty())
        {
            return Err(TransportError::ResourceLocked(format!(
                "{} in exclusive use",
                arguments::queue_resource(name)
            )));
        }
        // A tag the broker makes is new; only one the caller chose can be in use already
        // (looked up over every queue: skipped for the usual case, as a service with
        // thousands of routes would pay it for each of its consumers).
        let chosen = !options.consumer_tag.is_empty();
        let tag = match chosen {
            true => options.consumer_tag.clone(),
            false => format!("amq.ctag-{}", uuid::Uuid::new_v4().simple()),
        };
        let reused = chosen
            && self.queues.values().any(|queue| {
                queue.consumers.iter().any(|slot| slot.connection == connection && slot.tag == tag)
            });
        if reused {
            return Err(TransportError::Broker {
                code: 530,
                text: format!("NOT_ALLOWED - attempt to reuse consumer tag '{tag}'"),
            });
        }
        let capacity =
            if options.prefetch == 0 { UNLIMITED_BUFFER } else { usize::from(options.prefetch) };
        let (sender, deliveries) = mpsc::channel(capacity);
        let id = self.core.next_id();
        let queue = self.queue_mut(connection, name)?;
        queue.consumers.push(ConsumerSlot {
            id,
            tag: tag.clone(),
            connection,
            prefetch: options.prefetch,
            unacked: 0,
            exclusive: options.exclusive,
            sender,
        });
        queue.had_consumer = true;
        queue.last_used = now;
        let queue_id = queue.id;
        self.run(vec![name.to_owned()], Vec::new(), now);
        Ok(NewConsumer { tag, deliveries, queue_id, id })
    }

    /// `basic.cancel`: detaches a consumer; an `auto_delete` queue losing its last
    /// consumer is deleted.
    pub fn cancel(&mut self, name: &str, queue_id: u64, consumer: u64, now: Instant) {
        let Some(queue) = self.queues.get_mut(name).filter(|queue| queue.id == queue_id) else {
            return;
        };
        let Some(slot) = queue.remove_consumer(consumer) else {
            return;
        };
        self.core.garbage.senders.push(slot.sender);
        if queue.consumers.is_empty() {
            queue.last_used = now;
            if queue.spec.auto_delete {
                self.remove_queue(name);
                return;
            }
        }
        self.core.schedule(queue.deadline());
    }

    /// `basic.get` with manual acknowledgement.
    pub fn get(
        &mut self,
        connection: u64,
        name: &str,
        now: Instant,
    ) -> Result<Option<Delivery>, TransportError> {
        self.queue_mut(connection, name)?.last_used = now;
        self.run(vec![name.to_owned()], Vec::new(), now);
        let queue = self.queue_mut(connection, name)?;
        let Some(entry) = queue.pop_front() else {
            return Ok(None);
        };
        let (queue_id, queue_name) = (queue.id, queue.spec.name.clone());
        let queue = self.queues.get(name).ok_or_else(|| not_found_queue(name))?;
        let (tag, delivery) = self.core.delivery(queue, &entry, true);
        self.core.schedule(queue.deadline());
        self.core.unacked.insert(
            tag,
            Unacked { queue: queue_name, queue_id, consumer: None, connection, entry },
        );
        Ok(Some(delivery))
    }

    /// Takes an unsettled delivery back and acts on it; returns the queue to pump, if it
    /// still exists.
    fn hand_back(
        &mut self,
        unacked: Unacked,
        how: Settle,
        dead: &mut Vec<DeadLetter>,
    ) -> Option<String> {
        let Unacked { queue: name, queue_id, consumer, entry, .. } = unacked;
        let queue = self.queues.get_mut(&name).filter(|queue| queue.id == queue_id)?;
        if let Some(slot) =
            consumer.and_then(|id| queue.consumers.iter_mut().find(|slot| slot.id == id))
        {
            slot.unacked = slot.unacked.saturating_sub(1);
        }
        match how {
            Settle::Ack => {}
            Settle::Discard => discard(queue, entry, Reason::Rejected, dead),
            Settle::Requeue | Settle::Return => {
                let mut entry = entry;
                entry.redelivered = true;
                if queue.args.quorum {
                    entry.delivery_count += 1;
                }
                let over_limit = queue
                    .args
                    .delivery_limit
                    .is_some_and(|limit| u64::from(entry.delivery_count) > limit);
                if queue.args.quorum && over_limit {
                    discard(queue, entry, Reason::DeliveryLimit, dead);
                } else if how == Settle::Return {
                    queue.requeue(entry);
                } else {
                    queue.hand_back(entry);
                }
            }
        }
        Some(name)
    }

    /// Settles delivery `tag`.
    pub fn settle(&mut self, tag: u64, how: Settle, now: Instant) -> Result<(), TransportError> {
        let unacked = self.core.unacked.remove(&tag).ok_or_else(|| TransportError::Closed {
            what: ClosedPart::Transport,
            reason: "the delivery's transport was closed; the message went back to its queue"
                .to_owned(),
        })?;
        let mut dead = Vec::new();
        let work = self.hand_back(unacked, how, &mut dead).into_iter().collect();
        self.run(work, dead, now);
        Ok(())
    }

    /// Closes a connection: ends its consumers, hands back its unsettled deliveries, and
    /// deletes its exclusive queues and the `auto_delete` queues it was the last consumer of.
    pub fn close_connection(&mut self, connection: u64, now: Instant) {
        let mut work = Vec::new();
        let mut doomed = Vec::new();
        for (name, queue) in &mut self.queues {
            let ids: Vec<u64> = queue
                .consumers
                .iter()
                .filter(|slot| slot.connection == connection)
                .map(|slot| slot.id)
                .collect();
            for id in &ids {
                if let Some(slot) = queue.remove_consumer(*id) {
                    self.core.garbage.senders.push(slot.sender);
                }
            }
            if !ids.is_empty() && queue.consumers.is_empty() {
                queue.last_used = now;
                if queue.spec.auto_delete {
                    doomed.push(name.clone());
                }
            }
            if queue.owner == Some(connection) {
                doomed.push(name.clone());
            }
            self.core.schedule(queue.deadline());
        }
        let mut tags: Vec<u64> = self
            .core
            .unacked
            .iter()
            .filter(|(_, unacked)| unacked.connection == connection)
            .map(|(tag, _)| *tag)
            .collect();
        tags.sort_unstable();
        let mut dead = Vec::new();
        for tag in tags {
            if let Some(unacked) = self.core.unacked.remove(&tag) {
                work.extend(self.hand_back(unacked, Settle::Return, &mut dead));
            }
        }
        for name in doomed {
            self.remove_queue(&name);
        }
        work.sort_unstable();
        work.dedup();
        self.run(work, dead, now);
    }

    /// Timer work: routes the delayed messages that are due, expires messages at queue heads
    /// and deletes unused `x-expires` queues. Returns when the timer is next due; `None`:
    /// nothing is pending, and the timer task ends.
    pub fn tick(&mut self, now: Instant) -> Option<Instant> {
        self.release_due(now);
        let mut work = Vec::new();
        let mut unused = Vec::new();
        for (name, queue) in &self.queues {
            if queue.unused_deadline().is_some_and(|at| at <= now) {
                unused.push(name.clone());
            } else if queue.deadline().is_some_and(|at| at <= now) {
                work.push(name.clone());
            }
        }
        for name in unused {
            self.remove_queue(&name);
        }
        self.run(work, Vec::new(), now);
        let queues = self.queues.values().filter_map(Queue::deadline);
        self.core.timer_deadline = queues.chain(self.held.next_due()).min();
        self.core.timer_running = self.core.timer_deadline.is_some();
        self.core.notify_timer = false;
        self.core.timer_deadline
    }
}
