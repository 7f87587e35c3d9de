//! [`QueueClaims`]: which route of a service consumes each queue, and whose dead letters each
//! dead-letter queue holds. The naming rules can give two routes one queue for different
//! messages: two singleton handlers, of event `c` from `a-b` and of `b-c` from `a`, would share
//! `evt-a-b-c`; a route named `on_paid.dlq` would consume route `on_paid`'s dead-letter queue.
//! Both routes would then consume it, each message going to whichever is free, and the broker
//! would route both routes' messages there. Each route claims its queues before it declares
//! anything, so a route refused leaves nothing on the broker (a binding made would route its
//! events to the other's queue for good). Sharing on purpose stays allowed: singleton
//! handlers of one event (one queue for every handler, as Nameko's), and a queue an
//! entrypoint names itself (`QueueListener`), even another route's dead-letter queue.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// How a route uses a queue it claims.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Use {
    /// It consumes the queue, whose name the naming rules made for these messages (`paid`
    /// events of `shop`).
    Consumes(String),
    /// It consumes the queue, which its entrypoint names (`QueueListener`).
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
pub(crate) struct QueueClaims(Arc<Mutex<HashMap<String, Vec<Claim>>>>);

/// The queues one route wants: the one it consumes and its dead-letter queue.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RouteQueues<'a> {
    pub(crate) consumes: &'a str,
    /// The messages the naming rules named the queue after (`paid events of shop`); `None`
    /// when the entrypoint names it (`QueueListener`).
    pub(crate) named_for: Option<&'a str>,
    pub(crate) dead_letters: &'a str,
}

impl QueueClaims {
    /// Claim `queues` for `route`. Refused, naming both routes, when another route consumes
    /// the queue it consumes for other messages, or when one of the two would consume the
    /// other's dead letters, where the naming rules made the queue's name.
    pub(crate) fn claim(&self, route: &str, queues: RouteQueues<'_>) -> Result<(), String> {
        let consumes =
            queues.named_for.map_or(Use::ConsumesNamed, |what| Use::Consumes(what.into()));
        let wanted = [(queues.consumes, consumes), (queues.dead_letters, Use::DeadLetters)];
        let mut claims = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for (queue, usage) in &wanted {
            let others = claims.get(*queue).into_iter().flatten();
            for held in others.filter(|held| held.route != route) {
                if let Some(why) = conflict(usage, &held.usage) {
                    let other = &held.route;
                    return Err(format!(
                        "route '{route}' and route '{other}' name the same queue {queue:?}: \
                         {why}; rename one of them (Route::name)"
                    ));
                }
            }
        }
        for (queue, usage) in wanted {
            let held = claims.entry(queue.to_owned()).or_default();
            held.push(Claim { route: route.to_owned(), usage });
        }
        Ok(())
    }
}

/// Why a route using a queue as `wanted` conflicts with another using it as `held`, if it does.
fn conflict(wanted: &Use, held: &Use) -> Option<String> {
    match (wanted, held) {
        (Use::Consumes(wanted), Use::Consumes(held)) if wanted != held => Some(format!(
            "both would consume it, one for {wanted}, the other for {held}, each message going \
             to one of them"
        )),
        (Use::Consumes(_), Use::DeadLetters) | (Use::DeadLetters, Use::Consumes(_)) => {
            Some("one would consume the dead letters of the other as its own messages".into())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(
        claims: &QueueClaims,
        route: &str,
        consumes: &str,
        named_for: Option<&str>,
    ) -> Result<(), String> {
        let dead_letters = format!("{consumes}.dlq");
        let queues = RouteQueues { consumes, named_for, dead_letters: &dead_letters };
        claims.claim(route, queues)
    }

    const PAID: Option<&str> = Some("paid events of shop");

    #[test]
    fn two_routes_consuming_one_queue_for_different_messages_are_refused() {
        let claims = QueueClaims::default();
        claim(&claims, "a", "evt-a-b-c", Some("c events of a-b")).unwrap();
        let refused = claim(&claims, "b", "evt-a-b-c", Some("b-c events of a")).unwrap_err();
        assert!(refused.contains("route 'b' and route 'a'"), "{refused}");
        let why = "\"evt-a-b-c\": both would consume it, one for b-c events of a, the other for \
                   c events of a-b";
        assert!(refused.contains(why), "{refused}");
    }

    #[test]
    fn routes_sharing_a_queue_on_purpose_are_taken() {
        // singleton handlers of one event: one queue, as every service's
        let claims = QueueClaims::default();
        claim(&claims, "a", "evt-shop-paid", PAID).unwrap();
        claim(&claims, "b", "evt-shop-paid", PAID).unwrap();
        // queues an entrypoint names, whoever else consumes them
        claim(&claims, "c", "evt-shop-paid", None).unwrap();
        claim(&claims, "d", "jobs", None).unwrap();
        claim(&claims, "e", "jobs", None).unwrap();
    }

    #[test]
    fn a_queue_named_by_the_rules_may_not_be_another_routes_dead_letter_queue() {
        let (queue, dlq) = ("evt-shop-paid--orders.on_paid", "evt-shop-paid--orders.on_paid.dlq");
        let claims = QueueClaims::default();
        claim(&claims, "on_paid", queue, PAID).unwrap();
        let refused = claim(&claims, "on_paid.dlq", dlq, PAID).unwrap_err();
        assert!(refused.contains("consume the dead letters of the other"), "{refused}");
        // the other way round: the dead-letter queue claimed second
        let claims = QueueClaims::default();
        claim(&claims, "on_paid.dlq", dlq, PAID).unwrap();
        let refused = claim(&claims, "on_paid", queue, PAID);
        assert!(refused.unwrap_err().contains("consume the dead letters"));
    }

    #[test]
    fn a_queue_listener_may_read_another_routes_dead_letters() {
        for work_first in [true, false] {
            let claims = QueueClaims::default();
            let (work, reader) = (("work", "jobs", None), ("replay", "jobs.dlq", None));
            let order = if work_first { [work, reader] } else { [reader, work] };
            for (route, queue, named_for) in order {
                claim(&claims, route, queue, named_for).unwrap();
            }
            // a route the rules name it for would take work's dead letters unaware
            let refused = claim(&claims, "again", "jobs.dlq", PAID).unwrap_err();
            assert!(refused.contains("route 'again' and route 'work'"), "{refused}");
            // another queue listener may share it
            claim(&claims, "again", "jobs.dlq", None).unwrap();
        }
    }

    #[test]
    fn a_route_set_up_again_keeps_its_own_claims() {
        let claims = QueueClaims::default();
        claim(&claims, "a", "evt-shop-paid", PAID).unwrap();
        claim(&claims, "a", "evt-shop-paid", Some("other events")).unwrap();
    }
}
