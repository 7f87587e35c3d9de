//! [`Caller`]: sends RPC requests and waits for their replies on a shared reply queue.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::oneshot;

use crate::amqp::rpc::error::RpcError;
use crate::amqp::rpc::naming::{rpc_exchange, ufw_routing_key, ufw_rpc_exchange};
use crate::amqp::rpc::pending::{CallRecord, CallTime, RpcReply};
use crate::amqp::rpc::replies::{ReplyListener, ReplyOutcome, ReplyQueue};
use crate::amqp::rpc::request::{RpcBackend, RpcRequest};
use crate::config::{Config, Protocol};
use crate::data::json_properties;
use crate::data::ufw_wire;
use crate::metrics::Metrics;
use crate::transport::{
    ClosedPart, ExchangeSpec, Headers, OutgoingMessage, PublishOptions, SharedTransport,
    TransportError,
};

/// What every call of a caller shares: the connection, the reply queues, the default wire
/// protocol, Nameko's exchange, the default timeout and the context headers sent with each
/// request.
#[derive(Clone, Debug)]
pub(crate) struct Caller {
    pub transport: SharedTransport,
    pub listener: Arc<ReplyListener>,
    pub protocol: Protocol,
    pub exchange: ExchangeSpec,
    pub timeout: Duration,
    pub headers: Headers,
    pub metrics: Option<Metrics>,
    pub max_message_size: usize,
    /// The requests' delivery mode: 2 (persistent) or 1 (transient), from
    /// `RPC_PERSISTENT_REQUESTS`.
    pub delivery_mode: u8,
    /// A standalone client's: closes its connection and reply queues once the last handle
    /// of the client (its clones, its service proxies) is dropped. `None` for a service's
    /// calls, whose stop closes them.
    pub _closer: Option<Arc<CloseOnDrop>>,
}

impl Caller {
    /// A caller on `transport` with `config`'s exchange and timeout, replies through
    /// `listener`.
    pub(crate) fn new(
        transport: SharedTransport,
        listener: Arc<ReplyListener>,
        config: &Config,
        headers: Headers,
    ) -> Self {
        Caller {
            transport,
            listener,
            protocol: config.protocol,
            exchange: rpc_exchange(config),
            timeout: config.rpc_timeout,
            headers,
            metrics: None,
            max_message_size: config.max_message_size,
            delivery_mode: if config.rpc_persistent_requests { 2 } else { 1 },
            _closer: None,
        }
    }

    /// Record the calls in the service's metrics.
    pub(crate) fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }
}

/// Closes a standalone caller's reply queues and connection when dropped, as
/// [`Client::close`](crate::amqp::rpc::Client::close) does: a client dropped without `close`
/// left its reply queue on the broker until `x-expires` removed it (5 minutes), one for each
/// client a program made and dropped. The close runs on the runtime the client connected on;
/// with that runtime gone, the queue is left to expire.
#[derive(Debug)]
pub(crate) struct CloseOnDrop {
    transport: SharedTransport,
    listener: Arc<ReplyListener>,
    /// `None` when connected outside a tokio runtime (an in-process broker needs none).
    runtime: Option<tokio::runtime::Handle>,
}

impl CloseOnDrop {
    /// Closes `listener`'s queues and `transport` on the current runtime once dropped.
    pub(crate) fn new(transport: SharedTransport, listener: Arc<ReplyListener>) -> Self {
        CloseOnDrop { transport, listener, runtime: tokio::runtime::Handle::try_current().ok() }
    }
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        let Some(runtime) = &self.runtime else { return };
        let (transport, listener) = (self.transport.clone(), self.listener.clone());
        // a runtime that is shutting down drops the task unrun: the queue expires
        drop(runtime.spawn(async move {
            listener.close(&transport).await;
            transport.close().await;
        }));
    }
}

/// A request ready to go.
struct Outgoing {
    exchange: String,
    routing_key: String,
    message: OutgoingMessage,
    protocol: Protocol,
    service: Arc<str>,
    method: Arc<str>,
    time: CallTime,
}

