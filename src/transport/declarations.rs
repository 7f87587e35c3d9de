//! [`Declarations`]: the exchanges, queues and bindings one connection declared, in order,
//! so that its transport can declare them again: all of them after a reconnect (RabbitMQ), or
//! one queue deleted under its consumers ([`Transport::declare_again`], both transports).
//!
//! [`Transport::declare_again`]: crate::transport::Transport::declare_again

use crate::transport::{BindingSpec, ExchangeSpec, QueueSpec};

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

impl Declaration {
    /// The queue it declares, for a queue's declaration.
    pub(crate) fn queue(&self) -> Option<&QueueSpec> {
        match self {
            Declaration::Queue(spec) => Some(spec),
            Declaration::Exchange(_) | Declaration::Binding(_) => None,
        }
    }

    /// True when both declare the same entity (a redeclaration replaces the first).
    fn same_entity(&self, other: &Declaration) -> bool {
        match (self, other) {
            (Declaration::Exchange(x), Declaration::Exchange(y)) => x.name == y.name,
            (Declaration::Queue(x), Declaration::Queue(y)) => x.name == y.name,
            (Declaration::Binding(x), Declaration::Binding(y)) => x == y,
            _ => false,
        }
    }

    /// True for the queue `queue` and the bindings of it.
    fn of_queue(&self, queue: &str) -> bool {
        match self {
            Declaration::Queue(q) => q.name == queue,
            Declaration::Binding(b) => b.queue == queue,
            Declaration::Exchange(_) => false,
        }
    }
}

/// One declaration of the record, with the stamp of its last recording (so a reader can tell
/// a declaration it read from one the application made again meanwhile).
#[derive(Debug)]
struct Entry {
    declaration: Declaration,
    stamp: u64,
}

/// The ordered record of a connection's declarations, one entry per entity.
#[derive(Debug, Default)]
pub(crate) struct Declarations {
    entries: Vec<Entry>,
    stamps: u64,
}

impl Declarations {
    /// Record a declaration; a redeclaration of the same entity replaces the old one in place.
    /// Returns the declaration it replaced, if any (to restore it if the broker refuses).
    pub(crate) fn record(&mut self, declaration: Declaration) -> Option<Declaration> {
        self.stamps += 1;
        let entry = Entry { declaration, stamp: self.stamps };
        let position =
            self.entries.iter().position(|e| e.declaration.same_entity(&entry.declaration));
        match position {
            Some(i) => Some(std::mem::replace(&mut self.entries[i], entry).declaration),
            None => {
                self.entries.push(entry);
                None
            }
        }
    }

    /// Undo [`Declarations::record`] after the broker refused the declaration. False when
    /// the declaration is no longer recorded (replaced or forgotten meanwhile): nothing to undo.
    pub(crate) fn restore(
        &mut self,
        declaration: &Declaration,
        previous: Option<Declaration>,
    ) -> bool {
        let Some(i) = self.entries.iter().position(|e| e.declaration == *declaration) else {
            return false;
        };
        match previous {
            Some(previous) => self.entries[i].declaration = previous,
            None => {
                self.entries.remove(i);
            }
        }
        true
    }

    /// Forget one declaration.
    pub(crate) fn forget(&mut self, declaration: &Declaration) {
        self.entries.retain(|e| e.declaration != *declaration);
    }

    /// True when `queue` is recorded.
    pub(crate) fn has_queue(&self, queue: &str) -> bool {
        self.entries
            .iter()
            .any(|e| matches!(&e.declaration, Declaration::Queue(q) if q.name == queue))
    }

    /// True when `queue` is recorded with this stamp (not declared again since it was read).
    pub(crate) fn has_queue_stamped(&self, queue: &str, stamp: u64) -> bool {
        self.entries.iter().any(|e| {
            e.stamp == stamp && matches!(&e.declaration, Declaration::Queue(q) if q.name == queue)
        })
    }

    /// Forget a deleted queue and its bindings.
    pub(crate) fn remove_queue(&mut self, queue: &str) {
        self.entries.retain(|e| !e.declaration.of_queue(queue));
    }

    /// Forget a deleted exchange and the bindings to it.
    pub(crate) fn remove_exchange(&mut self, exchange: &str) {
        self.entries.retain(|e| match &e.declaration {
            Declaration::Exchange(x) => x.name != exchange,
            Declaration::Binding(b) => b.exchange != exchange,
            Declaration::Queue(_) => true,
        });
    }

    /// The recorded declaration of `queue` and its bindings, in order; empty when the queue
    /// is not recorded.
    pub(crate) fn queue_with_bindings(&self, queue: &str) -> Vec<Declaration> {
        if !self.has_queue(queue) {
            return Vec::new();
        }
        self.declarations().filter(|d| d.of_queue(queue)).cloned().collect()
    }

