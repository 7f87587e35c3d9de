//! A caller that sends hand-made requests as the Python micro-framework's client does
//! (`PROTOCOL=micro_framework`), to test what a Rust service answers to any body.

use std::time::Duration;

use bytes::Bytes;
use micro_framework::transport::{
    BindingSpec, Headers, OutgoingMessage, PublishOptions, QueueSpec, SharedTransport,
};
use micro_framework::{Message, Properties};
use serde_json::Value;

/// Sends hand-made requests to one service, and reads the replies on a queue of its own.
pub struct UfwCaller {
    transport: SharedTransport,
    service: String,
    queue: String,
}

impl UfwCaller {
    pub async fn new(transport: &SharedTransport, service: &str) -> UfwCaller {
        let queue = format!("ufw-reply-{service}-{}", uuid::Uuid::new_v4());
        transport.declare_queue(&QueueSpec::durable(&queue)).await.unwrap();
        let binding = BindingSpec {
            queue: queue.clone(),
            exchange: "ufw-rpc".into(),
            routing_key: queue.clone(),
            arguments: Headers::new(),
        };
        transport.bind_queue(&binding).await.unwrap();
        UfwCaller { transport: transport.clone(), service: service.to_owned(), queue }
    }

    /// Publish `body` to `{service}.{target}` and return the reply frame (decoded twice, as
    /// the Python original's client reads it).
    pub async fn request(&self, target: &str, body: Bytes) -> Value {
        self.request_with(target, body, |_| {}).await
    }

    /// [`UfwCaller::request`] with the request's properties changed by `change` first.
    pub async fn request_with(
        &self,
        target: &str,
        body: Bytes,
        change: impl FnOnce(&mut Properties),
    ) -> Value {
        self.send_with(target, body, change).await;
        self.reply().await
    }

    /// The next reply frame (decoded twice, as the Python original's client reads it).
    pub async fn reply(&self) -> Value {
        for _ in 0..1000 {
            if let Some(delivery) = self.transport.get(&self.queue).await.unwrap() {
                delivery.acker.ack().await.unwrap();
                assert_eq!(delivery.properties.correlation_id.as_deref(), Some("raw-1"));
                let encoded: Value = serde_json::from_slice(&delivery.body).unwrap();
                let Value::String(frame) = encoded else { panic!("not encoded twice: {encoded}") };
                return serde_json::from_str(&frame).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no reply to the raw request");
    }

    /// Publish `body` to `{service}.{target}`, with the request's properties (a correlation
    /// id, this caller's reply queue) changed by `change` first; wait for no reply.
    pub async fn send_with(&self, target: &str, body: Bytes, change: impl FnOnce(&mut Properties)) {
        let mut message = Message::json(&Value::Null).unwrap();
        message.properties.correlation_id = Some("raw-1".into());
        message.properties.reply_to = Some(self.queue.clone());
        change(&mut message.properties);
        let outgoing = OutgoingMessage { body, properties: message.properties };
        let routing_key = format!("{}.{target}", self.service);
        let options = PublishOptions { mandatory: true };
        self.transport.publish("ufw-rpc", &routing_key, outgoing, options).await.unwrap();
    }

    /// The queue the replies come to.
    pub fn reply_queue(&self) -> &str {
        &self.queue
    }

    /// Deletes the reply queue.
    pub async fn close(&self) {
        self.transport.delete_queue(&self.queue).await.unwrap();
    }
}
