//! The probe a timed-out call sends through its reply queue: a queue whose replies no longer
//! arrive is retired for a new one, without failing the calls that wait on it; a queue that
//! still works is kept. A reply queue does not keep its connection open.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use serde_json::json;

use crate::amqp::entrypoints::RPCListener;
use crate::amqp::rpc::{Args, Caller, ReplyListener, RpcBackend, RpcError, RpcRequest};
use crate::config::{Config, Protocol};
use crate::transport::{
    BindingSpec, ClosedPart, ConsumeOptions, Consumer, Delivery, ExchangeSpec, Headers, Limit,
    OutgoingMessage, PublishOptions, QueueInfo, QueueSpec, SharedTransport, Transport,
    TransportError,
};
use crate::{Route, Runner, RunningService};

/// A transport whose consumers can be struck dumb: they stop handing deliveries on and never
/// end, as a consumer looks when the broker no longer feeds it and has not told it so. It can
/// also lose the probes, as a path too slow for them looks while replies still come, and
/// stall the consumes of reply queues, as a slow broker does. It records the reply queues
/// declared.
#[derive(Debug)]
struct Muting {
    inner: SharedTransport,
    /// The mute switch of each consumer started, with its queue.
    consumers: Mutex<Vec<(String, Arc<AtomicBool>)>>,
    probes: AtomicUsize,
    lose_probes: AtomicBool,
    /// Publishes other than probes never finish, as with a broker out of reach.
    hold_publishes: AtomicBool,
    /// What a consume of a reply queue does instead of consuming, if anything.
    stall: Option<Stall>,
    declared_replies: Mutex<Vec<String>>,
}

/// How a consume of a reply queue stalls.
#[derive(Debug, Clone, Copy)]
enum Stall {
    /// It never finishes.
    Hang,
    /// It fails.
    Refuse,
}

impl Muting {
    fn new(inner: SharedTransport) -> Arc<Self> {
        Arc::new(Muting::fields(inner))
    }

    fn fields(inner: SharedTransport) -> Self {
        Muting {
            inner,
            consumers: Mutex::default(),
            probes: AtomicUsize::new(0),
            lose_probes: AtomicBool::new(false),
            hold_publishes: AtomicBool::new(false),
            stall: None,
            declared_replies: Mutex::default(),
        }
    }

    /// Mute every consumer started so far (not the ones started later).
    fn mute(&self) {
        for (_, muted) in self.consumers.lock().unwrap().iter() {
            muted.store(true, Ordering::SeqCst);
        }
    }

    /// The queues consumed, in order.
    fn consumed(&self) -> Vec<String> {
        self.consumers.lock().unwrap().iter().map(|(queue, _)| queue.clone()).collect()
    }

