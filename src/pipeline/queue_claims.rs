//! [`QueueClaims`]: which route of a service consumes each queue, and whose dead letters each
//! dead-letter queue holds. The naming rules can give two routes one queue: two singleton
//! handlers of one event, `evt-a-b-c` for events `c` of `a-b` and `b-c` of `a`, a route named
//! `on_paid.dlq` whose queue is route `on_paid`'s dead-letter queue. Both would then consume
//! it, each message going to whichever is free, and the broker would route both routes' events
//! there. Each route claims its queues before it declares anything, so a route refused leaves
//! nothing on the broker (a binding made would route its events to the other's queue for
//! good).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// How a route uses a queue it claims.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Use {
    /// It consumes the queue, named by the naming rules.
    Consumes,
    /// It consumes the queue, which its entrypoint names (`QueueListener`): it may be another
    /// route's dead-letter queue on purpose, to work its dead letters off.
    ConsumesNamed,
    /// Its dead letters go to the queue.
    DeadLetters,
}

/// What one route of the service wants of a queue.
#[derive(Clone, Debug)]
struct Claim {
    route: String,
    usage: Use,
}

/// The queues the routes of one service consume and dead-letter to.
#[derive(Clone, Debug, Default)]
pub(crate) struct QueueClaims(Arc<Mutex<HashMap<String, Claim>>>);

/// The queues one route wants: the one it consumes and its dead-letter queue.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RouteQueues<'a> {
    pub(crate) consumes: &'a str,
    /// Whether the entrypoint names the queue (`QueueListener`) rather than the naming rules.
    pub(crate) named: bool,
    pub(crate) dead_letters: &'a str,
}

impl QueueClaims {
    /// Claim `queues` for `route`. Refused, naming both routes, when another route consumes
    /// either queue, or when the queue it consumes holds another route's dead letters and the
    /// naming rules made its name (a `QueueListener` may read another route's dead letters).
    pub(crate) fn claim(&self, route: &str, queues: RouteQueues<'_>) -> Result<(), String> {
        let consumes = if queues.named { Use::ConsumesNamed } else { Use::Consumes };
        let wanted = [(queues.consumes, consumes), (queues.dead_letters, Use::DeadLetters)];
        let mut claims = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for (queue, usage) in wanted {
            let Some(held) = claims.get(queue).filter(|held| held.route != route) else {
                continue;
            };
            if let Some(why) = conflict(usage, held.usage) {
                let other = &held.route;
                return Err(format!(
                    "route '{route}' and route '{other}' name the same queue {queue:?}: {why}; \
                     rename one of them (Route::name)"
                ));
            }
        }
        for (queue, usage) in wanted {
            let claim = Claim { route: route.to_owned(), usage };
            // a queue consumed outranks the dead letters it holds: it is what a later route
            // must not consume as well
            match claims.get(queue) {
                Some(held) if held.usage != Use::DeadLetters => {}
                _ => {
                    claims.insert(queue.to_owned(), claim);
                }
            }
        }
        Ok(())
    }
}

/// Why a route using a queue as `wanted` conflicts with another using it as `held`, if it does.
fn conflict(wanted: Use, held: Use) -> Option<&'static str> {
    match (wanted, held) {
        (Use::Consumes | Use::ConsumesNamed, Use::Consumes | Use::ConsumesNamed) => {
            Some("both would consume it, each message going to one of them")
        }
        (Use::Consumes, Use::DeadLetters) | (Use::DeadLetters, Use::Consumes) => {
            Some("one would consume the dead letters of the other as its own messages")
        }
        (Use::ConsumesNamed, Use::DeadLetters)
        | (Use::DeadLetters, Use::ConsumesNamed)
        | (Use::DeadLetters, Use::DeadLetters) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(consumes: &str) -> (String, String) {
        (consumes.to_owned(), format!("{consumes}.dlq"))
    }

    fn claim(claims: &QueueClaims, route: &str, consumes: &str, named: bool) -> Result<(), String> {
        let (consumes, dead_letters) = rules(consumes);
        let queues = RouteQueues { consumes: &consumes, named, dead_letters: &dead_letters };
        claims.claim(route, queues)
    }

    #[test]
    fn two_routes_consuming_one_queue_are_refused_in_either_order() {
        for named in [false, true] {
            let claims = QueueClaims::default();
            claim(&claims, "a", "evt-shop-paid", false).unwrap();
            let refused = claim(&claims, "b", "evt-shop-paid", named).unwrap_err();
            assert!(refused.contains("route 'b' and route 'a'"), "{refused}");
            assert!(refused.contains("\"evt-shop-paid\": both would consume it"), "{refused}");
        }
    }

    #[test]
    fn a_queue_named_by_the_rules_may_not_be_another_routes_dead_letter_queue() {
        let claims = QueueClaims::default();
        claim(&claims, "on_paid", "evt-shop-paid--orders.on_paid", false).unwrap();
        let refused =
            claim(&claims, "on_paid.dlq", "evt-shop-paid--orders.on_paid.dlq", false).unwrap_err();
        assert!(refused.contains("consume the dead letters of the other"), "{refused}");
        // the other way round: the dead-letter queue claimed second
        let claims = QueueClaims::default();
        claim(&claims, "on_paid.dlq", "evt-shop-paid--orders.on_paid.dlq", false).unwrap();
        let refused = claim(&claims, "on_paid", "evt-shop-paid--orders.on_paid", false);
        assert!(refused.unwrap_err().contains("consume the dead letters"));
    }

    #[test]
    fn a_queue_listener_may_read_another_routes_dead_letters() {
        for first in [true, false] {
            let claims = QueueClaims::default();
            let (work, reader) = (("work", "jobs", true), ("replay", "jobs.dlq", true));
            let order = if first { [work, reader] } else { [reader, work] };
            for (route, queue, named) in order {
                claim(&claims, route, queue, named).unwrap();
            }
            // the dead-letter queue is consumed now: no third route consumes it
            let refused = claim(&claims, "again", "jobs.dlq", true).unwrap_err();
            assert!(refused.contains("route 'again' and route 'replay'"), "{refused}");
        }
    }

    #[test]
    fn a_route_set_up_again_keeps_its_own_claims() {
        let claims = QueueClaims::default();
        claim(&claims, "a", "jobs", true).unwrap();
        claim(&claims, "a", "jobs", true).unwrap();
    }
}
