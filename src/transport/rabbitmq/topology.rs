//! The exchanges, queues and bindings declared through the transport, replayed in order
//! after a reconnect.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};

use lapin::Channel;
use tokio::time::Instant;

use super::convert::{short, to_field_table};
use super::lease::{may_vanish, Usage};
pub(crate) use crate::transport::declarations::Declaration;
use crate::transport::declarations::Declarations;
use crate::transport::{ExchangeKind, TransportError};

/// One declaration to replay.
#[derive(Debug)]
pub(crate) struct Replay {
    /// The declaration.
    pub(crate) declaration: Declaration,
    /// Its stamp in the record (see [`Topology::drop_queue`]).
    pub(crate) stamp: u64,
    /// The broker may have deleted this queue by itself: check it exists (a passive declare)
    /// rather than create it again.
    pub(crate) check_first: bool,
}

/// The connection's declarations, and what tells which of its queues the broker may have
/// deleted by itself.
#[derive(Debug, Default)]
pub(crate) struct Topology {
    declarations: Declarations,
    usage: Usage,
}

impl Topology {
    /// Record a declaration the broker accepted; a redeclaration of the same entity replaces
    /// the old one in place. Queues whose `x-expires` lease ran out leave the record first:
    /// the broker deleted them.
    pub(crate) fn record(&mut self, declaration: Declaration) {
        self.prune(Instant::now());
        if let Some(spec) = declaration.queue() {
            self.usage.declared(spec);
        }
        self.declarations.record(declaration);
    }

    /// Forget one declaration (one the broker rejects on replay).
    pub(crate) fn forget(&mut self, declaration: &Declaration) {
        if let Some(spec) = declaration.queue() {
            self.usage.forget(&spec.name);
        }
        self.declarations.forget(declaration);
    }

    /// Forget a deleted queue and its bindings.
    pub(crate) fn remove_queue(&mut self, queue: &str) {
        self.usage.forget(queue);
        self.declarations.remove_queue(queue);
    }

    /// Forget a queue the replay found gone, and its bindings, unless the application declared
    /// it again since the replay read it (its stamp changed).
    pub(crate) fn drop_queue(&mut self, queue: &str, stamp: u64) {
        if self.declarations.has_queue_stamped(queue, stamp) {
            self.remove_queue(queue);
        }
    }

    /// Forget a deleted exchange and the bindings to it.
    pub(crate) fn remove_exchange(&mut self, exchange: &str) {
        self.declarations.remove_exchange(exchange);
    }

    /// The queue was used in a way that renews its `x-expires` lease.
    pub(crate) fn renew(&mut self, queue: &str) {
        self.usage.renew(queue);
    }

    /// A consumer of this transport started on the queue.
    pub(crate) fn consumer_started(&mut self, queue: &str) {
        self.usage.consumer_started(queue);
    }

    /// A consumer of this transport on the queue ended.
    pub(crate) fn consumer_ended(&mut self, queue: &str) {
        self.usage.consumer_ended(queue);
    }

    /// The recorded declaration of `queue` and its bindings, in order; empty when the queue
    /// is no longer recorded.
    pub(crate) fn queue_with_bindings(&self, queue: &str) -> Vec<Declaration> {
        self.declarations.queue_with_bindings(queue)
    }

    /// What declares `queue` again (see [`Declarations::again`]).
    pub(crate) fn again(&self, queue: &str) -> Vec<Declaration> {
        self.declarations.again(queue)
    }

    /// The declarations to replay, in declaration order, after forgetting the queues whose
    /// `x-expires` lease ran out. A queue the broker may have deleted otherwise (a shared
    /// auto-delete queue no consumer of this transport holds) is to be checked first.
    pub(crate) fn replay(&mut self, now: Instant) -> Vec<Replay> {
        self.prune(now);
        let check = |d: &Declaration| {
            d.queue().is_some_and(|q| may_vanish(q) && !self.usage.consumed(&q.name))
        };
        let replay = |(declaration, stamp): (&Declaration, u64)| Replay {
            declaration: declaration.clone(),
            stamp,
            check_first: check(declaration),
        };
        self.declarations.stamped().map(replay).collect()
    }

    /// Forget the queues (and their bindings) whose lease ran out at `now`.
    fn prune(&mut self, now: Instant) {
        if self.usage.no_leases() {
            return;
        }
        for queue in self.usage.expired(now) {
            self.remove_queue(&queue);
        }
    }
}

fn lapin_kind(kind: &ExchangeKind) -> lapin::ExchangeKind {
    match kind {
        ExchangeKind::Direct => lapin::ExchangeKind::Direct,
        ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
        ExchangeKind::Topic => lapin::ExchangeKind::Topic,
        ExchangeKind::Headers => lapin::ExchangeKind::Headers,
        ExchangeKind::Custom(name) => lapin::ExchangeKind::Custom(name.clone()),
    }
}

