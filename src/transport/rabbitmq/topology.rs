//! The exchanges, queues and bindings declared through the transport, replayed in order
//! after a reconnect.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use std::collections::HashSet;

use lapin::Channel;
use tokio::time::Instant;

use super::convert::{short, to_field_table};
use super::lease::{may_vanish, Usage};
use crate::transport::{BindingSpec, ExchangeKind, ExchangeSpec, QueueSpec, TransportError};

/// One recorded declaration.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Declaration {
    /// `exchange.declare`.
    Exchange(ExchangeSpec),
    /// `queue.declare`.
    Queue(QueueSpec),
    /// `queue.bind`.
    Binding(BindingSpec),
}

/// One declaration of the record, with the stamp of its last recording (so the replay can
/// tell a declaration it read from one the application made again meanwhile).
#[derive(Debug)]
struct Entry {
    declaration: Declaration,
    stamp: u64,
}

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

/// The ordered record of declarations.
#[derive(Debug, Default)]
pub(crate) struct Topology {
    entries: Vec<Entry>,
    stamps: u64,
    usage: Usage,
}

impl Topology {
    /// Record a declaration; a redeclaration of the same entity replaces the old one in place.
    /// Returns the declaration it replaced, if any (to restore it if the broker refuses).
    /// Queues whose `x-expires` lease ran out leave the record first: the broker deleted them.
    pub(crate) fn record(&mut self, declaration: Declaration) -> Option<Declaration> {
        self.prune(Instant::now());
        if let Declaration::Queue(spec) = &declaration {
            self.usage.declared(spec);
        }
        self.stamps += 1;
        let entry = Entry { declaration, stamp: self.stamps };
        let position =
            self.entries.iter().position(|e| same_entity(&e.declaration, &entry.declaration));
        match position {
            Some(i) => Some(std::mem::replace(&mut self.entries[i], entry).declaration),
            None => {
                self.entries.push(entry);
                None
            }
        }
    }

    /// Undo [`Topology::record`] after the broker refused the declaration.
    pub(crate) fn restore(&mut self, declaration: &Declaration, previous: Option<Declaration>) {
        let Some(i) = self.entries.iter().position(|e| e.declaration == *declaration) else {
            return;
        };
        match previous {
            Some(previous) => {
                if let Declaration::Queue(spec) = &previous {
                    self.usage.declared(spec);
                }
                self.entries[i].declaration = previous;
            }
            None => {
                if let Declaration::Queue(spec) = declaration {
                    self.usage.forget(&spec.name);
                }
                self.entries.remove(i);
            }
        }
    }

    /// Forget one declaration (one the broker rejects on replay).
    pub(crate) fn forget(&mut self, declaration: &Declaration) {
        if let Declaration::Queue(spec) = declaration {
            self.usage.forget(&spec.name);
        }
        self.entries.retain(|e| e.declaration != *declaration);
    }

    /// Forget a deleted queue and its bindings.
    pub(crate) fn remove_queue(&mut self, queue: &str) {
        self.usage.forget(queue);
        self.entries.retain(|e| match &e.declaration {
            Declaration::Queue(q) => q.name != queue,
            Declaration::Binding(b) => b.queue != queue,
            Declaration::Exchange(_) => true,
        });
    }

    /// Forget a queue the replay found gone, and its bindings, unless the application declared
    /// it again since the replay read it (its stamp changed).
    pub(crate) fn drop_queue(&mut self, queue: &str, stamp: u64) {
        let same = self.entries.iter().any(|e| {
            e.stamp == stamp && matches!(&e.declaration, Declaration::Queue(q) if q.name == queue)
        });
        if same {
            self.remove_queue(queue);
        }
    }

    /// Forget a deleted exchange and the bindings to it.
    pub(crate) fn remove_exchange(&mut self, exchange: &str) {
        self.entries.retain(|e| match &e.declaration {
            Declaration::Exchange(x) => x.name != exchange,
            Declaration::Binding(b) => b.exchange != exchange,
            Declaration::Queue(_) => true,
        });
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
        let declared = self
            .entries
            .iter()
            .any(|e| matches!(&e.declaration, Declaration::Queue(q) if q.name == queue));
        if !declared {
            return Vec::new();
        }
        let ours = |d: &Declaration| match d {
            Declaration::Queue(q) => q.name == queue,
            Declaration::Binding(b) => b.queue == queue,
            Declaration::Exchange(_) => false,
        };
        self.entries.iter().map(|e| &e.declaration).filter(|d| ours(d)).cloned().collect()
    }

    /// The recorded declarations of the exchanges `queue` is bound to, in order.
    pub(crate) fn exchanges_bound_to(&self, queue: &str) -> Vec<Declaration> {
        let bound = |exchange: &str| {
            self.entries.iter().any(|e| {
                matches!(&e.declaration, Declaration::Binding(b) if b.queue == queue && b.exchange == exchange)
            })
        };
        self.entries
            .iter()
            .map(|e| &e.declaration)
            .filter(|d| matches!(d, Declaration::Exchange(x) if bound(&x.name)))
            .cloned()
            .collect()
    }

