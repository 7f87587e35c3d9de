//! The `(service, method)` pairs the RPC call metrics are labelled with, capped: a target
//! that calls services or methods named by its input (a gateway) would otherwise add series
//! without end, each kept in memory and sent at every scrape.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};

/// How many distinct `(service, method)` pairs get series of their own.
pub(crate) const MAX_RPC_TARGETS: usize = 1000;

/// The `service` and `method` labels of calls past [`MAX_RPC_TARGETS`].
pub(crate) const OTHER_TARGETS: &str = "_other";

/// The pairs labelled so far.
#[derive(Debug, Default)]
pub(crate) struct RpcTargets(Mutex<Labelled>);

#[derive(Debug, Default)]
struct Labelled {
    methods: HashMap<String, HashSet<String>>,
    count: usize,
}

impl RpcTargets {
    /// The labels of a call of `service.method`: its own names when the pair has series
    /// already or there is room for it, else [`OTHER_TARGETS`] for both.
    pub(crate) fn labels<'a>(&self, service: &'a str, method: &'a str) -> (&'a str, &'a str) {
        let mut labelled = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if labelled.methods.get(service).is_some_and(|methods| methods.contains(method)) {
            return (service, method);
        }
        if labelled.count >= MAX_RPC_TARGETS {
            return (OTHER_TARGETS, OTHER_TARGETS);
        }
        labelled.count += 1;
        if labelled.count == MAX_RPC_TARGETS {
            tracing::warn!(
                "RPC calls have been made to {MAX_RPC_TARGETS} distinct service methods; calls \
                 to further ones are counted under service and method \"{OTHER_TARGETS}\""
            );
        }
        labelled.methods.entry(service.to_owned()).or_default().insert(method.to_owned());
        (service, method)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_past_the_cap_share_one_label() {
        let targets = RpcTargets::default();
        for n in 0..MAX_RPC_TARGETS {
            let method = n.to_string();
            assert_eq!(targets.labels("svc", &method), ("svc", method.as_str()));
        }
        assert_eq!(targets.labels("svc", "one more"), (OTHER_TARGETS, OTHER_TARGETS));
        assert_eq!(targets.labels("other", "0"), (OTHER_TARGETS, OTHER_TARGETS));
        assert_eq!(targets.labels("svc", "7"), ("svc", "7"), "known pairs keep their labels");
    }
}
