//! [`Admissions`]: how many connections a WebSocket server holds at once
//! (`WEBSOCKET_MAX_CONNECTIONS`, handshakes included), and what the next ones get. A WebSocket
//! connection lasts as long as its client wants, so one left waiting unaccepted for a free
//! slot, as an HTTP connection is, could wait for hours: its handshake is answered `503
//! Service Unavailable` instead, so that its client knows to come back later. At most
//! [`REFUSING`] connections are being answered so at once; past them, the next waits in the
//! listen backlog until a slot or a refusal frees, so a flood of connections takes no more
//! descriptors than the cap and those.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// How many connections are answered `503` at once, each for at most its handshake's time.
pub(crate) const REFUSING: usize = 64;

/// At most one warning about refused connections per this long.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// What an accepted connection gets: served, holding one of the server's slots until it
/// closes, or its handshake refused with `503` (every slot was taken when it came), holding
/// one of the refusals' until it is answered.
#[derive(Debug)]
pub(super) struct Admission {
    refused: bool,
    _held: OwnedSemaphorePermit,
}

impl Admission {
    fn served(slot: OwnedSemaphorePermit) -> Admission {
        Admission { refused: false, _held: slot }
    }

    fn refused(refusal: OwnedSemaphorePermit) -> Admission {
        Admission { refused: true, _held: refusal }
    }

    /// Whether the connection's handshake is to be refused with `503`.
    pub(super) fn is_refused(&self) -> bool {
        self.refused
    }
}

/// The slots of one server's connections, and of the refusals beyond them.
pub(super) struct Admissions {
    max_connections: usize,
    slots: Arc<Semaphore>,
    refusals: Arc<Semaphore>,
    /// Refused since the last warning, and when that was.
    unlogged: u64,
    last_warning: Option<Instant>,
}

impl Admissions {
    /// Room for `max_connections` connections, which `Config::validate` keeps far below
    /// `Semaphore::MAX_PERMITS` (past which `Semaphore::new` panics).
    pub(super) fn new(max_connections: usize) -> Admissions {
        Admissions {
            max_connections,
            slots: Arc::new(Semaphore::new(max_connections.min(Semaphore::MAX_PERMITS))),
            refusals: Arc::new(Semaphore::new(REFUSING)),
            unlogged: 0,
            last_warning: None,
        }
    }

    /// Wait until the next connection can be served, or else refused. An error only if a
    /// semaphore were closed, which none is.
    pub(super) async fn next(&self) -> Result<Admission, AcquireError> {
        tokio::select! {
            biased;
            slot = self.slots.clone().acquire_owned() => slot.map(Admission::served),
            refusal = self.refusals.clone().acquire_owned() => refusal.map(Admission::refused),
        }
    }

    /// What the connection just accepted from `peer` gets, now that it came: served after all
    /// if a slot freed while `admission` waited for it; a refusal is logged, at most every
    /// [`WARN_EVERY`].
    pub(super) fn decide(&mut self, admission: Admission, peer: std::net::SocketAddr) -> Admission {
        if !admission.is_refused() {
            return admission;
        }
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Admission::served(slot);
        }
        let now = Instant::now();
        if self.last_warning.is_some_and(|at| now.duration_since(at) < WARN_EVERY) {
            self.unlogged += 1;
        } else {
            let more = match std::mem::take(&mut self.unlogged) {
                0 => String::new(),
                unlogged => format!(" ({unlogged} more refused since the last warning)"),
            };
            tracing::warn!(
                "WebSocket connection from {peer} refused: WEBSOCKET_MAX_CONNECTIONS ({}) \
                 connections are open{more}; warning at most every {WARN_EVERY:?}",
                self.max_connections
            );
            self.last_warning = Some(now);
        }
        admission
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> std::net::SocketAddr {
        ([127, 0, 0, 1], 1).into()
    }

    #[tokio::test]
    async fn connections_past_the_slots_are_refused_until_one_closes() {
        let mut admissions = Admissions::new(2);
        let mut served = Vec::new();
        for _ in 0..2 {
            let admission = admissions.next().await.unwrap();
            served.push(admissions.decide(admission, peer()));
        }
        assert!(served.iter().all(|admission| !admission.is_refused()));
        let waiting = admissions.next().await.unwrap();
        assert!(waiting.is_refused(), "{waiting:?}");
        // a slot freed while the refusal waited for its connection: that one is served
        served.pop();
        let served_after_all = admissions.decide(waiting, peer());
        assert!(!served_after_all.is_refused(), "{served_after_all:?}");
        let refused = admissions.next().await.unwrap();
        assert!(admissions.decide(refused, peer()).is_refused());
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_slots_and_the_refusals_the_next_connection_waits() {
        let mut admissions = Admissions::new(1);
        let served = admissions.next().await.unwrap();
        let mut refusals = Vec::new();
        for _ in 0..REFUSING {
            let admission = admissions.next().await.unwrap();
            refusals.push(admissions.decide(admission, peer()));
        }
        assert!(refusals.iter().all(|admission| admission.is_refused()));
        let next = tokio::time::timeout(Duration::from_secs(60), admissions.next()).await;
        assert!(next.is_err(), "no connection is accepted past the slots and refusals");
        refusals.pop();
        let next = admissions.next().await.unwrap();
        assert!(next.is_refused(), "{next:?}");
        drop(served);
        let next = admissions.next().await.unwrap();
        assert!(!next.is_refused(), "{next:?}");
    }
}