    /// The declarations to replay, in declaration order, after forgetting the queues whose
    /// `x-expires` lease ran out. A queue the broker may have deleted otherwise (a shared
    /// auto-delete queue no consumer of this transport holds) is to be checked first.
    pub(crate) fn replay(&mut self, now: Instant) -> Vec<Replay> {
        self.prune(now);
        let check = |d: &Declaration| match d {
            Declaration::Queue(q) => may_vanish(q) && !self.usage.consumed(&q.name),
            Declaration::Exchange(_) | Declaration::Binding(_) => false,
        };
        let replay = |e: &Entry| Replay {
            declaration: e.declaration.clone(),
            stamp: e.stamp,
            check_first: check(&e.declaration),
        };
        self.entries.iter().map(replay).collect()
    }

    /// Forget the queues (and their bindings) whose lease ran out at `now`.
    fn prune(&mut self, now: Instant) {
        if self.usage.no_leases() {
            return;
        }
        let expired: HashSet<String> = self.usage.expired(now).into_iter().collect();
        if expired.is_empty() {
            return;
        }
        for queue in &expired {
            self.usage.forget(queue);
        }
        self.entries.retain(|e| match &e.declaration {
            Declaration::Queue(q) => !expired.contains(&q.name),
            Declaration::Binding(b) => !expired.contains(&b.queue),
            Declaration::Exchange(_) => true,
        });
    }
}

fn same_entity(a: &Declaration, b: &Declaration) -> bool {
    match (a, b) {
        (Declaration::Exchange(x), Declaration::Exchange(y)) => x.name == y.name,
        (Declaration::Queue(x), Declaration::Queue(y)) => x.name == y.name,
        (Declaration::Binding(x), Declaration::Binding(y)) => x == y,
        _ => false,
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

    fn binding(queue: &str, exchange: &str) -> Declaration {
        Declaration::Binding(BindingSpec {
            queue: queue.into(),
            exchange: exchange.into(),
            routing_key: "rk".into(),
            arguments: Default::default(),
        })
    }

    fn snapshot(topology: &mut Topology) -> Vec<Declaration> {
        topology.replay(Instant::now()).into_iter().map(|r| r.declaration).collect()
    }

    #[test]
    fn records_in_order_and_forgets_deleted_entities() {
        let mut topology = Topology::default();
        topology.record(Declaration::Exchange(ExchangeSpec::topic("ex")));
        topology.record(Declaration::Queue(QueueSpec::durable("q")));
        topology.record(binding("q", "ex"));
        assert!(topology.record(binding("q", "ex")).is_some());
        assert_eq!(snapshot(&mut topology).len(), 3);
        topology.remove_queue("q");
        assert_eq!(snapshot(&mut topology), vec![Declaration::Exchange(ExchangeSpec::topic("ex"))]);
        topology.record(binding("q2", "ex"));
        topology.remove_exchange("ex");
        assert!(snapshot(&mut topology).is_empty());
        topology.record(binding("q3", "ex3"));
        topology.forget(&binding("q3", "ex3"));
        assert!(snapshot(&mut topology).is_empty());
    }

    #[test]
    fn restore_undoes_a_refused_declaration() {
        let mut topology = Topology::default();
        let original = Declaration::Queue(QueueSpec::durable("q"));
        topology.record(original.clone());
        let other = Declaration::Queue(QueueSpec { durable: false, ..QueueSpec::durable("q") });
        let previous = topology.record(other.clone());
        topology.restore(&other, previous);
        assert_eq!(snapshot(&mut topology), vec![original.clone()]);
        let fresh = Declaration::Queue(QueueSpec::durable("new"));
        let previous = topology.record(fresh.clone());
        topology.restore(&fresh, previous);
        assert_eq!(snapshot(&mut topology), vec![original]);
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

    #[test]
    fn a_queue_comes_with_its_bindings() {
        let mut topology = Topology::default();
        let exclusive =
            Declaration::Queue(QueueSpec { exclusive: true, ..QueueSpec::durable("x") });
        topology.record(exclusive.clone());
        topology.record(queue("other", false, None));
        topology.record(binding("x", "ex"));
        topology.record(binding("other", "ex"));
        assert_eq!(topology.queue_with_bindings("x"), vec![exclusive, binding("x", "ex")]);
        let other = vec![queue("other", false, None), binding("other", "ex")];
        assert_eq!(topology.queue_with_bindings("other"), other);
        topology.remove_queue("other");
        assert!(topology.queue_with_bindings("other").is_empty());
        assert!(topology.queue_with_bindings("never").is_empty());
    }

    #[test]
    fn the_exchanges_a_queue_is_bound_to_are_those_recorded() {
        let mut topology = Topology::default();
        let exchange = |name: &str| Declaration::Exchange(ExchangeSpec::topic(name));
        topology.record(exchange("ex"));
        topology.record(exchange("unrelated"));
        topology.record(queue("q", false, None));
        topology.record(binding("q", "ex"));
        topology.record(binding("q", "not-declared-here"));
        assert_eq!(topology.exchanges_bound_to("q"), vec![exchange("ex")]);
        topology.remove_exchange("ex");
        assert!(topology.exchanges_bound_to("q").is_empty());
    }
}
