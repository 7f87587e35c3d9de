//! The broker nodes a transport may connect to: the entries of its URI list, shuffled once
//! per transport so that the instances of a service spread over a cluster's nodes, then tried
//! in order, round-robin, starting after the node that failed.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::uri::BrokerUri;

/// Transports made in this process so far: part of the default seed, so that transports made
/// in the same instant still get different orders.
static TRANSPORTS: AtomicU64 = AtomicU64::new(0);

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

/// A seed that differs between processes and between the transports of one process.
pub(crate) fn default_seed() -> u64 {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let count = TRANSPORTS.fetch_add(1, Ordering::Relaxed);
    (nanos as u64) ^ (u64::from(std::process::id()) << 32) ^ count.wrapping_mul(GOLDEN)
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64: a tiny generator, good enough to spread instances over nodes.
fn split_mix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(GOLDEN);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The indices `0..count` in the order of a Fisher-Yates shuffle seeded with `seed`.
fn shuffled(count: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..count).collect();
    let mut state = seed;
    for i in (1..count).rev() {
        let j = (split_mix(&mut state) % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
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
