//! Routing, enqueueing and pumping: how messages reach queues, consumers and
//! dead-letter exchanges.

use std::mem;
use std::time::Duration;

use tokio::time::Instant;

use crate::transport::{Headers, OutgoingMessage, PublishOptions, TransportError};

use super::{discard, not_found_exchange, parse_expiration, DeadLetter, State};
use crate::transport::memory::arguments::Overflow;
use crate::transport::memory::dead_letter::{self, Reason};
use crate::transport::memory::delayed;
use crate::transport::memory::queue::{Entry, Message};
use crate::transport::memory::sender_selected;

/// Where a message goes: queues now, and delayed exchanges that hold it first.
#[derive(Debug, Default)]
pub(super) struct Routing {
    /// The queues it reaches now, sorted, without duplicates.
    pub queues: Vec<String>,
    /// The delayed exchanges that hold it, and for how long.
    pub held_by: Vec<(String, Duration)>,
}

impl State {
    /// Where a message routed with `keys` goes (following alternate exchanges when no queue
    /// matched any key).
    pub(super) fn route(
        &self,
        exchange: &str,
        keys: &[&str],
        headers: &Headers,
    ) -> Result<Routing, TransportError> {
        if exchange.is_empty() {
            let mut queues: Vec<String> = keys
                .iter()
                .filter(|key| self.queues.contains_key(**key))
                .map(|key| (*key).to_owned())
                .collect();
            queues.sort_unstable();
            queues.dedup();
            return Ok(Routing { queues, held_by: Vec::new() });
        }
        let mut current =
            self.exchanges.get(exchange).ok_or_else(|| not_found_exchange(exchange))?;
        let mut name = exchange;
        let mut targets = Vec::new();
        let mut held_by = Vec::new();
        let mut visited: Vec<&str> = Vec::new();
        loop {
            let held_for = match current.delayed {
                Some(_) => delayed::delay(headers)?,
                None => None,
            };
            match held_for {
                Some(delay) => held_by.push((name.to_owned(), delay)),
                None => {
                    for key in keys {
                        current.route(key, headers, &mut targets);
                    }
                }
            }
            if !targets.is_empty() {
                break;
            }
            let alternate =
                current.spec.arguments.get("alternate-exchange").and_then(|v| v.as_str());
            match alternate.and_then(|name| self.exchanges.get_key_value(name)) {
                Some((next_name, next))
                    if next_name != exchange && !visited.contains(&next_name.as_str()) =>
                {
                    visited.push(next_name);
                    (name, current) = (next_name, next);
                }
                _ => break,
            }
        }
        if targets.len() > 1 {
            targets.sort_unstable();
            targets.dedup();
        }
        Ok(Routing { queues: targets, held_by })
    }

    /// Puts a message into a queue (or straight to a waiting consumer when the queue is
    /// empty). Returns false when the queue refused it (`x-overflow` reject).
    pub(super) fn enqueue(
        &mut self,
        name: &str,
        message: Message,
        expiration: Option<Duration>,
        now: Instant,
        dead: &mut Vec<DeadLetter>,
    ) -> bool {
        let seq = self.core.next_id();
        let Some(queue) = self.queues.get_mut(name) else {
            return true;
        };
        if queue.args.overflow != Overflow::DropHead && queue.would_overflow(message.body.len()) {
            if queue.args.overflow == Overflow::RejectPublishDlx {
                let entry =
                    Entry { seq, message, redelivered: false, delivery_count: 0, expires_at: None };
                discard(queue, entry, Reason::Maxlen, dead);
            }
            return false;
        }
        let ttl = match (queue.args.message_ttl, expiration) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let entry = Entry {
            seq,
            message,
            redelivered: false,
            delivery_count: 0,
            expires_at: ttl.map(|ttl| now + ttl),
        };
        if queue.ready.is_empty() {
            if let Some(index) = queue.next_consumer() {
                self.core.deliver(queue, index, entry);
                return true;
            }
        }
        queue.push_back(entry);
        true
    }

