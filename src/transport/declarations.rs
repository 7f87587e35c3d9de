//! [`Declarations`]: the exchanges, queues and bindings one connection declared, in order,
//! so that its transport can declare them again: all of them after a reconnect (RabbitMQ), or
//! one queue deleted under its consumers ([`Transport::declare_again`], both transports).
//!
//! [`Transport::declare_again`]: crate::transport::Transport::declare_again

use std::collections::{BTreeMap, HashMap};

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

/// What names an entity, to find its declaration without a search: a service with thousands
/// of routes records tens of thousands of declarations, each recording looking its entity up.
/// Bindings that differ only in their arguments share a key.
#[derive(Debug, PartialEq, Eq, Hash)]
enum EntityKey {
    Exchange(String),
    Queue(String),
    Binding { queue: String, exchange: String, routing_key: String },
}

impl EntityKey {
    fn of(declaration: &Declaration) -> EntityKey {
        match declaration {
            Declaration::Exchange(x) => EntityKey::Exchange(x.name.clone()),
            Declaration::Queue(q) => EntityKey::Queue(q.name.clone()),
            Declaration::Binding(b) => EntityKey::Binding {
                queue: b.queue.clone(),
                exchange: b.exchange.clone(),
                routing_key: b.routing_key.clone(),
            },
        }
    }
}

/// The ordered record of a connection's declarations, one entry per entity.
#[derive(Debug, Default)]
pub(crate) struct Declarations {
    /// The entries by the stamp of their first recording: declaration order.
    entries: BTreeMap<u64, Entry>,
    /// Each entity's place in `entries` (several for bindings differing in arguments).
    places: HashMap<EntityKey, Vec<u64>>,
    stamps: u64,
}

impl Declarations {
    /// Record a declaration the broker accepted; a redeclaration of the same entity replaces
    /// the old one in place.
    pub(crate) fn record(&mut self, declaration: Declaration) {
        self.stamps += 1;
        let stamp = self.stamps;
        let place = self.place_of(&declaration, Declaration::same_entity);
        if let Some(entry) = place.and_then(|place| self.entries.get_mut(&place)) {
            entry.stamp = stamp;
            entry.declaration = declaration;
            return;
        }
        self.places.entry(EntityKey::of(&declaration)).or_default().push(stamp);
        self.entries.insert(stamp, Entry { declaration, stamp });
    }

    /// Forget one declaration.
    pub(crate) fn forget(&mut self, declaration: &Declaration) {
        if let Some(place) = self.place_of(declaration, |a, b| a == b) {
            self.remove(place);
        }
    }

    /// True when `queue` is recorded.
    pub(crate) fn has_queue(&self, queue: &str) -> bool {
        self.places.contains_key(&EntityKey::Queue(queue.to_owned()))
    }

    /// True when `queue` is recorded with this stamp (not declared again since it was read).
    pub(crate) fn has_queue_stamped(&self, queue: &str, stamp: u64) -> bool {
        let places = self.places.get(&EntityKey::Queue(queue.to_owned()));
        places
            .into_iter()
            .flatten()
            .any(|place| self.entries.get(place).is_some_and(|e| e.stamp == stamp))
    }

    /// Forget a deleted queue and its bindings.
    pub(crate) fn remove_queue(&mut self, queue: &str) {
        self.remove_where(|d| d.of_queue(queue));
    }

    /// Forget a deleted exchange and the bindings to it.
    pub(crate) fn remove_exchange(&mut self, exchange: &str) {
        self.remove_where(|d| match d {
            Declaration::Exchange(x) => x.name == exchange,
            Declaration::Binding(b) => b.exchange == exchange,
            Declaration::Queue(_) => false,
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
        self.entries.values().map(|e| (&e.declaration, e.stamp))
    }

    fn declarations(&self) -> impl Iterator<Item = &Declaration> {
        self.entries.values().map(|e| &e.declaration)
    }

    /// The place of the recorded declaration that `matches` the given one.
    fn place_of(
        &self,
        declaration: &Declaration,
        matches: impl Fn(&Declaration, &Declaration) -> bool,
    ) -> Option<u64> {
        let places = self.places.get(&EntityKey::of(declaration))?;
        places.iter().copied().find(|place| {
            self.entries.get(place).is_some_and(|e| matches(&e.declaration, declaration))
        })
    }

    fn remove(&mut self, place: u64) {
        let Some(entry) = self.entries.remove(&place) else {
            return;
        };
        let key = EntityKey::of(&entry.declaration);
        if let Some(places) = self.places.get_mut(&key) {
            places.retain(|p| *p != place);
            if places.is_empty() {
                self.places.remove(&key);
            }
        }
    }

    /// Forget every declaration `doomed` selects (a scan: deletions are rare beside records).
    fn remove_where(&mut self, doomed: impl Fn(&Declaration) -> bool) {
        let places: Vec<u64> =
            self.entries.iter().filter(|(_, e)| doomed(&e.declaration)).map(|(p, _)| *p).collect();
        for place in places {
            self.remove(place);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::transport::{HeaderValue, Headers};

    /// A binding of `queue` to `exchange` with routing key `rk`.
    pub(crate) fn binding(queue: &str, exchange: &str) -> Declaration {
        Declaration::Binding(binding_spec(queue, exchange))
    }

    fn binding_spec(queue: &str, exchange: &str) -> BindingSpec {
        BindingSpec {
            queue: queue.into(),
            exchange: exchange.into(),
            routing_key: "rk".into(),
            arguments: Default::default(),
        }
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
        declarations.record(binding("q", "ex"));
        assert_eq!(all(&declarations).len(), 3, "a redeclaration replaces the first");
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
    fn bindings_that_differ_in_arguments_are_recorded_apart() {
        let mut declarations = Declarations::default();
        let with = |value: &str| {
            let mut arguments = Headers::new();
            arguments.insert("x-match".into(), HeaderValue::from(value));
            Declaration::Binding(BindingSpec { arguments, ..binding_spec("q", "ex") })
        };
        declarations.record(queue("q"));
        declarations.record(with("all"));
        declarations.record(with("any"));
        declarations.record(with("all"));
        assert_eq!(all(&declarations), vec![queue("q"), with("all"), with("any")]);
        declarations.forget(&with("all"));
        assert_eq!(all(&declarations), vec![queue("q"), with("any")]);
        declarations.forget(&with("any"));
        declarations.remove_queue("q");
        assert!(all(&declarations).is_empty());
        assert!(declarations.places.is_empty(), "no place outlives its entry");
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
