//! The service's end of a worker's control link: the broker operations of the worker's
//! calls, done on the service's connection, and the deliveries of the consumers it opened.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use futures::StreamExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::sync::CancellationToken;

use super::protocol::{
    ForwardedDelivery, FrameReader, FrameSink, FromWorker, Settlement, ToWorker, TransportAnswer,
    TransportOp,
};
use crate::metrics::Metrics;
use crate::transport::{Acker, ClosedPart, ConsumeOptions, SharedTransport, TransportError};

/// The service's end of a worker's control link, written by whichever task has a frame to
/// send.
pub(super) type Sink = FrameSink<OwnedWriteHalf>;

/// What the task reading a worker's control link needs.
pub(super) struct ControlLink {
    pub(super) transport: SharedTransport,
    /// The service's metrics, where the RPC calls its workers' targets make are recorded.
    pub(super) metrics: Metrics,
    pub(super) replies: Weak<Sink>,
    pub(super) calls_socket: std::os::unix::net::UnixStream,
    /// Called once the link has ended (its pool replaces a worker that died idle).
    pub(super) ended: Box<dyn FnOnce() + Send>,
}

impl ControlLink {
    /// Do what the worker asks on its control link, until the link ends.
    pub(super) async fn serve(self, mut reader: FrameReader<OwnedReadHalf>) {
        let ControlLink { transport, metrics, replies, calls_socket, ended } = self;
        let reconnections = tokio::spawn(tell_reconnections(transport.clone(), replies.clone()));
        // Consumers opened for the worker and the ackers of what they forwarded: dropped
        // with this task when the worker goes, which hands unsettled messages back.
        let consumers = Consumers::default();
        // The operations under way, each given up on when its worker abandons it or the link
        // ends (the worker died, or was killed with its call): a publish waiting for the
        // broker to come back went out after its call had failed, which a thread mode, where
        // the call's future is the publish, never does.
        let link_ended = CancellationToken::new();
        let under_way = Arc::new(UnderWay::default());
        while let Ok(Some(frame)) = reader.next::<FromWorker>().await {
            match frame {
                FromWorker::Transport { id, op } => {
                    let (transport, replies) = (transport.clone(), replies.clone());
                    let consumers = consumers.clone();
                    let abandoned = under_way.start(id, &link_ended);
                    let under_way = under_way.clone();
                    tokio::spawn(async move {
                        let done = async {
                            match *op {
                                TransportOp::Consume { queue, options } => {
                                    let replies = replies.clone();
                                    consumers.open(&transport, &queue, options, replies).await
                                }
                                TransportOp::DeclareQueue(spec) => {
                                    if spec.arguments.contains_key("x-expires") {
                                        consumers.declared_temporary(&spec.name);
                                    }
                                    forward(&transport, TransportOp::DeclareQueue(spec)).await
                                }
                                op => forward(&transport, op).await,
                            }
                        };
                        let result = tokio::select! {
                            result = done => result,
                            () = abandoned.cancelled() => return,
                        };
                        under_way.end(id);
                        if let Some(link) = replies.upgrade() {
                            let _ = link.send(&ToWorker::TransportReply { id, result }).await;
                        }
                    });
                }
                FromWorker::Abandon { id } => under_way.abandon(id),
                FromWorker::Settle { delivery, settlement } => {
                    consumers.settle(delivery, settlement).await;
                }
                FromWorker::Cancel { consumer } => consumers.cancel(consumer),
                FromWorker::RpcCall { service, method, outcome, elapsed } => {
                    metrics.rpc_call(&service, &method, &outcome, elapsed);
                }
            }
        }
        for queue in consumers.close() {
            // the worker's own queue (its RPC replies', say): nobody else reads it, and the
            // service's connection would declare it again after every reconnect
            if let Err(error) = transport.delete_queue(&queue).await {
                tracing::debug!("cannot delete queue {queue} of a worker gone: {error}");
            }
        }
        // Ended, by the worker's exit or by a frame that could not be read: either way the
        // worker's broker operations can no longer be answered, so it counts as dead. With
        // its calls link shut down, a running call ends as crashed and an idle worker fails
        // the next call's write, and is replaced either way.
        let _ = calls_socket.shutdown(std::net::Shutdown::Both);
        reconnections.abort();
        link_ended.cancel();
        ended();
    }
}

