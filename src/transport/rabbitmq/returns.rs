//! The deliveries the broker takes back when their channel is lost, remembered so that their
//! redeliveries can be told from those of a crashed handling.
//!
//! RabbitMQ requeues every unsettled delivery of a channel that closes, and delivers it again
//! marked `redelivered`, exactly as it does a delivery whose consumer died handling it. A
//! consume loop that counts redeliveries to stop a crash loop (`MAX_REDELIVERIES`) would count
//! a lost connection against every message in flight at that moment. This transport saw the
//! loss: it remembers what was in flight then, and marks the redelivery of each
//! ([`Acker::lost_in_flight`](crate::transport::Acker::lost_in_flight)), with the count of
//! deliveries a quorum queue had given the message before the loss, which the broker may
//! count (RabbitMQ 3.10 does).
//!
//! Deliveries the broker sent that never reached the consumer (still in the socket, or in
//! lapin's buffer when the link died) were never recorded, so their redeliveries cannot be
//! matched; but the channel's prefetch bounds them: that many, less those recorded in flight
//! on it, redeliveries of its queue on a later connection are forgiven as well.
//!
//! Only the loss of a connection is forgiven so: the redelivery comes on a later one. A channel
//! the broker closes on a live connection may be the message's doing: a handling that outlives
//! RabbitMQ's `consumer_timeout` gets its channel closed, and forgiven, it would run again for
//! ever.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;

use crate::transport::LostInFlight;

/// How many returned deliveries are remembered at most: those the broker gave to another
/// consumer (another instance of the service) are never seen again, and the oldest are
/// forgotten first.
const REMEMBERED: usize = 4096;

/// How many of a message's losses are forgiven at most: past them, a message that keeps
/// bringing the connection down (a call that starves the runtime until heartbeats fail) counts
/// as a crash again, and the crash-loop guard ends it.
const FORGIVEN_AT_MOST: u32 = 5;

/// Identifies a message across its deliveries: what the broker does not change when it
/// delivers it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Identity(u64);

impl Identity {
    /// The identity of a message of `queue` with these fields; the body is hashed only when
    /// the message is returned (rarely), so a delivery costs the hash of a few short strings.
    pub(crate) fn new(
        queue: &str,
        exchange: &str,
        routing_key: &str,
        ids: [Option<&str>; 2],
    ) -> Self {
        let mut hasher = DefaultHasher::new();
        (queue, exchange, routing_key, ids).hash(&mut hasher);
        Identity(hasher.finish())
    }

    fn with_body(self, body: &[u8]) -> Self {
        let mut hasher = DefaultHasher::new();
        (self.0, body).hash(&mut hasher);
        Identity(hasher.finish())
    }
}

/// One delivery not settled yet: its channel and what identifies its message.
#[derive(Debug)]
struct InFlight {
    /// The generation of the link and the number of the channel it came on.
    channel: (u64, u16),
    identity: Identity,
    body: Bytes,
    /// The queue's count of the message's deliveries it carried (`x-delivery-count`).
    delivery_count: i64,
}

/// Deliveries of a queue that may have been lost unseen with a connection: how many of its
/// redeliveries are still forgiven, and the generation of the last link they were lost on.
#[derive(Debug)]
struct Unseen {
    generation: u64,
    remaining: usize,
}

/// The consumer of a lost channel, for bounding its unseen deliveries.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LostConsumer<'a> {
    /// The queue it consumed.
    pub queue: &'a str,
    /// Its prefetch (0: no limit).
    pub prefetch: u16,
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    /// Per queue, the deliveries that may have been lost unseen (bounded by the queues
    /// consumed).
    unseen: HashMap<String, Unseen>,
    in_flight: HashMap<u64, InFlight>,
    /// The returned deliveries of each message still to come back, oldest first: the
    /// generation of the link each was lost on, and the count of deliveries it carried.
    returned: HashMap<Identity, VecDeque<(u64, i64)>>,
    /// The returned deliveries in the order they were returned, for forgetting the oldest.
    order: VecDeque<Identity>,
    /// How many losses of each message were forgiven, and the messages in the order of their
    /// first (bounded as `order`).
    forgiven: HashMap<Identity, u32>,
    forgiven_order: VecDeque<Identity>,
}