impl Caller {
    /// Build the request's message, and its reply, registered on the reply queue; the call's
    /// timeout runs from here, so it bounds the set-up of the reply queue too (a broker out
    /// of reach would hold each call for the transport's own timeout, and the calls waiting
    /// for the same set-up in turn), each waiting call keeping its own.
    async fn prepare(&self, request: RpcRequest) -> Result<(Outgoing, RpcReply), RpcError> {
        let time = CallTime::start(request.timeout.unwrap_or(self.timeout));
        let protocol = request.protocol;
        let service: Arc<str> = request.service.as_str().into();
        let method: Arc<str> = request.method.as_str().into();
        let ufw_exchange;
        let (exchange, routing_key) = match protocol {
            Protocol::Nameko => (&self.exchange, format!("{service}.{method}")),
            Protocol::MicroFramework => {
                ufw_exchange = ufw_rpc_exchange();
                let builtin = ufw_wire::is_builtin_command(&method);
                (&ufw_exchange, ufw_routing_key(&service, &method, builtin))
            }
        };
        let record =
            CallRecord::new(service.clone(), method.clone(), time.started, self.metrics.clone());
        let body = match request.into_body(self.max_message_size) {
            Ok(body) => body,
            Err(error) => return Err(record.failed(error)),
        };
        let correlation_id: Arc<str> =
            uuid::Uuid::new_v4().hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()).into();
        let registered = tokio::time::timeout_at(
            time.deadline,
            self.register(protocol, exchange, &correlation_id),
        )
        .await;
        let (queue, receiver) = match registered {
            Ok(Ok(registered)) => registered,
            Ok(Err(error)) => return Err(record.failed(error.into())),
            Err(_) => return Err(record.failed(time.expired(&service, &method))),
        };
        let mut properties = json_properties();
        properties.headers = self.headers.clone();
        properties.delivery_mode = Some(self.delivery_mode);
        properties.reply_to = Some(queue.routing_key().to_owned());
        properties.correlation_id = Some(correlation_id.to_string());
        let reply = RpcReply::new(time, queue, correlation_id, receiver, record);
        let outgoing = Outgoing {
            exchange: exchange.name.clone(),
            routing_key,
            message: OutgoingMessage { body, properties },
            protocol,
            service,
            method,
            time,
        };
        Ok((outgoing, reply))
    }

    /// The live reply queue of `protocol`, with the call `correlation_id` waiting on it. A
    /// probe in the background may retire the queue between its fetch and the call's
    /// registration: the call then registers on the queue set up in its place (once: a queue
    /// just set up is not probed before a call on it times out).
    async fn register(
        &self,
        protocol: Protocol,
        exchange: &ExchangeSpec,
        correlation_id: &Arc<str>,
    ) -> Result<(Arc<ReplyQueue>, oneshot::Receiver<ReplyOutcome>), TransportError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let queue = self.listener.queue(&self.transport, protocol, exchange).await?;
            match queue.await_reply(correlation_id) {
                Ok(receiver) => return Ok((queue, receiver)),
                Err(TransportError::Closed { what: ClosedPart::Consumer, .. }) if attempts < 2 => {}
                Err(error) => return Err(error),
            }
        }
    }

    /// Publish the request (mandatory, confirmed).
    async fn publish(&self, outgoing: Outgoing) -> Result<(), RpcError> {
        let Outgoing { exchange, routing_key, message, protocol, service, method, .. } = outgoing;
        let options = PublishOptions { mandatory: true };
        match self.transport.publish(&exchange, &routing_key, message, options).await {
            Ok(()) => Ok(()),
            Err(TransportError::Unroutable { .. }) => Err(match protocol {
                Protocol::Nameko => RpcError::UnknownService(service.to_string()),
                Protocol::MicroFramework => RpcError::MethodNotFound(format!(
                    "no queue takes {routing_key}: no service {service} serves {method}"
                )),
            }),
            Err(error) => Err(error.into()),
        }
    }
}

#[async_trait]
impl RpcBackend for Caller {
    fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Publish the request; the reply is awaited through the result. An unroutable request
    /// fails at once: `UnknownService` (Nameko: one queue per service), `MethodNotFound`
    /// (micro-framework: one queue per target, so the service or the target is unknown).
    async fn send(&self, request: RpcRequest) -> Result<RpcReply, RpcError> {
        let (outgoing, reply) = self.prepare(request).await?;
        let (time, service, method) =
            (outgoing.time, outgoing.service.clone(), outgoing.method.clone());
        let published = match tokio::time::timeout_at(time.deadline, self.publish(outgoing)).await {
            Ok(published) => published,
            Err(_) => Err(time.expired(&service, &method)),
        };
        match published {
            Ok(()) => Ok(reply),
            Err(error) => Err(reply.failed(error)),
        }
    }

    /// Publish the request and wait for its reply, whichever of the reply and the publish
    /// confirm comes first: a reply proves the request was routed, so the call ends without
    /// waiting for the confirm. For a persistent request in a durable queue RabbitMQ confirms
    /// only once the message is on disk or acked, and the service acks only after its reply
    /// is confirmed: awaiting the confirm first would add those steps to every call.
    async fn call(&self, request: RpcRequest) -> Result<serde_json::Value, RpcError> {
        let (outgoing, reply) = self.prepare(request).await?;
        let publish = self.publish(outgoing);
        let (reply, record) = reply.split();
        tokio::pin!(publish, reply);
        let result = tokio::select! {
            published = &mut publish => match published {
                Ok(()) => reply.await,
                Err(error) => Err(error),
            },
            replied = &mut reply => replied,
        };
        record.end(&result);
        result
    }
}