/// The broker operations of a worker under way, by id.
#[derive(Default)]
struct UnderWay(Mutex<HashMap<u64, CancellationToken>>);

impl UnderWay {
    fn ops(&self) -> MutexGuard<'_, HashMap<u64, CancellationToken>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Operation `id` starts: given up on when the returned token fires (abandoned, or the
    /// link ended).
    fn start(&self, id: u64, link_ended: &CancellationToken) -> CancellationToken {
        let abandoned = link_ended.child_token();
        self.ops().insert(id, abandoned.clone());
        abandoned
    }

    /// Operation `id` is done: its answer goes to the worker.
    fn end(&self, id: u64) {
        self.ops().remove(&id);
    }

    /// The worker abandoned operation `id`: given up on, if still under way.
    fn abandon(&self, id: u64) {
        if let Some(abandoned) = self.ops().remove(&id) {
            abandoned.cancel();
        }
    }
}

/// How often the service looks whether its connection reconnected, to tell a worker.
const RECONNECTION_WATCH: std::time::Duration = std::time::Duration::from_secs(1);

/// Tell the worker at `link` how many times `transport` reconnected, at once and whenever it
/// changes, for as long as the link lives: a worker's RPC caller, whose reply queue the
/// service consumes for it, sets up a new queue after a reconnection, as the service's own
/// caller does.
async fn tell_reconnections(transport: SharedTransport, link: Weak<Sink>) {
    let mut told = 0;
    let mut watch = tokio::time::interval(RECONNECTION_WATCH);
    loop {
        watch.tick().await;
        let reconnects = transport.reconnects();
        if reconnects == told {
            continue;
        }
        let Some(link) = link.upgrade() else { return };
        if link.send(&ToWorker::Reconnected { reconnects }).await.is_err() {
            return;
        }
        told = reconnects;
    }
}

/// Do a worker's broker operation on the service's connection.
async fn forward(
    transport: &SharedTransport,
    op: TransportOp,
) -> Result<TransportAnswer, TransportError> {
    Ok(match op {
        TransportOp::DeclareExchange(spec) => {
            transport.declare_exchange(&spec).await?;
            TransportAnswer::Done
        }
        TransportOp::DeclareQueue(spec) => {
            TransportAnswer::Info(transport.declare_queue(&spec).await?)
        }
        TransportOp::QueueInfo(queue) => TransportAnswer::Info(transport.queue_info(&queue).await?),
        TransportOp::Bind(binding) => {
            transport.bind_queue(&binding).await?;
            TransportAnswer::Done
        }
        TransportOp::DeleteQueue(queue) => {
            TransportAnswer::Count(transport.delete_queue(&queue).await?)
        }
        TransportOp::DeleteExchange(exchange) => {
            transport.delete_exchange(&exchange).await?;
            TransportAnswer::Done
        }
        TransportOp::Purge(queue) => TransportAnswer::Count(transport.purge_queue(&queue).await?),
        TransportOp::Consume { queue, .. } => {
            return Err(TransportError::Internal(format!(
                "consume of {queue} is not forwarded here"
            )))
        }
        TransportOp::Publish { exchange, routing_key, message, options } => {
            transport.publish(&exchange, &routing_key, *message, options).await?;
            TransportAnswer::Done
        }
    })
}

/// Consumers the service runs for one worker (e.g. its RPC reply queue).
#[derive(Clone, Default)]
struct Consumers {
    inner: Arc<std::sync::Mutex<ConsumersState>>,
}

