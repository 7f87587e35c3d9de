//! A worker's transport: every broker operation of its calls forwarded to the service over
//! the control link, and the deliveries the service forwards back handed to its consumers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot};

use super::protocol::{
    ForwardedDelivery, FrameSink, FromWorker, Settlement, TransportAnswer, TransportOp,
};
use crate::transport::limits::check_header_values;
use crate::transport::{
    Acker, BindingSpec, ClosedPart, ConsumeOptions, Consumer, Delivery, ExchangeSpec,
    OutgoingMessage, PublishOptions, QueueInfo, QueueSpec, Transport, TransportError,
};

type Pending = Mutex<HashMap<u64, oneshot::Sender<Result<TransportAnswer, TransportError>>>>;

type Consumers = Mutex<HashMap<u64, mpsc::Sender<Delivery>>>;

/// The worker's end of the link, written by whichever task has a frame to send.
type Sink = FrameSink<OwnedWriteHalf>;

/// What a closed link means to a worker's broker operations.
fn service_gone() -> TransportError {
    TransportError::Closed {
        what: ClosedPart::Transport,
        reason: "the service of this worker went away".into(),
    }
}

/// Send `frame` from where no task can wait for the link (a `Drop`, a metric recorded):
/// on a task of its own.
fn post(sink: &Arc<Sink>, frame: FromWorker) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let sink = sink.clone();
        runtime.spawn(async move {
            let _ = sink.send(&frame).await;
        });
    }
}

/// A transport that forwards every operation to the service over the worker socket.
pub(crate) struct ParentTransport {
    sink: Arc<Sink>,
    pending: Arc<Pending>,
    consumers: Arc<Consumers>,
    next_id: AtomicU64,
    /// The service connection's reconnections, as it last told.
    reconnects: AtomicU64,
}

impl std::fmt::Debug for ParentTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParentTransport").field("connected", &!self.sink.is_closed()).finish()
    }
}

/// Settles a delivery the service forwarded, by telling the service. Dropped unsettled, it
/// hands the message back.
struct ForwardedAcker {
    delivery: u64,
    sink: Arc<Sink>,
    settled: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for ForwardedAcker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardedAcker").field("delivery", &self.delivery).finish()
    }
}

impl ForwardedAcker {
    async fn settle(&self, settlement: Settlement) -> Result<(), TransportError> {
        if self.settled.swap(true, Ordering::SeqCst) {
            return Err(TransportError::AlreadySettled);
        }
        let frame = FromWorker::Settle { delivery: self.delivery, settlement };
        self.sink.send(&frame).await.map_err(|_| service_gone())
    }
}

#[async_trait]
impl Acker for ForwardedAcker {
    async fn ack(&self) -> Result<(), TransportError> {
        self.settle(Settlement::Ack).await
    }

    async fn nack(&self, requeue: bool) -> Result<(), TransportError> {
        self.settle(Settlement::Nack { requeue }).await
    }

    async fn reject(&self, requeue: bool) -> Result<(), TransportError> {
        self.settle(Settlement::Reject { requeue }).await
    }
}

impl Drop for ForwardedAcker {
    fn drop(&mut self) {
        if !self.settled.swap(true, Ordering::SeqCst) {
            let settlement = Settlement::Nack { requeue: true };
            post(&self.sink, FromWorker::Settle { delivery: self.delivery, settlement });
        }
    }
}

impl ParentTransport {
    async fn ask(&self, op: TransportOp) -> Result<TransportAnswer, TransportError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).insert(id, answer);
        let waiting = Waiting { transport: self, id: Some(id) };
        let sent = self.sink.send(&FromWorker::Transport { id, op: Box::new(op) }).await;
        if let Err(error) = sent {
            waiting.answered();
            self.pending.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
            return Err(match error.kind() {
                std::io::ErrorKind::InvalidData => {
                    TransportError::Internal(format!("cannot send to the service: {error}"))
                }
                _ => service_gone(),
            });
        }
        let answer = answered.await;
        waiting.answered();
        answer.map_err(|_| service_gone())?
    }
}

/// A broker operation the worker waits for the answer to. Dropped before the answer (the
/// call that asked was cut short: its time limit, its own timeout on an RPC call), it tells
/// the service to give the operation up, so that it does not happen once the call is over.
struct Waiting<'a> {
    transport: &'a ParentTransport,
    id: Option<u64>,
}

impl Waiting<'_> {
    fn answered(mut self) {
        self.id = None;
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            let transport = self.transport;
            transport.pending.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
            post(&transport.sink, FromWorker::Abandon { id });
        }
    }
}

fn unexpected(answer: TransportAnswer) -> TransportError {
    TransportError::Internal(format!("unexpected answer from the service: {answer:?}"))
}

#[async_trait]
impl Transport for ParentTransport {
    async fn declare_exchange(&self, spec: &ExchangeSpec) -> Result<(), TransportError> {
        self.ask(TransportOp::DeclareExchange(spec.clone())).await.map(|_| ())
    }

    async fn declare_queue(&self, spec: &QueueSpec) -> Result<QueueInfo, TransportError> {
        match self.ask(TransportOp::DeclareQueue(spec.clone())).await? {
            TransportAnswer::Info(info) => Ok(info),
            other => Err(unexpected(other)),
        }
    }