/// A declaration, ready to send: names and arguments validated up front.
#[derive(Clone)]
pub(crate) enum Prepared {
    /// `exchange.declare`.
    Exchange(lapin::types::ShortString, lapin::ExchangeKind, ExchangeDeclareOptions),
    /// `queue.declare`.
    Queue(lapin::types::ShortString, QueueDeclareOptions),
    /// `queue.bind`.
    Binding(lapin::types::ShortString, lapin::types::ShortString, lapin::types::ShortString),
}

impl Prepared {
    /// The same declaration, passive for a queue: it only checks the queue exists (and fails
    /// with `404`, closing the channel, when it does not).
    pub(crate) fn passive(self) -> Prepared {
        match self {
            Prepared::Queue(name, options) => {
                Prepared::Queue(name, QueueDeclareOptions { passive: true, ..options })
            }
            other => other,
        }
    }
}

/// Validate a declaration and build what lapin needs.
pub(crate) fn prepare(
    declaration: &Declaration,
) -> Result<(Prepared, lapin::types::FieldTable), TransportError> {
    Ok(match declaration {
        Declaration::Exchange(spec) => {
            let options = ExchangeDeclareOptions {
                durable: spec.durable,
                auto_delete: spec.auto_delete,
                ..ExchangeDeclareOptions::default()
            };
            let name = short(&spec.name, "exchange name")?;
            (
                Prepared::Exchange(name, lapin_kind(&spec.kind), options),
                to_field_table(&spec.arguments)?,
            )
        }
        Declaration::Queue(spec) => {
            let options = QueueDeclareOptions {
                durable: spec.durable,
                exclusive: spec.exclusive,
                auto_delete: spec.auto_delete,
                ..QueueDeclareOptions::default()
            };
            (
                Prepared::Queue(short(&spec.name, "queue name")?, options),
                to_field_table(&spec.arguments)?,
            )
        }
        Declaration::Binding(spec) => (
            Prepared::Binding(
                short(&spec.queue, "queue name")?,
                short(&spec.exchange, "exchange name")?,
                short(&spec.routing_key, "routing key")?,
            ),
            to_field_table(&spec.arguments)?,
        ),
    })
}

/// Send a prepared declaration; returns the queue's counters for a queue declaration.
pub(crate) async fn apply(
    channel: &Channel,
    prepared: Prepared,
    arguments: lapin::types::FieldTable,
) -> lapin::Result<Option<lapin::Queue>> {
    match prepared {
        Prepared::Exchange(name, kind, options) => {
            channel.exchange_declare(name, kind, options, arguments).await.map(|()| None)
        }
        Prepared::Queue(name, options) => {
            channel.queue_declare(name, options, arguments).await.map(Some)
        }
        Prepared::Binding(queue, exchange, key) => channel
            .queue_bind(queue, exchange, key, QueueBindOptions::default(), arguments)
            .await
            .map(|()| None),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::transport::declarations::tests::binding;
    use crate::transport::QueueSpec;

    fn snapshot(topology: &mut Topology) -> Vec<Declaration> {
        topology.replay(Instant::now()).into_iter().map(|r| r.declaration).collect()
    }

    fn queue(name: &str, auto_delete: bool, expires: Option<i64>) -> Declaration {
        let mut spec = QueueSpec { auto_delete, ..QueueSpec::durable(name) };
        if let Some(ms) = expires {
            spec.arguments.insert("x-expires".into(), crate::transport::HeaderValue::Int(ms));
        }
        Declaration::Queue(spec)
    }

    #[tokio::test(start_paused = true)]
    async fn queues_the_broker_deletes_by_itself_leave_the_record() {
        let mut topology = Topology::default();
        topology.record(queue("expiring", false, Some(1000)));
        topology.record(binding("expiring", "ex"));
        topology.record(queue("consumed", false, Some(1000)));
        topology.consumer_started("consumed");
        topology.record(queue("auto", true, None));
        topology.record(queue("plain", false, None));
        tokio::time::advance(Duration::from_millis(1000)).await;
        let replay = topology.replay(Instant::now());
        let checked: Vec<_> =
            replay.iter().map(|r| (r.declaration.clone(), r.check_first)).collect();
        assert_eq!(
            checked,
            vec![
                (queue("consumed", false, Some(1000)), false),
                (queue("auto", true, None), true),
                (queue("plain", false, None), false),
            ]
        );
        // An application that declares the queue again while the replay checks it keeps it.
        let stamp = replay[1].stamp;
        topology.record(queue("auto", true, None));
        topology.drop_queue("auto", stamp);
        assert_eq!(snapshot(&mut topology).len(), 3);
        let stamp = topology.replay(Instant::now())[1].stamp;
        topology.drop_queue("auto", stamp);
        assert_eq!(snapshot(&mut topology).len(), 2);
        // The consumer's end starts the lease again; a new declaration prunes the expired one.
        topology.consumer_ended("consumed");
        tokio::time::advance(Duration::from_millis(1000)).await;
        topology.record(queue("other", false, None));
        assert_eq!(
            snapshot(&mut topology),
            vec![queue("plain", false, None), queue("other", false, None)]
        );
    }
}