#[derive(Default)]
struct ConsumersState {
    next: u64,
    cancels: HashMap<u64, Box<dyn FnOnce() + Send>>,
    ackers: HashMap<u64, Box<dyn Acker>>,
    /// Queues the worker declared with a lease (`x-expires`): temporary by design.
    temporary: HashSet<String>,
    /// Temporary queues the worker consumes exclusively: its own, deleted when it goes.
    own: HashSet<String>,
    /// The worker is gone: a consumer it asked for and opened only now is cancelled at once.
    closed: bool,
}

impl Consumers {
    fn state(&self) -> std::sync::MutexGuard<'_, ConsumersState> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The worker declared `queue` with a lease (`x-expires`).
    fn declared_temporary(&self, queue: &str) {
        self.state().temporary.insert(queue.to_owned());
    }

    /// Consume `queue` for the worker, forwarding each delivery to it.
    async fn open(
        &self,
        transport: &SharedTransport,
        queue: &str,
        options: ConsumeOptions,
        to_worker: Weak<Sink>,
    ) -> Result<TransportAnswer, TransportError> {
        let exclusive = options.exclusive;
        let mut consumer = transport.consume(queue, options).await?;
        let (cancel, cancelled) = tokio::sync::oneshot::channel::<()>();
        let id = {
            let mut state = self.state();
            if state.closed {
                // Nobody would cancel it, and no delivery may ever come to notice the worker
                // is gone: it would hold the worker's queue, whose lease then never expires.
                drop(state);
                consumer.cancel();
                return Err(TransportError::Closed {
                    what: ClosedPart::Consumer,
                    reason: "the worker process that asked for it went away".into(),
                });
            }
            if exclusive && state.temporary.contains(queue) {
                state.own.insert(queue.to_owned());
            }
            state.next += 1;
            let id = state.next;
            state.cancels.insert(
                id,
                Box::new(move || {
                    let _ = cancel.send(());
                }),
            );
            id
        };
        let consumers = self.clone();
        tokio::spawn(async move {
            tokio::pin!(cancelled);
            loop {
                let delivery = tokio::select! {
                    _ = &mut cancelled => break,
                    delivery = consumer.next() => delivery,
                };
                let Some(delivery) = delivery else { break };
                let message = delivery.message();
                let number = {
                    let mut state = consumers.state();
                    state.next += 1;
                    let number = state.next;
                    state.ackers.insert(number, delivery.acker);
                    number
                };
                let forwarded = ForwardedDelivery { consumer: id, delivery: number, message };
                let Some(link) = to_worker.upgrade() else { break };
                if link.send(&ToWorker::Delivery(Box::new(forwarded))).await.is_err() {
                    break;
                }
            }
            consumer.cancel();
            if let Some(link) = to_worker.upgrade() {
                let _ = link.send(&ToWorker::ConsumerEnded { consumer: id }).await;
            }
        });
        Ok(TransportAnswer::Consuming { consumer: id })
    }

    async fn settle(&self, delivery: u64, settlement: Settlement) {
        let Some(acker) = self.state().ackers.remove(&delivery) else { return };
        let result = match settlement {
            Settlement::Ack => acker.ack().await,
            Settlement::Nack { requeue } => acker.nack(requeue).await,
            Settlement::Reject { requeue } => acker.reject(requeue).await,
        };
        if let Err(error) = result {
            tracing::warn!("cannot settle a worker's delivery: {error}");
        }
    }

    fn cancel(&self, consumer: u64) {
        if let Some(cancel) = self.state().cancels.remove(&consumer) {
            cancel();
        }
    }

