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
/// and its publish included). Dropping it abandons the call (a late reply is dropped).
#[derive(Debug)]
pub struct RpcReply {
    // Shared with the request's publish, which names them if the request is unroutable.
    service: Arc<str>,
    method: Arc<str>,
    timeout: Duration,
    correlation_id: Arc<str>,
    arrival: Arrival,
    metrics: Option<Metrics>,
    started: tokio::time::Instant,
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

    /// The call's `Timeout` error, recorded in `metrics`.
    pub(crate) fn expired(
        &self,
        service: &str,
        method: &str,
        metrics: Option<&Metrics>,
    ) -> RpcError {
        let error = RpcError::Timeout {
            service: service.to_owned(),
            method: method.to_owned(),
            after: self.timeout,
        };
        if let Some(metrics) = metrics {
            metrics.rpc_call(service, method, error.kind(), self.started.elapsed());
        }
        error
    }
}

impl RpcReply {
    pub(crate) fn new(
        service: Arc<str>,
        method: Arc<str>,
        time: CallTime,
        queue: Arc<ReplyQueue>,
        correlation_id: Arc<str>,
        receiver: oneshot::Receiver<ReplyOutcome>,
    ) -> Self {
        let CallTime { started, timeout, deadline } = time;
        let waiting = Waiting { queue, correlation_id: correlation_id.clone() };
        RpcReply {
            service,
            method,
            timeout,
            correlation_id,
            arrival: Arrival::Queued { deadline, receiver, waiting },
            metrics: None,
            started,
        }
    }

    /// A reply that is already there, e.g. a fake's answer: no timeout applies.
    pub(crate) fn answered(service: &str, method: &str, outcome: ReplyOutcome) -> Self {
        RpcReply {
            service: service.into(),
            method: method.into(),
            timeout: Duration::ZERO,
            correlation_id: uuid::Uuid::new_v4().to_string().into(),
            arrival: Arrival::Ready(outcome),
            metrics: None,
            started: tokio::time::Instant::now(),
        }
    }

    /// Record the call's outcome and round trip in `metrics` when it ends.
    pub(crate) fn recorded_in(mut self, metrics: Option<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The correlation id of the request.
    pub fn correlation_id(&self) -> &str {
        &self.correlation_id
    }

    /// Wait for the reply and deserialize its result into `T`.
    pub async fn result<T: DeserializeOwned>(self) -> Result<T, RpcError> {
        typed(self.value().await?)
    }

    /// Wait for the reply.
    pub(crate) async fn value(self) -> Result<Value, RpcError> {
        let RpcReply { service, method, timeout, arrival, metrics, started, .. } = self;
        let result = match arrival {
            Arrival::Ready(outcome) => outcome,
            Arrival::Queued { deadline, receiver, waiting } => {
                let outcome = tokio::time::timeout_at(deadline, receiver).await;
                if outcome.is_err() {
                    // the service may be slow, or the replies may no longer reach the queue:
                    // a probe tells, in the background
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
        };
        if let Some(metrics) = metrics {
            let outcome = result.as_ref().map_or_else(RpcError::kind, |_| "ok");
            metrics.rpc_call(&service, &method, outcome, started.elapsed());
        }
        result
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