    fn probes(&self) -> usize {
        self.probes.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Transport for Muting {
    async fn declare_exchange(&self, spec: &ExchangeSpec) -> Result<(), TransportError> {
        self.inner.declare_exchange(spec).await
    }

    async fn declare_queue(&self, spec: &QueueSpec) -> Result<QueueInfo, TransportError> {
        if spec.name.starts_with("rpc.reply-") {
            self.declared_replies.lock().unwrap().push(spec.name.clone());
        }
        self.inner.declare_queue(spec).await
    }

    async fn queue_info(&self, queue: &str) -> Result<QueueInfo, TransportError> {
        self.inner.queue_info(queue).await
    }

    async fn bind_queue(&self, binding: &BindingSpec) -> Result<(), TransportError> {
        self.inner.bind_queue(binding).await
    }

    async fn delete_queue(&self, queue: &str) -> Result<u32, TransportError> {
        self.inner.delete_queue(queue).await
    }

    async fn delete_exchange(&self, exchange: &str) -> Result<(), TransportError> {
        self.inner.delete_exchange(exchange).await
    }

    async fn purge_queue(&self, queue: &str) -> Result<u32, TransportError> {
        self.inner.purge_queue(queue).await
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: OutgoingMessage,
        options: PublishOptions,
    ) -> Result<(), TransportError> {
        let correlation_id = message.properties.correlation_id.as_deref().unwrap_or_default();
        if correlation_id.starts_with("probe-") {
            self.probes.fetch_add(1, Ordering::SeqCst);
            if self.lose_probes.load(Ordering::SeqCst) {
                return Ok(());
            }
        } else if self.hold_publishes.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.inner.publish(exchange, routing_key, message, options).await
    }

    async fn consume(
        &self,
        queue: &str,
        options: ConsumeOptions,
    ) -> Result<Consumer, TransportError> {
        match self.stall {
            Some(Stall::Refuse) if queue.starts_with("rpc.reply-") => {
                return Err(TransportError::ConnectionLost("consume refused".into()));
            }
            Some(Stall::Hang) if queue.starts_with("rpc.reply-") => {
                std::future::pending::<()>().await;
            }
            _ => {}
        }
        let inner = self.inner.consume(queue, options).await?;
        let tag = inner.tag().to_owned();
        let muted = Arc::new(AtomicBool::new(false));
        self.consumers.lock().unwrap().push((queue.to_owned(), muted.clone()));
        let deliveries = futures::stream::unfold((inner, muted), |(mut inner, muted)| async move {
            let delivery: Delivery = inner.next().await?;
            if muted.load(Ordering::SeqCst) {
                // held unsettled and never handed on, until the consumer is dropped
                let never: std::convert::Infallible = std::future::pending().await;
                match never {}
            }
            Some((delivery, (inner, muted)))
        });
        Ok(Consumer::from_stream(tag, deliveries, || {}))
    }

    async fn get(&self, queue: &str) -> Result<Option<Delivery>, TransportError> {
        self.inner.get(queue).await
    }

    fn is_connected(&self) -> bool {
        self.inner.is_connected()
    }

    async fn close(&self) {
        self.inner.close().await
    }
}

fn add(Args((a, b)): Args<(i64, i64)>) -> i64 {
    a + b
}

fn text(Args((len,)): Args<(usize,)>) -> String {
    "x".repeat(len)
}

async fn slow(Args((millis,)): Args<(u64,)>) -> u64 {
    tokio::time::sleep(Duration::from_millis(millis)).await;
    millis
}

/// A service `probed` (`add`, `slow`) on a fresh in-process broker, and a caller on that
/// broker through a [`Muting`] transport.
async fn rig() -> (RunningService, Arc<Muting>, Caller) {
    let uri = format!("memory://probe-{}", uuid::Uuid::new_v4());
    let config = Config::new("probed").with_amqp_uri(uri);
    let routes = vec![
        Route::new(add).entrypoint(RPCListener::new()),
        Route::new(slow).entrypoint(RPCListener::new()),
        Route::new(text).entrypoint(RPCListener::new()),
    ];
    let service = Runner::new(routes, config.clone()).spawn().await.unwrap();
    let muting = Muting::new(crate::transport::connect(&config).await.unwrap());
    let transport: SharedTransport = muting.clone();
    let listener = Arc::new(ReplyListener::new("caller", config.max_message_size));
    let caller = Caller::new(transport, listener, &config, Headers::new());
    (service, muting, caller)
}

async fn call(
    caller: &Caller,
    method: &str,
    args: serde_json::Value,
    timeout: Duration,
) -> Result<serde_json::Value, RpcError> {
    let request =
        RpcRequest::new(Protocol::Nameko, "probed", method, args, (), Some(timeout)).unwrap();
    caller.call(request).await
}

/// [`rig`] with the caller's reply queue set up by a first call, and that queue's name.
async fn rig_with_a_reply_queue() -> (RunningService, Arc<Muting>, Arc<Caller>, String) {
    let (service, muting, caller) = rig().await;
    let caller = Arc::new(caller);
    let sum = call(&caller, "add", json!([1, 2]), Duration::from_secs(5)).await.unwrap();
    assert_eq!(sum, json!(3));
    let queue = muting.consumed()[0].clone();
    (service, muting, caller, queue)
}

/// A call running in the background.
fn spawn_call(
    caller: &Arc<Caller>,
    method: &'static str,
    args: serde_json::Value,
    timeout: Duration,
) -> tokio::task::JoinHandle<Result<serde_json::Value, RpcError>> {
    let caller = caller.clone();
    tokio::spawn(async move { call(&caller, method, args, timeout).await })
}

/// Call `add(2, 3)`, each call waiting up to `timeout`, until a call sets up a new reply
/// queue, the first one retired (200 calls at most); return the two queues and the calls'
/// outcomes.
async fn until_a_new_queue(
    caller: &Caller,
    muting: &Muting,
    timeout: Duration,
) -> (Vec<String>, Vec<Result<serde_json::Value, RpcError>>) {
    let mut outcomes = Vec::new();
    for _ in 0..200 {
        if muting.consumed().len() == 2 {
            break;
        }
        outcomes.push(call(caller, "add", json!([2, 3]), timeout).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let consumed = muting.consumed();
    assert_eq!(consumed.len(), 2, "a new reply queue: {consumed:?}");
    (consumed, outcomes)
}

/// Mute the reply queue with a call waiting on it (for up to `timeout`), and let another
/// call time out: the probe does not come back and retires the queue (2 s), and calls made
/// from then on use a new one, which is not muted. The waiting call, and the two queues.
async fn retire_with_a_call_waiting(
    caller: &Arc<Caller>,
    muting: &Muting,
    timeout: Duration,
) -> (tokio::task::JoinHandle<Result<serde_json::Value, RpcError>>, Vec<String>) {
    muting.mute();
    let waiting = spawn_call(caller, "add", json!([2, 3]), timeout);
    let timed_out = call(caller, "add", json!([3, 4]), Duration::from_millis(200)).await;
    assert!(matches!(timed_out, Err(RpcError::Timeout { .. })), "{timed_out:?}");
    let (queues, _timed_out) = until_a_new_queue(caller, muting, Duration::from_millis(100)).await;
    (waiting, queues)
}

/// Poll `done` every 20 ms for up to 10 s.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what} did not happen within 10 s");
}

/// Wait until the queue `name` no longer exists.
async fn until_deleted(inner: &SharedTransport, name: &str) {
    for _ in 0..500 {
        if matches!(inner.queue_info(name).await, Err(TransportError::NotFound(_))) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the queue {name} was not deleted within 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_queue_whose_replies_stop_arriving_is_retired_after_a_timeout() {
    let (service, muting, caller) = rig().await;
    let (short, long) = (Duration::from_millis(300), Duration::from_secs(5));
    assert_eq!(call(&caller, "add", json!([1, 2]), long).await.unwrap(), json!(3));
    let first = muting.consumed();
    assert_eq!(first.len(), 1, "one reply queue: {first:?}");

    muting.mute();
    let timed_out = call(&caller, "add", json!([2, 3]), short).await;
    assert!(matches!(timed_out, Err(RpcError::Timeout { .. })), "{timed_out:?}");
    let old = first[0].clone();
    // the probe does not come back and no call waits: the queue is retired and deleted
    until_deleted(&muting.inner, &old).await;
    assert_eq!(muting.probes(), 1);

    assert_eq!(call(&caller, "add", json!([3, 4]), long).await.unwrap(), json!(7));
    let consumed = muting.consumed();
    assert_eq!(consumed.len(), 2, "a new reply queue: {consumed:?}");
    assert_ne!(consumed[1], old);
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waiting_on_a_retired_queue_still_gets_its_reply() {
    let (service, muting, caller, old) = rig_with_a_reply_queue().await;
    muting.lose_probes.store(true, Ordering::SeqCst);
    let waiting = spawn_call(&caller, "slow", json!([6000]), Duration::from_secs(20));
    let timed_out = call(&caller, "slow", json!([1000]), Duration::from_millis(200)).await;
    assert!(matches!(timed_out, Err(RpcError::Timeout { .. })), "{timed_out:?}");
    // the lost probe retires the queue (2 s): calls made from then on use a new one, and
    // calls made meanwhile get their replies
    let (_, outcomes) = until_a_new_queue(&caller, &muting, Duration::from_secs(5)).await;
    for sum in outcomes {
        assert_eq!(sum.unwrap(), json!(5));
    }
    assert!(!waiting.is_finished(), "the slow call ended before the queue was retired");
    // the waiting call was not failed, and its reply still reaches it
    assert_eq!(waiting.await.unwrap().unwrap(), json!(6000));
    // with no call waiting on it any more, the retired queue is deleted
    until_deleted(&muting.inner, &old).await;
    assert_eq!(muting.probes(), 1);
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waiting_on_a_deaf_retired_queue_ends_at_its_own_timeout() {
    let (service, muting, caller, old) = rig_with_a_reply_queue().await;
    let (waiting, _) = retire_with_a_call_waiting(&caller, &muting, Duration::from_secs(5)).await;
    // the retired queue still has a call waiting: it is kept until that call ends
    assert!(muting.inner.queue_info(&old).await.is_ok());
    let ended = waiting.await.unwrap();
    assert!(matches!(ended, Err(RpcError::Timeout { .. })), "{ended:?}");
    until_deleted(&muting.inner, &old).await;
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_stops_deletes_the_retired_queues_calls_still_wait_on() {
    let (service, muting, caller, old) = rig_with_a_reply_queue().await;
    let (waiting, consumed) =
        retire_with_a_call_waiting(&caller, &muting, Duration::from_secs(10)).await;
    assert!(!waiting.is_finished(), "a call still waits on the retired queue");
    caller.listener.close(&caller.transport).await;
    for queue in [&old, &consumed[1]] {
        let gone = muting.inner.queue_info(queue).await;
        assert!(matches!(gone, Err(TransportError::NotFound(_))), "{queue}: {gone:?}");
    }
    // its queue gone, the waiting call ends
    assert!(waiting.await.unwrap().is_err());
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_queue_that_still_works_is_kept_after_a_timeout() {
    let (service, muting, caller) = rig().await;
    let timed_out = call(&caller, "slow", json!([400]), Duration::from_millis(100)).await;
    assert!(matches!(timed_out, Err(RpcError::Timeout { .. })), "{timed_out:?}");
    eventually("the probe", || muting.probes() == 1).await;
    // a second timeout right after does not probe again
    let timed_out = call(&caller, "slow", json!([400]), Duration::from_millis(100)).await;
    assert!(matches!(timed_out, Err(RpcError::Timeout { .. })), "{timed_out:?}");
    // the first probe came back long ago (the broker is in-process): the queue is kept
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        call(&caller, "add", json!([1, 2]), Duration::from_secs(5)).await.unwrap(),
        json!(3)
    );
    assert_eq!(muting.consumed().len(), 1, "the same reply queue: {:?}", muting.consumed());
    assert_eq!(muting.probes(), 1);
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_queue_does_not_keep_its_connection_open() {
    let (service, muting, caller) = rig().await;
    assert_eq!(
        call(&caller, "add", json!([1, 2]), Duration::from_secs(5)).await.unwrap(),
        json!(3)
    );
    let connection = Arc::downgrade(&muting);
    drop((caller, muting));
    // the last handle dropped closes the connection, which ends the reply queue's consumer
    eventually("the connection's release", || connection.upgrade().is_none()).await;
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_with_no_time_limit_is_answered() {
    // Duration::MAX is how a caller says "no limit"; the deadline must not overflow the clock
    let (service, _muting, caller) = rig().await;
    assert_eq!(call(&caller, "add", json!([1, 2]), Duration::MAX).await, Ok(json!(3)));
    service.stop().await.unwrap();
}

/// A caller on a fresh in-process broker through a [`Muting`] transport whose consumes of
/// reply queues never finish (a slow broker), or fail (`refuse`).
async fn slow_rig(refuse: bool) -> (Arc<Muting>, Caller) {
    let uri = format!("memory://slow-{}", uuid::Uuid::new_v4());
    let config = Config::new("slow_consume").with_amqp_uri(uri);
    let inner = crate::transport::connect(&config).await.unwrap();
    let stall = if refuse { Stall::Refuse } else { Stall::Hang };
    let slow = Arc::new(Muting { stall: Some(stall), ..Muting::fields(inner) });
    let transport: SharedTransport = slow.clone();
    let listener = Arc::new(ReplyListener::new("caller", config.max_message_size));
    (slow, Caller::new(transport, listener, &config, Headers::new()))
}

fn request_to_nobody() -> RpcRequest {
    RpcRequest::new(Protocol::Nameko, "nobody", "m", json!([]), (), None).unwrap()
}

#[tokio::test]
async fn a_reply_queue_whose_set_up_was_abandoned_is_deleted() {
    let (slow, caller) = slow_rig(false).await;
    for _ in 0..3 {
        // the caller gives up (its own deadline, or its task aborted) while the queue is set up
        let abandoned =
            tokio::time::timeout(Duration::from_millis(50), caller.call(request_to_nobody())).await;
        assert!(abandoned.is_err());
    }
    caller.listener.close(&caller.transport).await;
    let declared = slow.declared_replies.lock().unwrap().clone();
    assert_eq!(declared.len(), 3);
    for queue in declared {
        until_deleted(&slow.inner, &queue).await;
    }
}

#[tokio::test]
async fn a_reply_queue_whose_consume_failed_is_deleted() {
    let (slow, caller) = slow_rig(true).await;
    let failed = caller.call(request_to_nobody()).await;
    assert!(matches!(failed, Err(RpcError::Transport(_))), "{failed:?}");
    let declared = slow.declared_replies.lock().unwrap().clone();
    assert_eq!(declared.len(), 1);
    until_deleted(&slow.inner, &declared[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_reply_queue_refuses_calls_and_the_next_call_uses_a_new_one() {
    let (service, muting, caller, old) = rig_with_a_reply_queue().await;
    let listener = &caller.listener;
    let queue =
        listener.queue(&caller.transport, Protocol::Nameko, &caller.exchange).await.unwrap();
    // its queue deleted behind the caller's back, the consumer ends: a call that fetched the
    // queue before registers too late, and must be refused rather than sent with no reply to
    // come
    muting.inner.delete_queue(&old).await.unwrap();
    let correlation_id: Arc<str> = "late-call".into();
    eventually("the refusal", || queue.await_reply(&correlation_id).is_err()).await;
    let refused = queue.await_reply(&correlation_id);
    assert!(
        matches!(refused, Err(TransportError::Closed { what: ClosedPart::Consumer, .. })),
        "{refused:?}"
    );
    let sum = call(&caller, "add", json!([2, 3]), Duration::from_secs(5)).await;
    assert_eq!(sum, Ok(json!(5)));
    let consumed = muting.consumed();
    assert_eq!(consumed.len(), 2, "a new reply queue: {consumed:?}");
    assert_ne!(consumed[1], old);
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_over_max_message_size_fails_its_call_and_no_other() {
    // MAX_MESSAGE_SIZE bounds the bodies a service receives, replies included: a reply bigger
    // than the caller's limit is not read, and its call fails as an oversized message does
    let (service, _muting, caller) = rig().await;
    let listener = Arc::new(ReplyListener::new("caller", 1000));
    let caller = Caller { listener, max_message_size: 1000, ..caller };
    let long = Duration::from_secs(5);
    let refused = call(&caller, "text", json!([5000]), long).await;
    assert!(
        matches!(
            &refused,
            Err(RpcError::Transport(TransportError::LimitReached {
                what: Limit::MessageSize,
                limit: 1000,
                ..
            }))
        ),
        "{:?}",
        refused.map(|text| text.to_string().len())
    );
    // the limit itself is a reply's size: a reply of exactly 1000 bytes is read
    let fits = 1000 - br#"{"error":null,"result":""}"#.len();
    assert_eq!(call(&caller, "text", json!([fits]), long).await, Ok(json!("x".repeat(fits))));
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_stopped_sets_up_no_new_reply_queue() {
    // A call still running when its caller stops (a client closes, a service stops) must not
    // set up a reply queue after the caller deleted its own: nothing would delete it, and it
    // would stay, unconsumed, until it expires.
    let (service, muting, caller, _old) = rig_with_a_reply_queue().await;
    caller.listener.close(&caller.transport).await;
    let refused = call(&caller, "add", json!([2, 3]), Duration::from_secs(5)).await;
    assert!(
        matches!(
            refused,
            Err(RpcError::Transport(TransportError::Closed { what: ClosedPart::Transport, .. }))
        ),
        "{refused:?}"
    );
    let consumed = muting.consumed();
    assert_eq!(consumed.len(), 1, "no new reply queue: {consumed:?}");
    service.stop().await.unwrap();
}

/// Whether `outcome` is the call's own timeout.
fn timed_out(
    outcome: &Result<Result<serde_json::Value, RpcError>, tokio::time::error::Elapsed>,
) -> bool {
    matches!(outcome, Ok(Err(RpcError::Timeout { .. })))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_keeps_to_its_timeout_while_its_reply_queue_is_set_up() {
    // A call's timeout runs from when the call starts and covers the set-up of the reply
    // queue: with a broker that does not answer, each of several first calls ends at its own
    // timeout, not after the set-up's (30 s for each call before it on RabbitMQ).
    let (_slow, caller) = slow_rig(false).await;
    let caller = Arc::new(caller);
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let caller = caller.clone();
            tokio::spawn(async move {
                let request = RpcRequest::new(
                    Protocol::Nameko,
                    "nobody",
                    "m",
                    json!([]),
                    (),
                    Some(Duration::from_millis(300)),
                )
                .unwrap();
                tokio::time::timeout(Duration::from_secs(10), caller.call(request)).await
            })
        })
        .collect();
    for call in calls {
        let outcome = call.await.unwrap();
        assert!(timed_out(&outcome), "{outcome:?}");
    }
    caller.listener.close(&caller.transport).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_sent_for_later_keeps_to_its_timeout_while_its_request_is_published() {
    // `send` (call_async) returns once the request is confirmed: a publish that does not
    // finish (a broker out of reach) ends at the call's timeout, not at the publish's own.
    let (service, muting, caller, _queue) = rig_with_a_reply_queue().await;
    muting.hold_publishes.store(true, Ordering::SeqCst);
    let request = RpcRequest::new(
        Protocol::Nameko,
        "probed",
        "add",
        json!([1, 2]),
        (),
        Some(Duration::from_millis(300)),
    )
    .unwrap();
    let sent = tokio::time::timeout(Duration::from_secs(10), caller.send(request)).await;
    let outcome = sent.map(|sent| sent.map(|reply| json!(reply.correlation_id())));
    assert!(timed_out(&outcome), "{outcome:?}");
    muting.hold_publishes.store(false, Ordering::SeqCst);
    service.stop().await.unwrap();
}
