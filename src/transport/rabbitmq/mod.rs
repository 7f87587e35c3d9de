//! The RabbitMQ transport, on lapin.
//!
//! One connection, supervised: when it drops, it is reopened with exponential backoff, the
//! exchanges, queues and bindings the broker accepted through the transport are declared
//! again in order, and every consumer that was not cancelled resumes on a fresh channel,
//! feeding the same [`Consumer`]. Queues the broker deletes by itself are not brought back: an `x-expires`
//! queue leaves the record once its lease ran out without a consumer of this transport, and
//! a shared auto-delete queue no consumer of this transport holds is only checked (and
//! forgotten when gone). An exclusive queue the old connection still holds at the broker is
//! declared again once the broker drops that connection (see `replay`). Publishes use a confirm channel and are retried across reconnects
//! (at-least-once); deliveries received before a drop can no longer be settled
//! ([`TransportError::Closed`] of the [channel](crate::transport::ClosedPart::Channel)): the
//! broker has requeued them, and the redelivery of each to a consumer of this transport says
//! so ([`Acker::lost_in_flight`](crate::transport::Acker::lost_in_flight)).
//!
//! A `basic.get` runs on a channel that holds no unsettled delivery of an earlier get: the
//! broker answers a get it refuses by closing its channel, which would take those back (see
//! `gets`).

mod acker;
mod channels;
mod compat_runtime;
mod connection;
mod consumer;
mod consumer_links;
mod convert;
mod error;
#[cfg(test)]
mod fuzz;
mod gets;
mod lease;
mod losses;
mod mandatory;
mod nodes;
mod options;
mod publisher;
mod replay;
mod returns;
mod topology;
mod uri;

#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{
    ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;

use self::channels::ChannelSlot;
use self::connection::{supervise, Shared};
use self::convert::short;
use self::gets::GetChannels;
use self::mandatory::MandatoryChannel;
pub use self::options::{RabbitMqOptions, TlsOptions};
use self::topology::{apply, prepare, Declaration};
use crate::transport::{
    BindingSpec, ConsumeOptions, Consumer, Delivery, ExchangeSpec, OutgoingMessage, PublishOptions,
    QueueInfo, QueueSpec, Transport, TransportError,
};

/// The queue the probe of [`Transport::publishing_blocked_now`] is published to: of the prefix
/// `amq.`, which RabbitMQ keeps for queues it names itself, so that no queue takes it.
const BLOCK_PROBE_QUEUE: &str = "amq.mf-blocked-probe";
/// How often that probe looks whether the broker blocked the connection.
const BLOCK_PROBE_POLL: Duration = Duration::from_millis(10);

/// A [`Transport`] over a RabbitMQ connection that reconnects by itself.
pub struct RabbitMqTransport {
    shared: Arc<Shared>,
    publisher: ChannelSlot,
    mandatory: MandatoryChannel,
    declarations: ChannelSlot,
    gets: GetChannels,
}

impl RabbitMqTransport {
    /// Connect to the broker. Fails (password masked) with [`TransportError::Unreachable`]
    /// when the broker cannot be reached, [`TransportError::Authentication`] when it refuses
    /// the credentials, [`TransportError::Tls`] when TLS fails (certificate refused, files
    /// unreadable) and [`TransportError::InvalidUri`]; reconnection is automatic after that.
    ///
    /// With a list of URIs (the nodes of a cluster), the list is shuffled once per transport
    /// ([`RabbitMqOptions::node_order_seed`]) and each node is tried in that order; after a
    /// connection loss, the nodes are tried again in order starting after the lost one, with
    /// the backoff between passes over the whole list. The error when none accepts is the
    /// first permanent one, else every node's.
    pub async fn connect(options: RabbitMqOptions) -> Result<Self, TransportError> {
        let uris = uri::parse_uris(&options.uri, options.heartbeat)?;
        #[cfg(not(feature = "tls"))]
        for uri in &uris {
            uri::refuse_tls(uri)?;
        }
        let tls = options.tls.load()?;
        let seed = options.node_order_seed.unwrap_or_else(nodes::default_seed);
        let shared = Shared::new(options, nodes::Nodes::new(uris, seed), tls);
        let first = shared.open_first().await?;
        let shared = Arc::new(shared.with_link(first.clone()));
        tokio::spawn(supervise(shared.clone(), first));
        Ok(RabbitMqTransport {
            shared,
            publisher: ChannelSlot::new(true),
            mandatory: MandatoryChannel::new(),
            declarations: ChannelSlot::new(false),
            gets: GetChannels::default(),
        })
    }

