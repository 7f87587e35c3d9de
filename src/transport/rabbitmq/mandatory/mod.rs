//! Mandatory publishes, pipelined on one confirm channel, each told its own routing.
//!
//! A `basic.return` names no delivery tag: the broker only sends it before the confirm of
//! the same publish. lapin hands each returned message, in the order they came, to the next
//! confirm it settles, which may be another publish's: a multiple ack settles the publishes
//! it covers in no particular order. So one task per channel, its dispatcher, holds the
//! confirm of every mandatory publish on it, and matches each returned message to its
//! publish by content (exchange, routing key, correlation and message ids, body); two
//! publishes of the same content are never in flight together, so the match is exact. A
//! publish is told its routing once no returned message can still be its own:
//!
//! - its confirm carried no returned message: its own, if any, went to a confirm lapin
//!   settled before this one, which the dispatcher's next pass over all confirms sees;
//! - its confirm carried another publish's returned message: its own may go to a confirm
//!   settled after it in the same ack (whose publish was sent by then), so it waits until
//!   every publish sent before its confirm was seen has been seen settled.
//!
//! Unroutable publishes are rare; routed ones are told on the pass after their confirm.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashSet;
use std::future::{poll_fn, Future};
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use futures::task::{noop_waker_ref, AtomicWaker};
use lapin::message::BasicReturnMessage;
use lapin::{Confirmation, PublisherConfirm};
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::error::Elapsed;
use tokio::time::{timeout_at, Instant};
use tracing::warn;

use super::channels::{open_held, Held};
use super::connection::{Link, Shared};
use crate::transport::{OutgoingMessage, TransportError};

/// How many mandatory publishes a connection has in flight at most; more wait. Each pass of
/// the dispatcher polls them all.
const MAX_IN_FLIGHT: usize = 256;

/// How many passes the dispatcher makes in a row before it lets other tasks run.
const PASSES_PER_TURN: usize = 8;

/// lapin's `basic_publish` of one message, not yet polled.
pub(crate) type Sending<C = PublisherConfirm> =
    Pin<Box<dyn Future<Output = lapin::Result<C>> + Send>>;

/// A publish's confirm: lapin's [`PublisherConfirm`] (another in this module's tests).
trait Confirm: Future<Output = lapin::Result<Confirmation>> + Unpin {}

impl<C: Future<Output = lapin::Result<Confirmation>> + Unpin> Confirm for C {}

/// What the broker made of a mandatory publish.
#[derive(Debug, PartialEq)]
pub(crate) enum Outcome {
    Routed,
    Unroutable,
    Nacked,
}

/// A publish's outcome, or its channel's failure.
type Reply = lapin::Result<Outcome>;

/// What identifies a mandatory publish among those in flight: a hash of what its returned
/// message carries back. Two publishes with the same key wait for each other, so a hash
/// collision costs a wait, never a wrong match.
pub(crate) fn publish_key(exchange: &str, routing_key: &str, message: &OutgoingMessage) -> u64 {
    let properties = &message.properties;
    content_key(
        exchange,
        routing_key,
        properties.correlation_id.as_deref(),
        properties.message_id.as_deref(),
        &message.body,
    )
}

fn returned_key(message: &BasicReturnMessage) -> u64 {
    let delivery = &message.delivery;
    let properties = &delivery.properties;
    content_key(
        delivery.exchange.as_str(),
        delivery.routing_key.as_str(),
        properties.correlation_id().as_ref().map(|id| id.as_str()),
        properties.message_id().as_ref().map(|id| id.as_str()),
        &delivery.data,
    )
}

fn content_key(
    exchange: &str,
    routing_key: &str,
    correlation_id: Option<&str>,
    message_id: Option<&str>,
    body: &[u8],
) -> u64 {
    let mut hasher = DefaultHasher::new();
    (exchange, routing_key, correlation_id, message_id, body).hash(&mut hasher);
    hasher.finish()
}

/// The channel of a transport's mandatory publishes, replaced when it fails.
pub(crate) struct MandatoryChannel {
    current: tokio::sync::Mutex<Option<Tracked>>,
}

