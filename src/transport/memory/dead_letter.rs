//! Dead-lettering: the `x-death` bookkeeping and cycle detection of RabbitMQ 3.10.

use std::time::UNIX_EPOCH;

use crate::clock;
use crate::transport::{HeaderValue, Headers};

use super::queue::Message;
use super::sender_selected;

/// Why a message is dead-lettered (the `reason` of its `x-death` entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Reason {
    /// Its TTL ran out.
    Expired,
    /// Rejected or nacked with `requeue = false`.
    Rejected,
    /// Dropped or refused because the queue was full.
    Maxlen,
    /// Handed back more often than the quorum queue's `x-delivery-limit`.
    DeliveryLimit,
}

impl Reason {
    /// The RabbitMQ name of the reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Expired => "expired",
            Reason::Rejected => "rejected",
            Reason::Maxlen => "maxlen",
            Reason::DeliveryLimit => "delivery_limit",
        }
    }
}

/// Rewrites `message` as dead-lettered from `queue`: records the death in `x-death` (the
/// earlier entries regrouped as RabbitMQ does, see [`regroup`]; an existing entry for the
/// same queue and reason is counted up and moved to the front, a new one is prepended),
/// sets the `x-first-death-*` headers once, moves a per-message `expiration` into the
/// entry's `original-expiration`, and re-addresses the message to the dead-letter exchange
/// and routing key (or its original routing keys, `CC` and `BCC` included; a dead-letter
/// routing key replaces them all and removes the `CC` header).
pub(super) fn dead_letter(
    message: &mut Message,
    queue: &str,
    reason: Reason,
    exchange: &str,
    routing_key: Option<&str>,
) {
    let now = clock::wall_now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs());
    let original_expiration = message.properties.expiration.take();
    let headers = &mut message.properties.headers;
    let mut deaths = match headers.remove("x-death") {
        Some(HeaderValue::Array(deaths)) if deaths.len() > 1 => regroup(deaths),
        Some(HeaderValue::Array(deaths)) => deaths,
        _ => Vec::new(),
    };
    let existing = deaths.iter().position(|death| {
        matches!(death, HeaderValue::Table(table)
            if table.get("queue").and_then(HeaderValue::as_str) == Some(queue)
                && table.get("reason").and_then(HeaderValue::as_str) == Some(reason.as_str()))
    });
    let entry = match existing.map(|index| deaths.remove(index)) {
        Some(HeaderValue::Table(mut table)) => {
            let count = table.get("count").and_then(HeaderValue::as_i64).unwrap_or(0);
            table.insert("count".to_owned(), HeaderValue::Int(count.saturating_add(1)));
            table
        }
        _ => {
            let mut table = Headers::new();
            table.insert("count".to_owned(), HeaderValue::Int(1));
            table.insert("reason".to_owned(), reason.as_str().into());
            table.insert("queue".to_owned(), queue.into());
            table.insert("time".to_owned(), HeaderValue::Timestamp(now));
            table.insert("exchange".to_owned(), message.exchange.as_str().into());
            let cc = sender_selected::cc_routes(headers);
            let keys = std::iter::once(message.routing_key.clone()).chain(cc);
            table.insert(
                "routing-keys".to_owned(),
                HeaderValue::Array(keys.map(HeaderValue::String).collect()),
            );
            if let Some(expiration) = original_expiration {
                table.insert("original-expiration".to_owned(), expiration.into());
            }
            table
        }
    };
    deaths.insert(0, HeaderValue::Table(entry));
    headers.insert("x-death".to_owned(), HeaderValue::Array(deaths));
    for (key, value) in [
        ("x-first-death-reason", reason.as_str()),
        ("x-first-death-queue", queue),
        ("x-first-death-exchange", message.exchange.as_str()),
    ] {
        headers.entry(key.to_owned()).or_insert_with(|| value.into());
    }
    message.exchange = exchange.to_owned();
    if let Some(key) = routing_key {
        // re-addressed to one key: the `CC` and `BCC` keys route it no more
        message.routing_key = key.to_owned();
        message.header_routes.clear();
        sender_selected::remove_cc(headers);
    }
}

/// The `queue` and `reason` of an `x-death` entry.
fn death_key(death: &HeaderValue) -> Option<(&str, &str)> {
    match death {
        HeaderValue::Table(table) => Some((
            table.get("queue").and_then(HeaderValue::as_str)?,
            table.get("reason").and_then(HeaderValue::as_str)?,
        )),
        _ => None,
    }
}

/// An `x-death` list of two or more entries as RabbitMQ 3.10 rewrites it before recording a
/// death: one entry per queue and reason (the first), in reverse order (its grouping folds
/// into an accumulator it never turns back). The order is visible to consumers, and decides
/// which deaths [`is_cycle`] sees before a queue's entry.
fn regroup(deaths: Vec<HeaderValue>) -> Vec<HeaderValue> {
    let mut grouped: Vec<HeaderValue> = Vec::with_capacity(deaths.len());
    for death in deaths {
        let seen = death_key(&death)
            .is_some_and(|key| grouped.iter().any(|kept| death_key(kept) == Some(key)));
        if !seen {
            grouped.push(death);
        }
    }
    grouped.reverse();
    grouped
}

/// Whether delivering a dead-lettered message to `target` closes a fully automatic cycle
/// (RabbitMQ's `is_cycle`): `target` already appears in `x-death` and no death since
/// (including that one) was a rejection. Such messages are dropped for that queue.
pub(super) fn is_cycle(reason: Reason, headers: &Headers, target: &str) -> bool {
    if reason == Reason::Rejected {
        return false;
    }
    let Some(HeaderValue::Array(deaths)) = headers.get("x-death") else {
        return false;
    };
    let Some(last) = deaths.iter().position(|death| {
        matches!(death, HeaderValue::Table(table)
            if table.get("queue").and_then(HeaderValue::as_str) == Some(target))
    }) else {
        return false;
    };
    deaths[..=last].iter().all(|death| {
        matches!(death, HeaderValue::Table(table)
            if table.get("reason").and_then(HeaderValue::as_str) != Some("rejected"))
    })
}