    /// How many connections were opened so far (1, then +1 per reconnect).
    #[cfg(test)]
    pub(crate) fn connection_generation(&self) -> u64 {
        self.shared.generation()
    }

    /// Declare on the broker, then record the declaration for the replay after a reconnect: a
    /// declaration the broker refuses is never replayed (recorded first, a refused exclusive
    /// queue was replayed by a reconnect during its refusal, as if this transport held it).
    async fn declare(
        &self,
        declaration: Declaration,
    ) -> Result<Option<lapin::Queue>, TransportError> {
        loop {
            let (declared, link) = self.declare_on_a_link(&declaration).await?;
            self.shared.topology().record(declaration.clone());
            // The supervisor marks a link dead before the next link's replay reads the record:
            // a link still alive once recorded means any later replay has the declaration.
            // Otherwise that replay may have missed it (an exclusive queue gone with the link).
            if link.alive() {
                return Ok(declared);
            }
        }
    }

    /// Declare on the broker, unrecorded, and say on which link.
    async fn declare_on_a_link(
        &self,
        declaration: &Declaration,
    ) -> Result<(Option<lapin::Queue>, Arc<connection::Link>), TransportError> {
        let (prepared, arguments) = prepare(declaration)?;
        self.declarations
            .run(&self.shared, |held| {
                let (prepared, arguments) = (prepared.clone(), arguments.clone());
                async move {
                    let declared = apply(&held.channel, prepared, arguments).await?;
                    Ok((declared, held.link))
                }
            })
            .await
    }
}

impl fmt::Debug for RabbitMqTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMqTransport")
            .field("uri", &self.shared.nodes.masked())
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl Drop for RabbitMqTransport {
    fn drop(&mut self) {
        // Stops the supervisor and ends the consumers; the connection closes with its last handle.
        if let Some(link) = self.shared.close() {
            link.mark_dead();
        }
    }
}

fn queue_info(queue: &lapin::Queue) -> QueueInfo {
    QueueInfo { message_count: queue.message_count(), consumer_count: queue.consumer_count() }
}

#[async_trait]
impl Transport for RabbitMqTransport {
    async fn declare_exchange(&self, spec: &ExchangeSpec) -> Result<(), TransportError> {
        self.declare(Declaration::Exchange(spec.clone())).await.map(|_| ())
    }

    async fn declare_queue(&self, spec: &QueueSpec) -> Result<QueueInfo, TransportError> {
        let queue = self.declare(Declaration::Queue(spec.clone())).await?;
        Ok(queue.as_ref().map(queue_info).unwrap_or_default())
    }

    async fn declare_queue_for_connection(
        &self,
        spec: &QueueSpec,
    ) -> Result<QueueInfo, TransportError> {
        let (declared, link) = self.declare_on_a_link(&Declaration::Queue(spec.clone())).await?;
        // declared on a connection already lost: the queue went with it
        if !link.alive() {
            return Err(TransportError::ConnectionLost(format!(
                "the connection was lost as {} was declared",
                spec.name
            )));
        }
        Ok(declared.as_ref().map(queue_info).unwrap_or_default())
    }

    async fn queue_info(&self, queue: &str) -> Result<QueueInfo, TransportError> {
        let name = short(queue, "queue name")?;
        let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let declared = self
            .declarations
            .run(&self.shared, |held| {
                let name = name.clone();
                async move { held.channel.queue_declare(name, options, FieldTable::default()).await }
            })
            .await?;
        // A passive declare renews the queue's `x-expires` lease at the broker.
        self.shared.topology().renew(queue);
        Ok(queue_info(&declared))
    }

