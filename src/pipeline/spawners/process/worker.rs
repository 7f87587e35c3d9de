//! The worker side: a re-executed service binary that runs calls sent by its service, and
//! sends its broker traffic back through it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use tokio::io::BufReader;
use tokio::net::unix::OwnedReadHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use super::protocol::{
    read_frame, write_frame, CallRequest, ForwardedDelivery, FromWorker, Settlement, ToWorker,
    TransportAnswer, TransportOp, READ_BUFFER,
};
use crate::error::{Error, Result};
use crate::pipeline::RouteHandle;
use crate::transport::{
    Acker, BindingSpec, ClosedPart, ConsumeOptions, Consumer, Delivery, ExchangeSpec,
    OutgoingMessage, PublishOptions, QueueInfo, QueueSpec, Transport, TransportError,
};

/// The environment variable that makes a service binary a worker: the socket to dial.
pub const WORKER_SOCKET_ENV: &str = "MF_WORKER_SOCKET";

/// The socket to dial when this process is a worker.
pub(crate) fn worker_socket() -> Option<String> {
    std::env::var(WORKER_SOCKET_ENV).ok().filter(|path| !path.is_empty())
}

type Pending = Mutex<HashMap<u64, oneshot::Sender<Result<TransportAnswer, TransportError>>>>;

type Consumers = Mutex<HashMap<u64, mpsc::Sender<Delivery>>>;

/// A transport that forwards every operation to the service over the worker socket.
#[derive(Debug)]
pub(crate) struct ParentTransport {
    frames: mpsc::Sender<FromWorker>,
    pending: Arc<Pending>,
    consumers: Arc<Consumers>,
    next_id: AtomicU64,
}

/// Settles a delivery the service forwarded, by telling the service. Dropped unsettled, it
/// hands the message back.
#[derive(Debug)]
struct ForwardedAcker {
    delivery: u64,
    frames: mpsc::Sender<FromWorker>,
    settled: std::sync::atomic::AtomicBool,
}

impl ForwardedAcker {
    async fn settle(&self, settlement: Settlement) -> Result<(), TransportError> {
        if self.settled.swap(true, Ordering::SeqCst) {
            return Err(TransportError::AlreadySettled);
        }
        let frame = FromWorker::Settle { delivery: self.delivery, settlement };
        self.frames.send(frame).await.map_err(|_| TransportError::Closed {
            what: ClosedPart::Transport,
            reason: "service gone".into(),
        })
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
            let _ =
                self.frames.try_send(FromWorker::Settle { delivery: self.delivery, settlement });
        }
    }
}

impl ParentTransport {
    async fn ask(&self, op: TransportOp) -> Result<TransportAnswer, TransportError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).insert(id, answer);
        let closed = || TransportError::Closed {
            what: ClosedPart::Transport,
            reason: "the service of this worker went away".into(),
        };
        self.frames
            .send(FromWorker::Transport { id, op: Box::new(op) })
            .await
            .map_err(|_| closed())?;
        answered.await.map_err(|_| closed())?
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
        let frames = self.frames.clone();
        let tag = format!("worker-{consumer}");
        Ok(Consumer::new(tag, receiver, move || {
            let _ = frames.try_send(FromWorker::Cancel { consumer });
        }))
    }

    async fn get(&self, queue: &str) -> Result<Option<Delivery>, TransportError> {
        Err(TransportError::Unsupported(format!("cannot get from {queue} in a worker process")))
    }

    fn is_connected(&self) -> bool {
        !self.frames.is_closed()
    }

    async fn close(&self) {}
}

/// The socket to the service, once connected.
pub(crate) struct WorkerLink {
    reader: BufReader<OwnedReadHalf>,
    frames: mpsc::Sender<FromWorker>,
    pending: Arc<Pending>,
    transport: Arc<ParentTransport>,
}

impl WorkerLink {
    /// Dial the service at `socket`.
    pub(crate) async fn connect(socket: &str) -> Result<Self> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|error| Error::Startup(format!("worker cannot reach its service: {error}")))?;
        let (reader, mut writer) = stream.into_split();
        let (frames, mut outgoing) = mpsc::channel::<FromWorker>(64);
        tokio::spawn(async move {
            while let Some(frame) = outgoing.recv().await {
                if write_frame(&mut writer, &frame).await.is_err() {
                    break;
                }
            }
        });
        let pending = Arc::new(Pending::default());
        let transport = Arc::new(ParentTransport {
            frames: frames.clone(),
            pending: pending.clone(),
            consumers: Arc::default(),
            next_id: AtomicU64::new(0),
        });
        let reader = BufReader::with_capacity(READ_BUFFER, reader);
        Ok(WorkerLink { reader, frames, pending, transport })
    }

    fn consumer(&self, consumer: u64) -> Option<mpsc::Sender<Delivery>> {
        self.transport
            .consumers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&consumer)
            .cloned()
    }

    /// The transport that forwards broker operations to the service.
    pub(crate) fn transport(&self) -> Arc<ParentTransport> {
        self.transport.clone()
    }

    /// Say ready, then run the calls the service sends until it hangs up.
    pub(crate) async fn serve(mut self, routes: HashMap<String, RouteHandle>) -> Result<()> {
        let ready = FromWorker::Ready { pid: std::process::id() };
        self.frames.send(ready).await.map_err(|_| Error::Startup("service hung up".into()))?;
        while let Some(frame) = read_frame::<_, ToWorker>(&mut self.reader).await? {
            match frame {
                ToWorker::Call(request) => {
                    let frames = self.frames.clone();
                    let Some(route) = routes.get(&request.route).cloned() else {
                        let failure = crate::Failure::new(
                            crate::FailureKind::Error,
                            format!("the worker has no route '{}'", request.route),
                        );
                        let _ = frames.send(FromWorker::Outcome(Err(failure))).await;
                        continue;
                    };
                    tokio::spawn(async move {
                        let CallRequest { role, message, failure, retry, .. } = *request;
                        let outcome = route.run_here(role, &message, failure, &retry).await;
                        let _ = frames.send(FromWorker::Outcome(outcome)).await;
                    });
                }
                ToWorker::Delivery(forwarded) => {
                    let ForwardedDelivery { consumer, delivery, message } = *forwarded;
                    let sender = self.consumer(consumer);
                    let acker = ForwardedAcker {
                        delivery,
                        frames: self.frames.clone(),
                        settled: Default::default(),
                    };
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
                ToWorker::ConsumerEnded { consumer } => {
                    self.transport
                        .consumers
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&consumer);
                }
                ToWorker::TransportReply { id, result } => {
                    let waiter =
                        self.pending.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
                    if let Some(waiter) = waiter {
                        let _ = waiter.send(result);
                    }
                }
            }
        }
        Ok(())
    }
}