    /// What declares `queue` again as it was: the recorded exchanges it is bound to first (one
    /// deleted with the queue would leave it unbound; kombu declares a queue's exchange with
    /// it too), then the queue, then its bindings; empty when the queue is not recorded.
    pub(crate) fn again(&self, queue: &str) -> Vec<Declaration> {
        let declarations = self.queue_with_bindings(queue);
        if declarations.is_empty() {
            return declarations;
        }
        let bound = |exchange: &str| {
            declarations
                .iter()
                .any(|d| matches!(d, Declaration::Binding(b) if b.exchange == exchange))
        };
        let exchanges =
            self.declarations().filter(|d| matches!(d, Declaration::Exchange(x) if bound(&x.name)));
        exchanges.cloned().chain(declarations.iter().cloned()).collect()
    }

    /// Every recorded declaration with its stamp, in declaration order.
    pub(crate) fn stamped(&self) -> impl Iterator<Item = (&Declaration, u64)> {
        self.entries.iter().map(|e| (&e.declaration, e.stamp))
    }

    fn declarations(&self) -> impl Iterator<Item = &Declaration> {
        self.entries.iter().map(|e| &e.declaration)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A binding of `queue` to `exchange` with routing key `rk`.
    pub(crate) fn binding(queue: &str, exchange: &str) -> Declaration {
        Declaration::Binding(BindingSpec {
            queue: queue.into(),
            exchange: exchange.into(),
            routing_key: "rk".into(),
            arguments: Default::default(),
        })
    }

    fn queue(name: &str) -> Declaration {
        Declaration::Queue(QueueSpec::durable(name))
    }

    fn exchange(name: &str) -> Declaration {
        Declaration::Exchange(ExchangeSpec::topic(name))
    }

    fn all(declarations: &Declarations) -> Vec<Declaration> {
        declarations.declarations().cloned().collect()
    }

    #[test]
    fn records_in_order_and_forgets_deleted_entities() {
        let mut declarations = Declarations::default();
        declarations.record(exchange("ex"));
        declarations.record(queue("q"));
        declarations.record(binding("q", "ex"));
        assert!(declarations.record(binding("q", "ex")).is_some());
        assert_eq!(all(&declarations).len(), 3);
        declarations.remove_queue("q");
        assert_eq!(all(&declarations), vec![exchange("ex")]);
        declarations.record(binding("q2", "ex"));
        declarations.remove_exchange("ex");
        assert!(all(&declarations).is_empty());
        declarations.record(binding("q3", "ex3"));
        declarations.forget(&binding("q3", "ex3"));
        assert!(all(&declarations).is_empty());
    }

    #[test]
    fn restore_undoes_a_refused_declaration() {
        let mut declarations = Declarations::default();
        let original = queue("q");
        declarations.record(original.clone());
        let other = Declaration::Queue(QueueSpec { durable: false, ..QueueSpec::durable("q") });
        let previous = declarations.record(other.clone());
        assert!(declarations.restore(&other, previous));
        assert_eq!(all(&declarations), vec![original.clone()]);
        let fresh = queue("new");
        let previous = declarations.record(fresh.clone());
        assert!(declarations.restore(&fresh, previous));
        assert_eq!(all(&declarations), vec![original.clone()]);
        assert!(!declarations.restore(&fresh, None), "no longer recorded");
    }

    #[test]
    fn a_stamp_tells_a_declaration_made_again() {
        let mut declarations = Declarations::default();
        declarations.record(queue("q"));
        let (_, stamp) = declarations.stamped().next().expect("recorded");
        assert!(declarations.has_queue_stamped("q", stamp));
        declarations.record(queue("q"));
        assert!(!declarations.has_queue_stamped("q", stamp));
        assert!(declarations.has_queue("q"));
    }

    #[test]
    fn a_queue_comes_with_its_bindings() {
        let mut declarations = Declarations::default();
        let exclusive =
            Declaration::Queue(QueueSpec { exclusive: true, ..QueueSpec::durable("x") });
        declarations.record(exclusive.clone());
        declarations.record(queue("other"));
        declarations.record(binding("x", "ex"));
        declarations.record(binding("other", "ex"));
        assert_eq!(declarations.queue_with_bindings("x"), vec![exclusive, binding("x", "ex")]);
        let other = vec![queue("other"), binding("other", "ex")];
        assert_eq!(declarations.queue_with_bindings("other"), other);
        declarations.remove_queue("other");
        assert!(declarations.queue_with_bindings("other").is_empty());
        assert!(declarations.queue_with_bindings("never").is_empty());
    }

    #[test]
    fn a_queue_is_declared_again_after_the_exchanges_it_is_bound_to() {
        let mut declarations = Declarations::default();
        declarations.record(exchange("ex"));
        declarations.record(exchange("unrelated"));
        declarations.record(queue("q"));
        declarations.record(binding("q", "ex"));
        declarations.record(binding("q", "not-declared-here"));
        let again =
            vec![exchange("ex"), queue("q"), binding("q", "ex"), binding("q", "not-declared-here")];
        assert_eq!(declarations.again("q"), again);
        declarations.remove_exchange("ex");
        assert_eq!(declarations.again("q"), vec![queue("q"), binding("q", "not-declared-here")]);
        assert!(declarations.again("never").is_empty());
    }
}
