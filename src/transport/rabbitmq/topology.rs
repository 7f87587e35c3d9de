//! The exchanges, queues and bindings declared through the transport, replayed in order
//! after a reconnect.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::Channel;

use super::convert::{short, to_field_table};
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

/// The ordered record of declarations.
#[derive(Debug, Default)]
pub(crate) struct Topology {
    declarations: Vec<Declaration>,
}

impl Topology {
    /// Record a declaration; a redeclaration of the same entity replaces the old one in place.
    /// Returns the declaration it replaced, if any (to restore it if the broker refuses).
    pub(crate) fn record(&mut self, declaration: Declaration) -> Option<Declaration> {
        let position = self.declarations.iter().position(|d| same_entity(d, &declaration));
        match position {
            Some(i) => Some(std::mem::replace(&mut self.declarations[i], declaration)),
            None => {
                self.declarations.push(declaration);
                None
            }
        }
    }

    /// Undo [`Topology::record`] after the broker refused the declaration.
    pub(crate) fn restore(&mut self, declaration: &Declaration, previous: Option<Declaration>) {
        let Some(i) = self.declarations.iter().position(|d| d == declaration) else { return };
        match previous {
            Some(previous) => self.declarations[i] = previous,
            None => {
                self.declarations.remove(i);
            }
        }
    }

    /// Forget one declaration (one the broker rejects on replay).
    pub(crate) fn forget(&mut self, declaration: &Declaration) {
        self.declarations.retain(|d| d != declaration);
    }

    /// Forget a deleted queue and its bindings.
    pub(crate) fn remove_queue(&mut self, queue: &str) {
        self.declarations.retain(|d| match d {
            Declaration::Queue(q) => q.name != queue,
            Declaration::Binding(b) => b.queue != queue,
            Declaration::Exchange(_) => true,
        });
    }

    /// Forget a deleted exchange and the bindings to it.
    pub(crate) fn remove_exchange(&mut self, exchange: &str) {
        self.declarations.retain(|d| match d {
            Declaration::Exchange(e) => e.name != exchange,
            Declaration::Binding(b) => b.exchange != exchange,
            Declaration::Queue(_) => true,
        });
    }

    /// A copy of the declarations, in declaration order.
    pub(crate) fn snapshot(&self) -> Vec<Declaration> {
        self.declarations.clone()
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
    use super::*;

    fn binding(queue: &str, exchange: &str) -> Declaration {
        Declaration::Binding(BindingSpec {
            queue: queue.into(),
            exchange: exchange.into(),
            routing_key: "rk".into(),
            arguments: Default::default(),
        })
    }

    #[test]
    fn records_in_order_and_forgets_deleted_entities() {
        let mut topology = Topology::default();
        topology.record(Declaration::Exchange(ExchangeSpec::topic("ex")));
        topology.record(Declaration::Queue(QueueSpec::durable("q")));
        topology.record(binding("q", "ex"));
        assert!(topology.record(binding("q", "ex")).is_some());
        assert_eq!(topology.snapshot().len(), 3);
        topology.remove_queue("q");
        assert_eq!(topology.snapshot(), vec![Declaration::Exchange(ExchangeSpec::topic("ex"))]);
        topology.record(binding("q2", "ex"));
        topology.remove_exchange("ex");
        assert!(topology.snapshot().is_empty());
        topology.record(binding("q3", "ex3"));
        topology.forget(&binding("q3", "ex3"));
        assert!(topology.snapshot().is_empty());
    }

    #[test]
    fn restore_undoes_a_refused_declaration() {
        let mut topology = Topology::default();
        let original = Declaration::Queue(QueueSpec::durable("q"));
        topology.record(original.clone());
        let other = Declaration::Queue(QueueSpec { durable: false, ..QueueSpec::durable("q") });
        let previous = topology.record(other.clone());
        topology.restore(&other, previous);
        assert_eq!(topology.snapshot(), vec![original.clone()]);
        let fresh = Declaration::Queue(QueueSpec::durable("new"));
        let previous = topology.record(fresh.clone());
        topology.restore(&fresh, previous);
        assert_eq!(topology.snapshot(), vec![original]);
    }
}