    /// `basic.publish` with confirms.
    pub fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        message: OutgoingMessage,
        options: PublishOptions,
        now: Instant,
    ) -> Result<(), TransportError> {
        let expiration = parse_expiration(message.properties.expiration.as_deref())?;
        let mut properties = message.properties;
        let header_routes = sender_selected::take_header_routes(&mut properties.headers)?;
        let message = Message {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            header_routes,
            body: message.body,
            properties,
        };
        let Routing { queues: targets, held_by } =
            self.route(exchange, &message.routing_keys(), &message.properties.headers)?;
        let copies = targets.len() + held_by.len();
        if copies > 0 {
            self.check_room(message.body.len(), copies)?;
        }
        self.hold(&message, held_by, now);
        // A held message reaches no queue yet: like the plugin, a mandatory publish of it is
        // returned, although it is delivered once due.
        let Some((last, others)) = targets.split_last() else {
            return if options.mandatory {
                Err(TransportError::Unroutable {
                    exchange: exchange.to_owned(),
                    routing_key: routing_key.to_owned(),
                })
            } else {
                Ok(())
            };
        };
        let mut dead = Vec::new();
        let mut accepted = true;
        for target in others {
            accepted &= self.enqueue(target, message.clone(), expiration, now, &mut dead);
        }
        accepted &= self.enqueue(last, message, expiration, now, &mut dead);
        self.run(targets, dead, now);
        if accepted {
            Ok(())
        } else {
            Err(TransportError::Nacked)
        }
    }

    /// Pumps the given queues (expiry, deliveries, length limit) and routes the resulting
    /// dead letters, until nothing is left to do.
    pub(super) fn run(&mut self, mut work: Vec<String>, mut dead: Vec<DeadLetter>, now: Instant) {
        loop {
            while let Some(name) = work.pop() {
                self.pump(&name, now, &mut dead);
            }
            if dead.is_empty() {
                break;
            }
            for letter in mem::take(&mut dead) {
                self.publish_dead_letter(letter, now, &mut work, &mut dead);
            }
        }
    }

    /// Expires the head, delivers to consumers with credit, applies `drop-head`.
    fn pump(&mut self, name: &str, now: Instant, dead: &mut Vec<DeadLetter>) {
        let Some(queue) = self.queues.get_mut(name) else {
            return;
        };
        while let Some(head) = queue.ready.front() {
            if head.expires_at.is_some_and(|at| at <= now) {
                if let Some(entry) = queue.pop_front() {
                    discard(queue, entry, Reason::Expired, dead);
                }
                continue;
            }
            let Some(index) = queue.next_consumer() else {
                break;
            };
            if let Some(entry) = queue.pop_front() {
                self.core.deliver(queue, index, entry);
            }
        }
        if queue.args.overflow == Overflow::DropHead {
            while queue.over_limit() {
                match queue.pop_front() {
                    Some(entry) => discard(queue, entry, Reason::Maxlen, dead),
                    None => break,
                }
            }
        }
        self.core.schedule(queue.deadline());
    }

    /// Re-publishes a dead letter to its exchange (dropped if the exchange is missing, and
    /// for every queue that would close a fully automatic cycle).
    fn publish_dead_letter(
        &mut self,
        letter: DeadLetter,
        now: Instant,
        work: &mut Vec<String>,
        dead: &mut Vec<DeadLetter>,
    ) {
        let DeadLetter { queue, reason, mut message, exchange, routing_key } = letter;
        dead_letter::dead_letter(&mut message, &queue, reason, &exchange, routing_key.as_deref());
        let Ok(Routing { queues: mut targets, held_by }) =
            self.route(&message.exchange, &message.routing_keys(), &message.properties.headers)
        else {
            return;
        };
        self.hold(&message, held_by, now);
        targets
            .retain(|target| !dead_letter::is_cycle(reason, &message.properties.headers, target));
        let Some((last, others)) = targets.split_last() else {
            return;
        };
        for target in others {
            self.enqueue(target, message.clone(), None, now, dead);
        }
        self.enqueue(last, message, None, now, dead);
        work.extend(targets);
    }
}