impl MandatoryChannel {
    pub(crate) fn new() -> Self {
        MandatoryChannel { current: tokio::sync::Mutex::new(None) }
    }

    /// The current channel if usable on a link of at least `min_generation`, else a new one
    /// with its dispatcher.
    pub(crate) async fn get(
        &self,
        shared: &Shared,
        min_generation: u64,
        deadline: Instant,
    ) -> Result<Tracked, TransportError> {
        let mut current = self.current.lock().await;
        if let Some(tracked) = current.as_ref().filter(|tracked| tracked.usable(min_generation)) {
            return Ok(tracked.clone());
        }
        if let Some(old) = current.take() {
            old.tracker.close();
        }
        let held = open_held(shared, min_generation, deadline, true).await?;
        let tracked = Tracked { held, tracker: Arc::new(Tracker::new()) };
        tokio::spawn(dispatch(tracked.tracker.clone(), tracked.held.link.clone()));
        *current = Some(tracked.clone());
        Ok(tracked)
    }

    /// Replace `tracked` on the next publish, if it is still the current channel.
    pub(crate) async fn invalidate(&self, tracked: &Tracked) {
        let mut current = self.current.lock().await;
        if current.as_ref().is_some_and(|current| Arc::ptr_eq(&current.tracker, &tracked.tracker)) {
            tracked.tracker.close();
            *current = None;
        }
    }
}

impl Drop for MandatoryChannel {
    fn drop(&mut self) {
        if let Some(tracked) = self.current.get_mut() {
            tracked.tracker.close();
        }
    }
}

/// A mandatory publishes' channel and its dispatcher's state.
#[derive(Clone)]
pub(crate) struct Tracked {
    held: Held,
    tracker: Arc<Tracker>,
}

impl Tracked {
    /// The channel and its link.
    pub(crate) fn held(&self) -> &Held {
        &self.held
    }

    fn usable(&self, min_generation: u64) -> bool {
        self.held.usable(min_generation) && !self.tracker.inner().closed
    }

    /// Send `sending` (a publish whose content has `key`) and wait, by `deadline`, for what
    /// the broker made of it. A publish abandoned here stays with the dispatcher until its
    /// confirm comes.
    pub(crate) async fn publish(
        &self,
        key: u64,
        sending: Sending,
        deadline: Instant,
    ) -> Result<Reply, Elapsed> {
        let tracker = &self.tracker;
        let Ok(permit) = timeout_at(deadline, tracker.in_flight.clone().acquire_owned()).await?
        else {
            return Ok(Err(closed_channel()));
        };
        let mut waiting = (sending, permit);
        let reply = loop {
            // Made before trying: it is woken by any publish leaving from now on.
            let freed = tracker.freed.notified();
            match tracker.send(key, waiting) {
                Ok(reply) => break reply,
                Err(Refused::Busy(sending, permit)) => waiting = (sending, permit),
                Err(Refused::Failed(error)) => return Ok(Err(error)),
            }
            timeout_at(deadline, freed).await?;
        };
        tracker.dispatcher.wake();
        // The dispatcher watches the connection: when it dies, the dispatcher passes on the
        // failure lapin reports (or drops the reply after a grace).
        let reply = async { reply.await.unwrap_or_else(|_| Err(closed_channel())) };
        timeout_at(deadline, reply).await
    }
}

/// The channel's publishes handed from their callers to its dispatcher.
struct Tracker<C = PublisherConfirm> {
    inner: Mutex<Inner<C>>,
    dispatcher: AtomicWaker,
    in_flight: Arc<Semaphore>,
    /// A publish left the dispatcher: its content may be sent again.
    freed: Notify,
}

struct Inner<C> {
    arrivals: Vec<Entry<C>>,
    /// The keys of the publishes in flight.
    keys: HashSet<u64>,
    next_seq: u64,
    /// Replaced: no more publishes.
    closed: bool,
}

enum Refused<C> {
    /// A publish of the same content is in flight.
    Busy(Sending<C>, OwnedSemaphorePermit),
    Failed(lapin::Error),
}