    async fn queue_info(&self, queue: &str) -> Result<QueueInfo, TransportError> {
        match self.ask(TransportOp::QueueInfo(queue.to_owned())).await? {
            TransportAnswer::Info(info) => Ok(info),
            other => Err(unexpected(other)),
        }
    }

    async fn bind_queue(&self, binding: &BindingSpec) -> Result<(), TransportError> {
        self.ask(TransportOp::Bind(binding.clone())).await.map(|_| ())
    }

    async fn delete_queue(&self, queue: &str) -> Result<u32, TransportError> {
        match self.ask(TransportOp::DeleteQueue(queue.to_owned())).await? {
            TransportAnswer::Count(count) => Ok(count),
            other => Err(unexpected(other)),
        }
    }

    async fn delete_exchange(&self, exchange: &str) -> Result<(), TransportError> {
        self.ask(TransportOp::DeleteExchange(exchange.to_owned())).await.map(|_| ())
    }

    async fn purge_queue(&self, queue: &str) -> Result<u32, TransportError> {
        match self.ask(TransportOp::Purge(queue.to_owned())).await? {
            TransportAnswer::Count(count) => Ok(count),
            other => Err(unexpected(other)),
        }
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: OutgoingMessage,
        options: PublishOptions,
    ) -> Result<(), TransportError> {
        // refused here, as the service's transport would, without a trip to the service
        check_header_values(&message.properties)?;
        let op = TransportOp::Publish {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            message: Box::new(message),
            options,
        };
        self.ask(op).await.map(|_| ())
    }

    async fn consume(
        &self,
        queue: &str,
        options: ConsumeOptions,
    ) -> Result<Consumer, TransportError> {
        let op = TransportOp::Consume { queue: queue.to_owned(), options };
        let TransportAnswer::Consuming { consumer } = self.ask(op).await? else {
            return Err(TransportError::Internal("unexpected answer to a consume".into()));
        };
        let (deliveries, receiver) = mpsc::channel(256);
        self.consumers.lock().unwrap_or_else(PoisonError::into_inner).insert(consumer, deliveries);
        let sink = self.sink.clone();
        let tag = format!("worker-{consumer}");
        Ok(Consumer::new(tag, receiver, move || post(&sink, FromWorker::Cancel { consumer })))
    }

    async fn get(&self, queue: &str) -> Result<Option<Delivery>, TransportError> {
        Err(TransportError::Unsupported(format!("cannot get from {queue} in a worker process")))
    }

    fn is_connected(&self) -> bool {
        !self.sink.is_closed()
    }

    fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Acquire)
    }

    async fn close(&self) {}
}

impl ParentTransport {
    /// A transport that sends the worker's broker operations through `sink`.
    pub(super) fn new(sink: Sink) -> Self {
        ParentTransport {
            sink: Arc::new(sink),
            pending: Arc::default(),
            consumers: Arc::default(),
            next_id: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        }
    }

    /// The service hung up: nothing sent from now on, every broker operation waiting for its
    /// answer fails at once and every consumer ends, so that a call waiting on the broker
    /// ends and the worker with it (rather than waiting for an answer that cannot come).
    pub(super) fn link_ended(&self) {
        self.sink.close();
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).clear();
        self.consumers.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    fn consumer(&self, consumer: u64) -> Option<mpsc::Sender<Delivery>> {
        self.consumers.lock().unwrap_or_else(PoisonError::into_inner).get(&consumer).cloned()
    }

    /// Hand a delivery the service forwarded to the consumer it is for (dropped, so handed
    /// back, when that consumer has ended).
    pub(super) async fn deliver(&self, forwarded: ForwardedDelivery) {
        let ForwardedDelivery { consumer, delivery, message } = forwarded;
        let sender = self.consumer(consumer);
        let acker = ForwardedAcker { delivery, sink: self.sink.clone(), settled: false.into() };
        let delivery = Delivery {
            exchange: message.exchange,
            routing_key: message.routing_key,
            redelivered: message.redelivered,
            body: message.body,
            properties: message.properties,
            acker: Box::new(acker),
        };
        if let Some(sender) = sender {
            let _ = sender.send(delivery).await;
        }
    }

    /// The service ended the consumer `consumer`: its stream ends.
    /// The service's connection has reconnected `reconnects` times.
    pub(super) fn reconnected(&self, reconnects: u64) {
        self.reconnects.store(reconnects, Ordering::Release);
    }

    pub(super) fn consumer_ended(&self, consumer: u64) {
        self.consumers.lock().unwrap_or_else(PoisonError::into_inner).remove(&consumer);
    }

    /// The service's answer to the broker operation `id`, for whom waits for it.
    pub(super) fn answer(&self, id: u64, result: Result<TransportAnswer, TransportError>) {
        let waiter = self.pending.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
        if let Some(waiter) = waiter {
            let _ = waiter.send(result);
        }
    }

    /// Hands the RPC calls the targets make to the service, whose metrics are served (a
    /// worker's own are not).
    #[cfg(feature = "metrics")]
    pub(super) fn rpc_call_sink(&self) -> crate::metrics::RpcCallSink {
        let sink = self.sink.clone();
        crate::metrics::RpcCallSink(Box::new(move |service, method, outcome, elapsed| {
            let frame = FromWorker::RpcCall {
                service: service.to_owned(),
                method: method.to_owned(),
                outcome: outcome.to_owned(),
                elapsed,
            };
            post(&sink, frame);
        }))
    }
}