    /// The worker is gone: stop its consumers; unsettled deliveries go back (acker drop).
    /// Returns the worker's own queues (temporary, consumed by it alone), to delete.
    fn close(&self) -> Vec<String> {
        let mut state = self.state();
        state.closed = true;
        for (_, cancel) in state.cancels.drain() {
            cancel();
        }
        state.ackers.clear();
        state.temporary.clear();
        state.own.drain().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::UnixStream;

    use super::super::protocol::{FrameWriter, Ready};
    use super::*;

    #[tokio::test]
    async fn a_frame_from_a_worker_that_cannot_be_read_ends_its_calls_link() {
        let config = crate::Config::new("pool-test")
            .with_amqp_uri(format!("memory://pool-test-{}", uuid::Uuid::new_v4()));
        let transport = crate::transport::connect(&config).await.unwrap();
        let (calls, worker_calls) = UnixStream::pair().unwrap();
        let (control, worker_control) = UnixStream::pair().unwrap();
        // the calls link stays open here, as the worker's `CallLink` keeps it
        let calls = calls.into_std().unwrap();
        let link = ControlLink {
            transport: transport.clone(),
            metrics: Metrics::new().unwrap(),
            replies: Weak::new(),
            calls_socket: calls.try_clone().unwrap(),
            ended: Box::new(|| {}),
        };
        let serving = tokio::spawn(link.serve(FrameReader::new(control.into_split().0)));
        let mut worker = FrameWriter::new(worker_control);
        worker.push(&"not a frame for a service").unwrap();
        worker.flush().await.unwrap();
        let mut worker_calls = FrameReader::new(worker_calls);
        let ended = tokio::time::timeout(Duration::from_secs(5), worker_calls.next::<Ready>())
            .await
            .expect("the service hangs up the worker's calls link");
        assert!(matches!(ended, Ok(None)), "{ended:?}");
        serving.await.unwrap();
        drop(calls);
        transport.close().await;
    }

    /// A worker that asked for a consumer and went before the service opened it: the
    /// consumer opened after the worker's link ended is cancelled, not left holding the
    /// worker's queue (which its lease would then never expire) for the service's life.
    #[tokio::test]
    async fn a_consumer_a_gone_worker_asked_for_is_not_left_open() {
        use crate::transport::QueueSpec;
        let config = crate::Config::new("pool-test")
            .with_amqp_uri(format!("memory://pool-test-{}", uuid::Uuid::new_v4()));
        let transport = crate::transport::connect(&config).await.unwrap();
        let queue = format!("rpc.reply-gone-{}", uuid::Uuid::new_v4());
        let spec = QueueSpec {
            name: queue.clone(),
            durable: false,
            exclusive: false,
            auto_delete: false,
            arguments: Default::default(),
        };
        transport.declare_queue(&spec).await.unwrap();
        let (calls, _worker_calls) = UnixStream::pair().unwrap();
        let (control, worker_control) = UnixStream::pair().unwrap();
        let (reader, writer) = control.into_split();
        let replies = Arc::new(FrameSink::new(writer));
        let link = ControlLink {
            transport: transport.clone(),
            metrics: Metrics::new().unwrap(),
            replies: Arc::downgrade(&replies),
            calls_socket: calls.into_std().unwrap(),
            ended: Box::new(|| {}),
        };
        // the worker asks, then goes at once, and the pool with it
        drop(replies);
        let mut worker = FrameWriter::new(worker_control);
        let options = ConsumeOptions { exclusive: true, ..ConsumeOptions::default() };
        let op = Box::new(TransportOp::Consume { queue: queue.clone(), options });
        worker.push(&FromWorker::Transport { id: 1, op }).unwrap();
        worker.flush().await.unwrap();
        drop(worker);
        tokio::time::timeout(Duration::from_secs(5), link.serve(FrameReader::new(reader)))
            .await
            .expect("the link ends with the worker");
        let mut consumers = u32::MAX;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            consumers = transport.queue_info(&queue).await.unwrap().consumer_count;
        }
        assert_eq!(consumers, 0, "a consumer for a worker gone is left open on {queue}");
        transport.close().await;
    }
}