/// The ledger of one transport: deliveries in flight, and those the broker took back.
#[derive(Debug, Default)]
pub(crate) struct Returns {
    state: Mutex<State>,
}

impl Returns {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Record a delivery received on `channel`, carrying the queue's `delivery_count` of its
    /// message; the number it returns names it until it is settled. When it is the
    /// redelivery of one the broker took back at a channel's loss (which is then no longer
    /// waited for), what was lost comes with it.
    pub(crate) fn received(
        &self,
        (channel, queue): ((u64, u16), &str),
        identity: Identity,
        body: &Bytes,
        (redelivered, delivery_count): (bool, i64),
    ) -> (u64, Option<LostInFlight>) {
        let mut state = self.state();
        let lost = match redelivered && !(state.returned.is_empty() && state.unseen.is_empty()) {
            true => {
                let whole = identity.with_body(body);
                match state.returned.contains_key(&whole) {
                    true => state.take_returned(whole, channel.0),
                    false => state.take_unseen(whole, queue, channel.0, delivery_count),
                }
            }
            false => None,
        };
        state.next += 1;
        let number = state.next;
        let in_flight = InFlight { channel, identity, body: body.clone(), delivery_count };
        state.in_flight.insert(number, in_flight);
        (number, lost)
    }

    /// The delivery `number` was settled, or handed back by its consumer: its message does not
    /// come back by a channel's loss.
    pub(crate) fn settled(&self, number: u64) {
        self.state().in_flight.remove(&number);
    }

    /// The delivery `number` could not be settled, its channel gone: the broker took it back.
    pub(crate) fn lost(&self, number: u64) {
        let mut state = self.state();
        if let Some(in_flight) = state.in_flight.remove(&number) {
            state.remember(in_flight);
        }
    }

    /// `channel` of `consumer` is gone: the broker took back every delivery still in flight
    /// on it, and those it had sent that never arrived.
    pub(crate) fn channel_lost(&self, channel: (u64, u16), consumer: LostConsumer<'_>) {
        let mut state = self.state();
        let mut lost: Vec<u64> = state
            .in_flight
            .iter()
            .filter(|(_, in_flight)| in_flight.channel == channel)
            .map(|(number, _)| *number)
            .collect();
        let bound = match consumer.prefetch {
            0 => REMEMBERED,
            prefetch => usize::from(prefetch),
        };
        let unseen = bound.saturating_sub(lost.len());
        if unseen > 0 {
            let entry = state
                .unseen
                .entry(consumer.queue.to_owned())
                .or_insert(Unseen { generation: channel.0, remaining: 0 });
            entry.generation = entry.generation.max(channel.0);
            entry.remaining = (entry.remaining + unseen).min(REMEMBERED);
        }
        // Remembered in the order received, the oldest forgotten first.
        lost.sort_unstable();
        for number in lost {
            if let Some(in_flight) = state.in_flight.remove(&number) {
                state.remember(in_flight);
            }
        }
    }
}

impl State {
    fn remember(&mut self, in_flight: InFlight) {
        let whole = in_flight.identity.with_body(&in_flight.body);
        let lost = (in_flight.channel.0, in_flight.delivery_count);
        self.returned.entry(whole).or_default().push_back(lost);
        self.order.push_back(whole);
        while self.order.len() > REMEMBERED {
            if let Some(oldest) = self.order.pop_front() {
                self.forget_one(oldest);
            }
        }
    }

    /// The oldest returned delivery of the message `whole` not seen again, if any, when it was
    /// lost with its connection: received on the link of `generation`, a later one. It is seen
    /// now.
    fn take_returned(&mut self, whole: Identity, generation: u64) -> Option<LostInFlight> {
        let (lost_on, delivery_count_before) = self.forget_one(whole)?;
        if let Some(position) = self.order.iter().position(|identity| *identity == whole) {
            self.order.remove(position);
        }
        if lost_on >= generation || !self.forgive(whole) {
            return None;
        }
        Some(LostInFlight { delivery_count_before })
    }

