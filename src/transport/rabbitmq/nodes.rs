//! The broker nodes a transport may connect to: the entries of its URI list, shuffled once
//! per transport so that the instances of a service spread over a cluster's nodes, then tried
//! in order, round-robin, starting after the node that failed.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::uri::BrokerUri;

/// The nodes, in this transport's order, and which one is in use.
pub(crate) struct Nodes {
    list: Vec<BrokerUri>,
    /// Index in `list` of the node connected last.
    current: AtomicUsize,
    /// The masked URIs, joined with `,`: the broker as messages name it.
    masked: String,
}

impl Nodes {
    /// `list` (not empty) shuffled with `seed`.
    pub(crate) fn new(list: Vec<BrokerUri>, seed: u64) -> Self {
        let masked = list.iter().map(|uri| uri.masked.as_str()).collect::<Vec<_>>().join(",");
        let mut slots: Vec<Option<BrokerUri>> = list.into_iter().map(Some).collect();
        let list =
            shuffled(slots.len(), seed).into_iter().filter_map(|i| slots[i].take()).collect();
        Nodes { list, current: AtomicUsize::new(0), masked }
    }

    /// Every node, masked, in the order given.
    pub(crate) fn masked(&self) -> &str {
        &self.masked
    }

    /// The node connected last (the first to try before any connection).
    pub(crate) fn current(&self) -> &BrokerUri {
        &self.list[self.current_index()]
    }

    fn current_index(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.list.len()
    }

    /// Record that the node at `index` is in use.
    pub(crate) fn use_node(&self, index: usize) {
        self.current.store(index, Ordering::Relaxed);
    }

    /// One pass over the nodes, as `(index, node)`: the first connection starts with the
    /// first node; a reconnection (`after_failure`) with the one after the current node,
    /// which is tried last.
    pub(crate) fn pass(&self, after_failure: bool) -> Vec<(usize, &BrokerUri)> {
        let count = self.list.len();
        let start = if after_failure { self.current_index() + 1 } else { 0 };
        (0..count).map(|step| (start + step) % count).map(|i| (i, &self.list[i])).collect()
    }
}

/// A seed that differs between processes and between the transports of one process: drawn
/// from fastrand's thread-local generator, which is seeded randomly per thread.
pub(crate) fn default_seed() -> u64 {
    fastrand::u64(..)
}

/// The indices `0..count` shuffled by a generator seeded with `seed`: one seed, one order.
fn shuffled(count: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..count).collect();
    fastrand::Rng::with_seed(seed).shuffle(&mut order);
    order
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::transport::rabbitmq::uri::parse_uri;

    fn nodes(seed: u64) -> Nodes {
        let list = ["a", "b", "c"].map(|host| parse_uri(&format!("amqp://{host}/"), 60).unwrap());
        Nodes::new(list.into(), seed)
    }

    #[test]
    fn a_shuffle_is_a_permutation_fixed_by_its_seed() {
        for seed in 0..50 {
            let mut order = shuffled(5, seed);
            assert_eq!(order, shuffled(5, seed));
            order.sort_unstable();
            assert_eq!(order, [0, 1, 2, 3, 4]);
        }
        assert!(shuffled(0, 7).is_empty());
        assert_eq!(shuffled(1, 7), [0]);
    }

    #[test]
    fn transports_spread_over_the_nodes() {
        // Seeds 0..6 stand for six instances: they start on every node of three.
        let first: HashSet<String> =
            (0..6).map(|seed| nodes(seed).current().node.clone()).collect();
        assert_eq!(first.len(), 3, "{first:?}");
        assert_ne!(default_seed(), default_seed(), "transports of one process share a seed");
    }

    #[test]
    fn a_reconnection_pass_starts_after_the_current_node() {
        let nodes = nodes(3);
        let order = |after| nodes.pass(after).iter().map(|(i, _)| *i).collect::<Vec<_>>();
        assert_eq!(order(false), [0, 1, 2]);
        assert_eq!(order(true), [1, 2, 0]);
        nodes.use_node(2);
        assert_eq!(order(true), [0, 1, 2]);
        assert_eq!(nodes.current().node, nodes.pass(false)[2].1.node);
        assert_eq!(nodes.masked(), "amqp://a/,amqp://b/,amqp://c/");
    }
}
