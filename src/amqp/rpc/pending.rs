//! [`RpcReply`]: a call sent, whose reply is awaited later.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::amqp::rpc::error::RpcError;
use crate::amqp::rpc::replies::{ReplyOutcome, ReplyQueue};
use crate::clock::deadline_after;
use crate::metrics::Metrics;
use crate::transport::{ClosedPart, TransportError};

/// An RPC call on its way: await it (or [`RpcReply::result`] for a typed result) to get the
/// reply. The call's timeout runs from when the call started (the set-up of its reply queue
/// and its publish included). Dropping it abandons the call (a late reply is dropped; the
/// service's metrics count it with the outcome `abandoned`).
#[derive(Debug)]
pub struct RpcReply {
    timeout: Duration,
    correlation_id: Arc<str>,
    arrival: Arrival,
    record: CallRecord,
}

/// Records a call's outcome and round trip in the service's metrics, once: when it ends, or,
/// dropped before, as `abandoned` (a reply never awaited, or a call cut short with its
/// caller, e.g. by `TASK_TIME_LIMIT`).
#[derive(Debug)]
pub(crate) struct CallRecord {
    // Shared with the request's publish, which names them if the request is unroutable.
    service: Arc<str>,
    method: Arc<str>,
    started: tokio::time::Instant,
    /// `None` once recorded, or for a call not recorded (a fake's answer).
    metrics: Option<Metrics>,
}

impl CallRecord {
    /// A call to `service.method` that started at `started`, to be recorded in `metrics`.
    pub(crate) fn new(
        service: Arc<str>,
        method: Arc<str>,
        started: tokio::time::Instant,
        metrics: Option<Metrics>,
    ) -> Self {
        CallRecord { service, method, started, metrics }
    }

    /// Record the call as ended with `result` (`ok`, or the error's kind).
    pub(crate) fn end<T>(mut self, result: &Result<T, RpcError>) {
        self.record(result.as_ref().map_or_else(RpcError::kind, |_| "ok"));
    }

    /// Record the call as failed with `error`, and hand the error back.
    pub(crate) fn failed(mut self, error: RpcError) -> RpcError {
        self.record(error.kind());
        error
    }

    fn record(&mut self, outcome: &str) {
        if let Some(metrics) = self.metrics.take() {
            metrics.rpc_call(&self.service, &self.method, outcome, self.started.elapsed());
        }
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        self.record("abandoned");
    }
}

/// How the reply comes.
#[derive(Debug)]
enum Arrival {
    /// Through a reply queue, until the deadline.
    Queued {
        deadline: tokio::time::Instant,
        receiver: oneshot::Receiver<ReplyOutcome>,
        waiting: Waiting,
    },
    /// Already there: a fake's answer.
    Ready(ReplyOutcome),
}

/// Forgets the correlation id when the call is done or abandoned.
#[derive(Debug)]
struct Waiting {
    queue: Arc<ReplyQueue>,
    correlation_id: Arc<str>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.queue.forget(&self.correlation_id);
    }
}

/// When a call started and when its `timeout` runs out: its timeout covers everything from
/// its start (the set-up of the reply queue, the publish, the wait for the reply).
#[derive(Clone, Copy, Debug)]
pub(crate) struct CallTime {
    pub started: tokio::time::Instant,
    pub timeout: Duration,
    pub deadline: tokio::time::Instant,
}

impl CallTime {
    /// A call starting now, with `timeout`.
    pub(crate) fn start(timeout: Duration) -> Self {
        CallTime {
            started: tokio::time::Instant::now(),
            timeout,
            deadline: deadline_after(timeout),
        }
    }

    /// The call's `Timeout` error.
    pub(crate) fn expired(&self, service: &str, method: &str) -> RpcError {
        RpcError::Timeout {
            service: service.to_owned(),
            method: method.to_owned(),
            after: self.timeout,
        }
    }
}