    /// A redelivery from `queue` that matches no recorded return, forgiven when it may be one
    /// of those lost unseen on an earlier link than `generation`'s. The queue's count of
    /// deliveries went up with the loss: one less is the count before it.
    fn take_unseen(
        &mut self,
        whole: Identity,
        queue: &str,
        generation: u64,
        delivery_count: i64,
    ) -> Option<LostInFlight> {
        let unseen = self.unseen.get_mut(queue)?;
        if unseen.generation >= generation {
            return None;
        }
        unseen.remaining -= 1;
        if unseen.remaining == 0 {
            self.unseen.remove(queue);
        }
        if !self.forgive(whole) {
            return None;
        }
        Some(LostInFlight { delivery_count_before: delivery_count.saturating_sub(1).max(0) })
    }

    /// Count one more forgiven loss of the message `whole`; false past [`FORGIVEN_AT_MOST`].
    fn forgive(&mut self, whole: Identity) -> bool {
        let times = self.forgiven.entry(whole).or_insert(0);
        *times += 1;
        let within = *times <= FORGIVEN_AT_MOST;
        if *times == 1 {
            self.forgiven_order.push_back(whole);
            if self.forgiven_order.len() > REMEMBERED {
                if let Some(oldest) = self.forgiven_order.pop_front() {
                    self.forgiven.remove(&oldest);
                }
            }
        }
        within
    }