impl<C: Confirm> Tracker<C> {
    fn new() -> Self {
        let inner =
            Inner { arrivals: Vec::new(), keys: HashSet::new(), next_seq: 0, closed: false };
        Tracker {
            inner: Mutex::new(inner),
            dispatcher: AtomicWaker::new(),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            freed: Notify::new(),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner<C>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Send the publish and hand it to the dispatcher, unless one of the same content is in
    /// flight.
    fn send(
        &self,
        key: u64,
        (mut sending, permit): (Sending<C>, OwnedSemaphorePermit),
    ) -> Result<oneshot::Receiver<Reply>, Refused<C>> {
        let mut inner = self.inner();
        if inner.closed {
            return Err(Refused::Failed(closed_channel()));
        }
        if inner.keys.contains(&key) {
            return Err(Refused::Busy(sending, permit));
        }
        // The first poll numbers the publish with lapin and queues its frames. Under the lock
        // the dispatcher takes arrivals with: once it has seen a confirm settled, it has every
        // publish lapin may have settled before that one.
        let state = match sending.as_mut().poll(&mut Context::from_waker(noop_waker_ref())) {
            Poll::Pending => State::Sending(sending),
            Poll::Ready(Ok(confirm)) => State::Confirming(confirm),
            Poll::Ready(Err(error)) => return Err(Refused::Failed(error)),
        };
        let (reply, receiver) = oneshot::channel();
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.keys.insert(key);
        inner.arrivals.push(Entry {
            seq,
            key,
            state,
            returned: false,
            carried_other: false,
            horizon: None,
            reply: Some(reply),
            decided: false,
            _permit: permit,
        });
        Ok(receiver)
    }

    /// No more publishes; the dispatcher ends once those it has are settled.
    fn close(&self) {
        self.inner().closed = true;
        self.freed.notify_waiters();
        self.dispatcher.wake();
    }

    /// Passes over the publishes until one sees no confirm newly settled; ready once closed
    /// and every publish settled.
    fn passes(
        &self,
        entries: &mut Vec<Entry<C>>,
        pass: &mut u64,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        self.dispatcher.register(cx.waker());
        for _ in 0..PASSES_PER_TURN {
            *pass += 1;
            let (next_seq, closed) = {
                let mut inner = self.inner();
                entries.append(&mut inner.arrivals);
                (inner.next_seq, inner.closed)
            };
            let newly_settled = poll_all(entries, *pass, cx);
            decide(entries, *pass, next_seq);
            self.remove_done(entries);
            if !newly_settled {
                return if closed && entries.is_empty() { Poll::Ready(()) } else { Poll::Pending };
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn remove_done(&self, entries: &mut Vec<Entry<C>>) {
        if !entries.iter().any(Entry::done) {
            return;
        }
        let mut inner = self.inner();
        entries.retain(|entry| {
            let done = entry.done();
            if done {
                inner.keys.remove(&entry.key);
            }
            !done
        });
        drop(inner);
        self.freed.notify_waiters();
    }
}

/// Run one channel's dispatcher until it is closed and its publishes settled, or its
/// connection dies. Then a publish still waiting learns that its channel failed.
async fn dispatch(tracker: Arc<Tracker>, link: Arc<Link>) {
    let mut entries = Vec::new();
    let mut pass = 0;
    {
        let passes = poll_fn(|cx| tracker.passes(&mut entries, &mut pass, cx));
        let settled = async {
            passes.await;
            Ok(())
        };
        let _ = link.guard(settled).await;
    }
    tracker.close();
    let arrivals = std::mem::take(&mut tracker.inner().arrivals);
    // Dropping their replies tells the callers still waiting that the channel failed.
    drop((entries, arrivals));
}

/// Poll every publish not yet seen settled, attributing the returned messages their
/// confirms carry: whether any was newly seen settled.
fn poll_all<C: Confirm>(entries: &mut [Entry<C>], pass: u64, cx: &mut Context<'_>) -> bool {
    let mut newly_settled = false;
    for carrier in 0..entries.len() {
        let Some((settled, returned)) = entries[carrier].poll(cx) else { continue };
        entries[carrier].state = State::Settled { settled, pass };
        newly_settled = true;
        if let Some(message) = returned {
            attribute(entries, carrier, &message);
        }
    }
    newly_settled
}

fn attribute<C>(entries: &mut [Entry<C>], carrier: usize, message: &BasicReturnMessage) {
    let key = returned_key(message);
    let Some(owner) = entries.iter().position(|entry| entry.key == key) else {
        warn!(
            exchange = %message.delivery.exchange,
            routing_key = %message.delivery.routing_key,
            "a returned message matches no mandatory publish in flight"
        );
        return;
    };
    debug_assert!(!entries[owner].decided, "a publish told it was routed was returned");
    entries[carrier].carried_other |= owner != carrier;
    entries[owner].returned = true;
    entries[owner].reply(Ok(Outcome::Unroutable));
}

/// Tell each publish seen settled before this pass its outcome, once no returned message
/// can still be its own.
fn decide<C>(entries: &mut [Entry<C>], pass: u64, next_seq: u64) {
    let first_unsettled = entries.iter().find(|entry| !entry.settled()).map(|entry| entry.seq);
    for entry in entries.iter_mut().filter(|entry| !entry.decided) {
        let State::Settled { settled, pass: seen } = &entry.state else { continue };
        if *seen >= pass {
            continue;
        }
        if entry.carried_other {
            let horizon = *entry.horizon.get_or_insert(next_seq);
            if first_unsettled.is_some_and(|seq| seq < horizon) {
                continue;
            }
        }
        let reply = match settled {
            Settled::Ack => Ok(Outcome::Routed),
            Settled::Nack => Ok(Outcome::Nacked),
            Settled::Failed(error) => Err(error.clone()),
        };
        entry.reply(reply);
    }
}

/// One mandatory publish with the dispatcher.
struct Entry<C> {
    /// The order of sending.
    seq: u64,
    key: u64,
    state: State<C>,
    /// A returned message was this publish's: it reached no queue.
    returned: bool,
    /// Its confirm carried another publish's returned message.
    carried_other: bool,
    /// Then the publishes that may carry its own are those numbered below this.
    horizon: Option<u64>,
    /// Gone when its caller stopped waiting, or was told.
    reply: Option<oneshot::Sender<Reply>>,
    decided: bool,
    _permit: OwnedSemaphorePermit,
}

enum State<C> {
    Sending(Sending<C>),
    Confirming(C),
    /// Seen settled in pass `pass`.
    Settled {
        settled: Settled,
        pass: u64,
    },
}

enum Settled {
    Ack,
    Nack,
    Failed(lapin::Error),
}

impl<C: Confirm> Entry<C> {
    /// Drive the publish: its confirm once settled, with the returned message it carried.
    fn poll(&mut self, cx: &mut Context<'_>) -> Option<(Settled, Option<BasicReturnMessage>)> {
        if let State::Sending(sending) = &mut self.state {
            match sending.as_mut().poll(cx) {
                Poll::Pending => return None,
                Poll::Ready(Ok(confirm)) => self.state = State::Confirming(confirm),
                Poll::Ready(Err(error)) => return Some((Settled::Failed(error), None)),
            }
        }
        let State::Confirming(confirm) = &mut self.state else { return None };
        match Pin::new(confirm).poll(cx) {
            Poll::Pending => None,
            Poll::Ready(Ok(Confirmation::Ack(returned))) => Some((Settled::Ack, returned)),
            Poll::Ready(Ok(Confirmation::Nack(returned))) => Some((Settled::Nack, returned)),
            // not on a confirm channel
            Poll::Ready(Ok(Confirmation::NotRequested)) => Some((Settled::Ack, None)),
            Poll::Ready(Err(error)) => Some((Settled::Failed(error), None)),
        }
    }
}

impl<C> Entry<C> {
    fn settled(&self) -> bool {
        matches!(self.state, State::Settled { .. })
    }

    fn done(&self) -> bool {
        self.decided && self.settled()
    }

    fn reply(&mut self, reply: Reply) {
        if let Some(sender) = self.reply.take() {
            let _ = sender.send(reply);
        }
        self.decided = true;
    }
}

fn closed_channel() -> lapin::Error {
    lapin::ErrorKind::InvalidChannelState(
        lapin::ChannelState::Closed,
        "mandatory publishes' channel replaced",
    )
    .into()
}

#[cfg(test)]
mod tests;