    async fn bind_queue(&self, binding: &BindingSpec) -> Result<(), TransportError> {
        self.declare(Declaration::Binding(binding.clone())).await.map(|_| ())
    }

    async fn declare_again(&self, queue: &str) -> Result<bool, TransportError> {
        let declarations = self.shared.topology().again(queue);
        let recorded = !declarations.is_empty();
        for declaration in declarations {
            self.declare(declaration).await?;
        }
        Ok(recorded)
    }

    async fn delete_queue(&self, queue: &str) -> Result<u32, TransportError> {
        let name = short(queue, "queue name")?;
        self.shared.topology().remove_queue(queue);
        self.declarations
            .run(&self.shared, |held| {
                let name = name.clone();
                async move { held.channel.queue_delete(name, QueueDeleteOptions::default()).await }
            })
            .await
    }

    async fn delete_exchange(&self, exchange: &str) -> Result<(), TransportError> {
        let name = short(exchange, "exchange name")?;
        self.shared.topology().remove_exchange(exchange);
        self.declarations
            .run(&self.shared, |held| {
                let name = name.clone();
                async move { held.channel.exchange_delete(name, ExchangeDeleteOptions::default()).await }
            })
            .await
    }

    async fn purge_queue(&self, queue: &str) -> Result<u32, TransportError> {
        let name = short(queue, "queue name")?;
        self.declarations
            .run(&self.shared, |held| {
                let name = name.clone();
                async move { held.channel.queue_purge(name, QueuePurgeOptions::default()).await }
            })
            .await
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: OutgoingMessage,
        options: PublishOptions,
    ) -> Result<(), TransportError> {
        let (slot, mandatory) = (&self.publisher, &self.mandatory);
        publisher::publish(&self.shared, slot, mandatory, exchange, routing_key, &message, options)
            .await
    }

    async fn consume(
        &self,
        queue: &str,
        options: ConsumeOptions,
    ) -> Result<Consumer, TransportError> {
        let tag = match options.consumer_tag.as_str() {
            "" => format!("ctag-{}", uuid::Uuid::new_v4().simple()),
            tag => tag.to_owned(),
        };
        consumer::start(self.shared.clone(), queue, &tag, &options).await
    }

    async fn get(&self, queue: &str) -> Result<Option<Delivery>, TransportError> {
        let name = short(queue, "queue name")?;
        let got = self.gets.get(&self.shared, name).await?;
        // `basic.get` renews the queue's `x-expires` lease at the broker.
        self.shared.topology().renew(queue);
        Ok(got)
    }

    fn is_connected(&self) -> bool {
        self.shared.current().is_some()
    }

    fn consumers_subscribed(&self) -> bool {
        let current = self.shared.current();
        current.is_some_and(|link| self.shared.consumer_links.all_on(link.generation))
    }

    fn channel_limit(&self) -> Option<usize> {
        let link = self.shared.current()?;
        Some(usize::from(link.connection.configuration().channel_max()))
    }

    fn reconnects(&self) -> u64 {
        self.shared.reconnects()
    }

    fn connected_since(&self) -> Option<std::time::SystemTime> {
        self.shared.connected_since()
    }

    fn broker_node(&self) -> Option<String> {
        self.shared.node()
    }

    fn publishing_blocked(&self) -> bool {
        self.shared.current().is_some_and(|link| link.connection.status().blocked())
    }

    async fn publishing_blocked_now(&self, within: Duration) -> bool {
        if self.publishing_blocked() {
            return true;
        }
        let probe = self.publish(
            "",
            BLOCK_PROBE_QUEUE,
            OutgoingMessage::default(),
            PublishOptions::default(),
        );
        let blocked = async {
            while !self.publishing_blocked() {
                tokio::time::sleep(BLOCK_PROBE_POLL).await;
            }
        };
        tokio::select! {
            _ = probe => {}
            _ = blocked => {}
            _ = tokio::time::sleep(within) => {}
        }
        self.publishing_blocked()
    }

    fn last_broker_node(&self) -> Option<String> {
        Some(self.shared.last_node())
    }

    async fn close(&self) {
        if let Some(link) = self.shared.close() {
            link.close(self.shared.options.connect_timeout).await;
        }
    }
}