    fn forget_one(&mut self, whole: Identity) -> Option<(u64, i64)> {
        let counts = self.returned.get_mut(&whole)?;
        let oldest = counts.pop_front();
        if counts.is_empty() {
            self.returned.remove(&whole);
        }
        oldest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The consumer of the lost channels of the tests of recorded deliveries: what it may have
    /// lost unseen (tested apart) is of a queue these tests do not read.
    const ONE: LostConsumer<'static> = LostConsumer { queue: "unread", prefetch: 1 };

    fn identity(id: &str) -> Identity {
        Identity::new("q", "ex", "rk", [Some(id), None])
    }

    #[test]
    fn a_delivery_in_flight_on_a_lost_channel_is_known_when_it_comes_back() {
        let returns = Returns::default();
        let body = Bytes::from_static(b"{}");
        let (first, returned) = returns.received(((1, 1), "q"), identity("a"), &body, (false, 0));
        assert_eq!(returned, None);
        returns.channel_lost((1, 1), ONE);
        let (_, returned) = returns.received(((2, 1), "q"), identity("a"), &body, (true, 1));
        assert_eq!(
            returned,
            Some(LostInFlight { delivery_count_before: 0 }),
            "the broker's return"
        );
        let (_, again) = returns.received(((2, 1), "q"), identity("a"), &body, (true, 2));
        assert_eq!(again, None, "one return is forgiven once");
        returns.settled(first);
    }

    #[test]
    fn a_settled_delivery_or_one_of_another_channel_is_not_returned() {
        let returns = Returns::default();
        let body = Bytes::from_static(b"x");
        let (settled, _) = returns.received(((1, 1), "q"), identity("a"), &body, (false, 0));
        returns.settled(settled);
        returns.received(((1, 2), "q"), identity("b"), &body, (false, 0));
        returns.channel_lost((1, 1), ONE);
        assert!(returns.received(((2, 1), "q"), identity("a"), &body, (true, 0)).1.is_none());
        assert!(returns.received(((2, 1), "q"), identity("b"), &body, (true, 0)).1.is_none());
    }

    #[test]
    fn a_settle_that_failed_on_a_lost_channel_counts_as_returned() {
        let returns = Returns::default();
        let body = Bytes::from_static(b"x");
        let (number, _) = returns.received(((1, 1), "q"), identity("a"), &body, (true, 3));
        returns.lost(number);
        returns.channel_lost((1, 1), ONE);
        let (_, lost) = returns.received(((2, 1), "q"), identity("a"), &body, (true, 4));
        assert_eq!(lost, Some(LostInFlight { delivery_count_before: 3 }));
        assert_eq!(
            returns.received(((2, 1), "q"), identity("a"), &body, (true, 5)).1,
            None,
            "once"
        );
    }

    #[test]
    fn a_different_body_or_a_fresh_delivery_is_not_the_return() {
        let returns = Returns::default();
        let (_, _) =
            returns.received(((1, 1), "q"), identity("a"), &Bytes::from_static(b"1"), (false, 0));
        returns.channel_lost((1, 1), ONE);
        assert!(returns
            .received(((2, 1), "q"), identity("a"), &Bytes::from_static(b"2"), (true, 0))
            .1
            .is_none());
        assert!(returns
            .received(((2, 1), "q"), identity("a"), &Bytes::from_static(b"1"), (false, 0))
            .1
            .is_none());
        assert!(returns
            .received(((2, 1), "q"), identity("a"), &Bytes::from_static(b"1"), (true, 0))
            .1
            .is_some());
    }

    #[test]
    fn a_channel_closed_on_a_live_connection_is_not_forgiven() {
        let returns = Returns::default();
        let body = Bytes::from_static(b"x");
        returns.received(((1, 1), "q"), identity("a"), &body, (false, 0));
        returns.channel_lost((1, 1), ONE);
        assert_eq!(returns.received(((1, 2), "q"), identity("a"), &body, (true, 1)).1, None);
        returns.channel_lost((1, 2), ONE);
        let (_, lost) = returns.received(((2, 1), "q"), identity("a"), &body, (true, 2));
        assert_eq!(lost, Some(LostInFlight { delivery_count_before: 1 }), "then the connection");
    }

    #[test]
    fn a_message_lost_again_and_again_is_forgiven_a_bounded_number_of_times() {
        let returns = Returns::default();
        let body = Bytes::from_static(b"x");
        returns.received(((1, 1), "q"), identity("a"), &body, (false, 0));
        for generation in 1..=u64::from(FORGIVEN_AT_MOST) + 1 {
            returns.channel_lost((generation, 1), ONE);
            let (_, lost) =
                returns.received(((generation + 1, 1), "q"), identity("a"), &body, (true, 0));
            let forgiven = generation <= u64::from(FORGIVEN_AT_MOST);
            assert_eq!(lost.is_some(), forgiven, "loss {generation}");
        }
    }

    #[test]
    fn the_oldest_returns_are_forgotten_past_the_bound() {
        let returns = Returns::default();
        let body = Bytes::from_static(b"x");
        for n in 0..=REMEMBERED {
            returns.received(((1, 1), "q"), identity(&n.to_string()), &body, (false, 0));
        }
        returns.channel_lost((1, 1), ONE);
        assert!(
            returns.received(((2, 1), "q"), identity("0"), &body, (true, 0)).1.is_none(),
            "forgotten"
        );
        assert!(returns.received(((2, 1), "q"), identity("1"), &body, (true, 0)).1.is_some());
        let last = REMEMBERED.to_string();
        assert!(returns.received(((2, 1), "q"), identity(&last), &body, (true, 0)).1.is_some());
    }

    #[test]
    fn deliveries_lost_unseen_are_forgiven_up_to_the_prefetch_less_those_recorded() {
        let returns = Returns::default();
        let body = Bytes::from_static(b"x");
        returns.received(((1, 1), "q"), identity("seen"), &body, (false, 0));
        // prefetch 3, one recorded: two more may have been on their way
        returns.channel_lost((1, 1), LostConsumer { queue: "q", prefetch: 3 });
        let redelivered =
            |id: &str, count| returns.received(((2, 1), "q"), identity(id), &body, (true, count)).1;
        assert_eq!(redelivered("seen", 1), Some(LostInFlight { delivery_count_before: 0 }));
        assert_eq!(redelivered("u1", 3), Some(LostInFlight { delivery_count_before: 2 }));
        assert_eq!(redelivered("u2", 0), Some(LostInFlight { delivery_count_before: 0 }));
        assert_eq!(redelivered("u3", 0), None, "past the prefetch: a crash's comeback");
    }

    #[test]
    fn unseen_deliveries_are_forgiven_only_on_a_later_connection_and_of_their_queue() {
        let returns = Returns::default();
        let body = Bytes::from_static(b"x");
        returns.channel_lost((1, 1), LostConsumer { queue: "q", prefetch: 5 });
        let on = |channel, queue| {
            returns.received((channel, queue), identity("u"), &body, (true, 0)).1.is_some()
        };
        assert!(!on((1, 2), "q"), "a channel closed on a live connection");
        assert!(!on((2, 1), "other"), "another queue");
        assert!(on((2, 1), "q"));
    }
}
