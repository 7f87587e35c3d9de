//! The dispatcher's rules, against confirms the tests settle in the orders lapin may settle
//! them in.

use std::collections::HashMap;

use lapin::message::Delivery;
use lapin::BasicProperties;
use tokio::sync::oneshot::error::TryRecvError;

use super::*;
use crate::transport::Properties;

/// What lapin settled, and what it settles when a given confirm is polled next: the
/// confirms lapin settles in one ack, seen by the dispatcher part before and part after.
#[derive(Clone, Default)]
struct Lapin(Arc<Mutex<Settling>>);

#[derive(Default)]
struct Settling {
    settled: HashMap<u64, lapin::Result<Confirmation>>,
    on_poll: HashMap<u64, Vec<(u64, Confirmation)>>,
}

impl Lapin {
    fn settle(&self, id: u64, confirmation: Confirmation) {
        self.0.lock().unwrap().settled.insert(id, Ok(confirmation));
    }

    /// Fail confirm `id`, as lapin fails those of a closed channel.
    fn fail(&self, id: u64) {
        let closed = lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, "test");
        self.0.lock().unwrap().settled.insert(id, Err(closed.into()));
    }

    /// When confirm `polled` is polled next, first settle these.
    fn settle_on_poll(&self, polled: u64, settled: Vec<(u64, Confirmation)>) {
        self.0.lock().unwrap().on_poll.insert(polled, settled);
    }

    fn confirm(&self, id: u64) -> Sending<Fake> {
        let fake = Fake { id, lapin: self.clone() };
        Box::pin(async move { Ok(fake) })
    }
}

struct Fake {
    id: u64,
    lapin: Lapin,
}

impl Future for Fake {
    type Output = lapin::Result<Confirmation>;

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        let mut settling = self.lapin.0.lock().unwrap();
        for (id, confirmation) in settling.on_poll.remove(&self.id).unwrap_or_default() {
            settling.settled.insert(id, Ok(confirmation));
        }
        match settling.settled.remove(&self.id) {
            Some(confirmation) => Poll::Ready(confirmation),
            None => Poll::Pending,
        }
    }
}

/// Publish `id`'s message: its body and correlation id are the id.
fn message(id: u64) -> OutgoingMessage {
    let properties = Properties { correlation_id: Some(id.to_string()), ..Properties::default() };
    OutgoingMessage { body: id.to_string().into_bytes().into(), properties }
}

fn key(id: u64) -> u64 {
    publish_key("ex", "nowhere", &message(id))
}

/// The broker's return of publish `id`.
fn returned(id: u64) -> Confirmation {
    let body = id.to_string().into_bytes();
    let mut delivery = Delivery::mock(0, "ex".into(), "nowhere".into(), false, body);
    delivery.properties = BasicProperties::default().with_correlation_id(id.to_string().into());
    let message = BasicReturnMessage { delivery, reply_code: 312, reply_text: "NO_ROUTE".into() };
    Confirmation::Ack(Some(message))
}

struct Dispatcher {
    tracker: Tracker<Fake>,
    lapin: Lapin,
    entries: Vec<Entry<Fake>>,
    pass: u64,
    permits: Arc<Semaphore>,
}

impl Dispatcher {
    fn new() -> Self {
        Dispatcher {
            tracker: Tracker::new(),
            lapin: Lapin::default(),
            entries: Vec::new(),
            pass: 0,
            permits: Arc::new(Semaphore::new(16)),
        }
    }

    fn send(&self, id: u64) -> Result<oneshot::Receiver<Reply>, Refused<Fake>> {
        let permit = self.permits.clone().try_acquire_owned().unwrap();
        self.tracker.send(key(id), (self.lapin.confirm(id), permit))
    }

    /// Send publish `id`, which must be taken.
    fn sent(&self, id: u64) -> oneshot::Receiver<Reply> {
        let Ok(reply) = self.send(id) else { panic!("publish {id} refused") };
        reply
    }

    fn run(&mut self) -> Poll<()> {
        let mut cx = Context::from_waker(noop_waker_ref());
        self.tracker.passes(&mut self.entries, &mut self.pass, &mut cx)
    }
}

fn told(reply: &mut oneshot::Receiver<Reply>) -> Option<Outcome> {
    match reply.try_recv() {
        Ok(reply) => Some(reply.unwrap()),
        Err(TryRecvError::Empty) => None,
        Err(TryRecvError::Closed) => panic!("no reply"),
    }
}

/// A publish whose confirm carried nothing may have had its returned message handed to a
/// confirm lapin settled just before, which the dispatcher had polled a moment earlier: it
/// is told only after a pass that sees that one.
#[test]
fn a_return_on_a_confirm_settled_just_before_is_seen_before_the_routing_is_told() {
    let mut dispatcher = Dispatcher::new();
    let mut first = dispatcher.sent(1);
    let mut second = dispatcher.sent(2);
    // One multiple ack: lapin settles 1 with 2's returned message, then 2 with nothing,
    // after the dispatcher polled 1 and before it polls 2.
    dispatcher.lapin.settle_on_poll(2, vec![(1, returned(2)), (2, Confirmation::Ack(None))]);
    assert_eq!(dispatcher.run(), Poll::Pending);
    assert_eq!(told(&mut second), Some(Outcome::Unroutable));
    assert_eq!(told(&mut first), Some(Outcome::Routed));
    assert!(dispatcher.entries.is_empty());
}

