//! [`QueueListener`]: consume any named queue.

use std::sync::Arc;

use async_trait::async_trait;

use crate::amqp::naming::{dead_letter_queue, work_queue};
use crate::data::Message;
use crate::error::Result;
use crate::pipeline::consume::serve_route;
use crate::pipeline::settle::declare_retry_topology;
use crate::pipeline::Entrypoint;
use crate::pipeline::RouteHandle;
use crate::transport::{BindingSpec, Headers};

/// Handles the messages of a named queue, declared durable (or only checked, with
/// [`QueueListener::passive`]) and optionally bound to exchanges.
///
/// ```
/// use micro_framework::prelude::*;
/// use micro_framework::amqp::entrypoints::QueueListener;
/// use serde_json::Value;
///
/// fn import(Payload(row): Payload<Value>) {}
///
/// let route = Route::new(import)
///     .entrypoint(QueueListener::new("imports").bind("uploads", "csv.#"));
/// ```
#[derive(Clone, Debug)]
pub struct QueueListener {
    queue: String,
    passive: bool,
    bindings: Vec<(String, String)>,
}

impl QueueListener {
    /// Consume `queue`, declaring it durable if it does not exist.
    pub fn new(queue: impl Into<String>) -> Self {
        QueueListener { queue: queue.into(), passive: false, bindings: Vec::new() }
    }

    /// Do not declare the queue: it must exist (any arguments); start-up fails otherwise.
    pub fn passive(mut self) -> Self {
        self.passive = true;
        self
    }

    /// Bind the queue to an existing `exchange` with `routing_key` (may be repeated).
    pub fn bind(mut self, exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        self.bindings.push((exchange.into(), routing_key.into()));
        self
    }
}

#[async_trait]
impl Entrypoint for QueueListener {
    fn describe(&self) -> String {
        format!("QueueListener({})", self.queue)
    }

    fn queue(&self) -> Option<String> {
        Some(self.queue.clone())
    }

    async fn setup(&mut self, route: &RouteHandle) -> Result<()> {
        let transport = route.transport();
        if self.passive {
            transport.queue_info(&self.queue).await?;
        } else {
            transport.declare_queue(&work_queue(route.config(), self.queue.clone())).await?;
        }
        for (exchange, routing_key) in &self.bindings {
            let binding = BindingSpec {
                queue: self.queue.clone(),
                exchange: exchange.clone(),
                routing_key: routing_key.clone(),
                arguments: Headers::new(),
            };
            transport.bind_queue(&binding).await?;
        }
        transport.declare_queue(&dead_letter_queue(route.config(), &self.queue)).await?;
        declare_retry_topology(route, &self.queue).await?;
        Ok(())
    }

    async fn run(self: Box<Self>, route: RouteHandle) -> Result<()> {
        serve_route(route, self.queue, Arc::new(|_: &Message| true)).await
    }
}