impl RpcReply {
    /// A call sent at `time`, whose reply comes on `queue` with `correlation_id` through
    /// `receiver`; it ends in `record`.
    pub(crate) fn new(
        time: CallTime,
        queue: Arc<ReplyQueue>,
        correlation_id: Arc<str>,
        receiver: oneshot::Receiver<ReplyOutcome>,
        record: CallRecord,
    ) -> Self {
        let CallTime { timeout, deadline, .. } = time;
        let waiting = Waiting { queue, correlation_id: correlation_id.clone() };
        RpcReply {
            timeout,
            correlation_id,
            arrival: Arrival::Queued { deadline, receiver, waiting },
            record,
        }
    }

    /// A reply that is already there, e.g. a fake's answer: no timeout applies, and it is
    /// not recorded in metrics.
    pub(crate) fn answered(service: &str, method: &str, outcome: ReplyOutcome) -> Self {
        let started = tokio::time::Instant::now();
        RpcReply {
            timeout: Duration::ZERO,
            correlation_id: uuid::Uuid::new_v4().to_string().into(),
            arrival: Arrival::Ready(outcome),
            record: CallRecord::new(service.into(), method.into(), started, None),
        }
    }

    /// The correlation id of the request.
    pub fn correlation_id(&self) -> &str {
        &self.correlation_id
    }

    /// Wait for the reply and deserialize its result into `T`. A result that does not fit
    /// `T` is [`RpcError::UnexpectedResult`]; the call itself is recorded as `ok` (the
    /// service answered it).
    pub async fn result<T: DeserializeOwned>(self) -> Result<T, RpcError> {
        typed(self.value().await?)
    }

    /// Wait for the reply.
    pub(crate) async fn value(self) -> Result<Value, RpcError> {
        let (reply, record) = self.split();
        let result = reply.await;
        record.end(&result);
        result
    }

    /// End the call, failed with `error` before its reply (its request not sent), and hand
    /// the error back.
    pub(crate) fn failed(self, error: RpcError) -> RpcError {
        self.record.failed(error)
    }

    /// The wait for the reply, and the record to end with its result.
    pub(crate) fn split(
        self,
    ) -> (impl Future<Output = Result<Value, RpcError>> + Send + 'static, CallRecord) {
        let RpcReply { timeout, arrival, record, .. } = self;
        let (service, method) = (record.service.clone(), record.method.clone());
        (arrive(arrival, service, method, timeout), record)
    }
}

/// The outcome of the call to `service.method` with `timeout`, as it arrives.
async fn arrive(
    arrival: Arrival,
    service: Arc<str>,
    method: Arc<str>,
    timeout: Duration,
) -> Result<Value, RpcError> {
    match arrival {
        Arrival::Ready(outcome) => outcome,
        Arrival::Queued { deadline, receiver, waiting } => {
            let outcome = tokio::time::timeout_at(deadline, receiver).await;
            if outcome.is_err() {
                // the service may be slow, or the replies may no longer reach the queue: a
                // probe tells, in the background
                tokio::spawn(waiting.queue.clone().probe());
            }
            drop(waiting);
            match outcome {
                Err(_) => Err(RpcError::Timeout {
                    service: service.to_string(),
                    method: method.to_string(),
                    after: timeout,
                }),
                Ok(Err(_)) => Err(RpcError::Transport(TransportError::Closed {
                    what: ClosedPart::Consumer,
                    reason: "the reply queue's consumer ended before the reply came".into(),
                })),
                Ok(Ok(outcome)) => outcome,
            }
        }
    }
}

/// A call's result deserialized into `T`.
pub(crate) fn typed<T: DeserializeOwned>(value: Value) -> Result<T, RpcError> {
    T::deserialize(&value).map_err(|error| {
        RpcError::UnexpectedResult(format!(
            "{value} does not fit {}: {error}",
            std::any::type_name::<T>()
        ))
    })
}

impl IntoFuture for RpcReply {
    type Output = Result<Value, RpcError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.value())
    }
}