/// A publish whose confirm carried another's returned message may have its own handed to a
/// confirm lapin settles after it: it waits until every publish sent before its confirm was
/// seen is settled.
#[test]
fn a_confirm_carrying_another_return_waits_for_the_publishes_in_flight_when_it_settled() {
    for own_returned in [true, false] {
        let mut dispatcher = Dispatcher::new();
        let mut first = dispatcher.sent(1);
        let mut second = dispatcher.sent(2);
        dispatcher.lapin.settle(2, returned(1));
        assert_eq!(dispatcher.run(), Poll::Pending);
        assert_eq!(told(&mut first), Some(Outcome::Unroutable));
        assert_eq!(told(&mut second), None, "told before 1 settled");
        let own = if own_returned { returned(2) } else { Confirmation::Ack(None) };
        dispatcher.lapin.settle(1, own);
        assert_eq!(dispatcher.run(), Poll::Pending);
        let expected = if own_returned { Outcome::Unroutable } else { Outcome::Routed };
        assert_eq!(told(&mut second), Some(expected));
        assert!(dispatcher.entries.is_empty());
    }
}

/// The confirm that carries its returned message may be that of a publish sent after it, in
/// the same ack: it waits for that one too.
#[test]
fn a_confirm_carrying_another_return_waits_for_the_publishes_sent_after_it_too() {
    let mut dispatcher = Dispatcher::new();
    let mut first = dispatcher.sent(1);
    let mut second = dispatcher.sent(2);
    let mut third = dispatcher.sent(3);
    dispatcher.lapin.settle(1, returned(2));
    assert_eq!(dispatcher.run(), Poll::Pending);
    assert_eq!(told(&mut second), Some(Outcome::Unroutable));
    dispatcher.lapin.settle(2, Confirmation::Ack(None));
    assert_eq!(dispatcher.run(), Poll::Pending);
    assert_eq!(told(&mut first), None, "told before 3 settled");
    dispatcher.lapin.settle(3, returned(1));
    assert_eq!(dispatcher.run(), Poll::Pending);
    assert_eq!(told(&mut first), Some(Outcome::Unroutable));
    assert_eq!(told(&mut third), Some(Outcome::Routed));
    assert!(dispatcher.entries.is_empty());
}

/// Two publishes of the same content are never in flight together, so that a returned
/// message matches one publish only.
#[test]
fn a_publish_of_the_same_content_waits_for_the_first_to_settle() {
    let mut dispatcher = Dispatcher::new();
    let mut first = dispatcher.sent(1);
    assert!(matches!(dispatcher.send(1), Err(Refused::Busy(..))));
    dispatcher.lapin.settle(1, Confirmation::Ack(None));
    assert_eq!(dispatcher.run(), Poll::Pending);
    assert_eq!(told(&mut first), Some(Outcome::Routed));
    let mut again = dispatcher.sent(1);
    dispatcher.lapin.settle(1, Confirmation::Nack(None));
    assert_eq!(dispatcher.run(), Poll::Pending);
    assert_eq!(told(&mut again), Some(Outcome::Nacked));
}

/// A publish whose caller stopped waiting stays until its confirm settles: its confirm may
/// carry another's returned message, and its own may come on another's.
#[test]
fn an_abandoned_publish_still_carries_returns_to_their_own() {
    let mut dispatcher = Dispatcher::new();
    drop(dispatcher.sent(1));
    let mut second = dispatcher.sent(2);
    assert_eq!(dispatcher.run(), Poll::Pending);
    dispatcher.lapin.settle(1, returned(2));
    dispatcher.lapin.settle(2, Confirmation::Ack(None));
    assert_eq!(dispatcher.run(), Poll::Pending);
    assert_eq!(told(&mut second), Some(Outcome::Unroutable));
    assert!(dispatcher.entries.is_empty());
}

/// Closed, the dispatcher takes no more publishes and ends once those it has are settled;
/// a failed confirm tells its publish that its channel failed.
#[test]
fn a_closed_dispatcher_ends_once_its_publishes_settle() {
    let mut dispatcher = Dispatcher::new();
    let mut first = dispatcher.sent(1);
    let mut second = dispatcher.sent(2);
    dispatcher.tracker.close();
    assert!(matches!(dispatcher.send(3), Err(Refused::Failed(_))));
    dispatcher.lapin.settle(1, Confirmation::Ack(None));
    assert_eq!(dispatcher.run(), Poll::Pending);
    assert_eq!(told(&mut first), Some(Outcome::Routed));
    dispatcher.lapin.fail(2);
    assert_eq!(dispatcher.run(), Poll::Ready(()));
    assert!(matches!(second.try_recv(), Ok(Err(_))));
}
