//! Confirm channels for mandatory publishes, each with one publish in flight at a time.
//!
//! A `basic.return` names no delivery tag: the broker only sends it before the confirm of
//! the same publish. lapin hands a returned message to the first confirm it settles after
//! it, which, with several publishes in flight on the channel (a multiple ack, or another
//! confirm settled in between), may be another publish's: a routed publish would be told it
//! was unroutable, and the unroutable one that it was delivered. With one publish in flight
//! per channel, the confirm settled after a return is the returned publish's own.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::FutureExt;
use lapin::Channel;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

use super::channels::{open_held, Held};
use super::connection::Shared;
use crate::transport::TransportError;

/// How many channels of a connection carry mandatory publishes at most; more publishes wait
/// for one of them.
const MAX_CHANNELS: usize = 64;

/// The wait for the confirm of a publish abandoned in flight (its caller stopped waiting):
/// its channel takes no other publish before that confirm.
type Settling = Pin<Box<dyn Future<Output = lapin::Result<()>> + Send>>;

struct Idle {
    held: Held,
    settling: Option<Settling>,
}

enum Next {
    Ready(Held),
    /// Wait for this one's last publish to settle.
    Wait(Held, Settling),
    Open,
}

#[derive(Default)]
struct Pool {
    idle: Vec<Idle>,
    /// Channels open: idle or leased.
    open: usize,
}

/// The mandatory publishes' channels of one transport.
pub(crate) struct MandatoryChannels {
    leases: Semaphore,
    pool: Mutex<Pool>,
}

impl MandatoryChannels {
    pub(crate) fn new() -> Self {
        MandatoryChannels { leases: Semaphore::new(MAX_CHANNELS), pool: Mutex::default() }
    }

    fn pool(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A channel on a link of at least `min_generation` with no publish in flight: an idle
    /// one whose last publish is settled, else a new one, else (all open) an idle one once
    /// its last publish settles.
    pub(crate) async fn lease(
        &self,
        shared: &Shared,
        min_generation: u64,
        deadline: Instant,
    ) -> Result<Lease<'_>, TransportError> {
        let permit = match tokio::time::timeout_at(deadline, self.leases.acquire()).await {
            Ok(Ok(permit)) => permit,
            // the semaphore is never closed
            Ok(Err(_)) | Err(_) => return Err(busy(shared)),
        };
        match self.next(min_generation) {
            Next::Ready(held) => return Ok(Lease::new(self, held, permit)),
            Next::Open => {}
            Next::Wait(held, mut settling) => {
                match tokio::time::timeout_at(deadline, &mut settling).await {
                    Ok(Ok(())) => return Ok(Lease::new(self, held, permit)),
                    // that channel failed: a new one takes its place
                    Ok(Err(_)) => {}
                    Err(_) => {
                        self.pool().idle.push(Idle { held, settling: Some(settling) });
                        return Err(busy(shared));
                    }
                }
            }
        }
        match open_held(shared, min_generation, deadline, true).await {
            Ok(held) => Ok(Lease::new(self, held, permit)),
            Err(error) => {
                self.pool().open -= 1;
                Err(error)
            }
        }
    }

    /// What the next lease takes, counting a channel to open as open.
    fn next(&self, min_generation: u64) -> Next {
        let mut pool = self.pool();
        let mut unsettled = Vec::new();
        let mut next = None;
        while let Some(mut idle) = pool.idle.pop() {
            if !idle.held.usable(min_generation) {
                pool.open -= 1;
                continue;
            }
            match idle.settling.as_mut().map(FutureExt::now_or_never) {
                None | Some(Some(Ok(()))) => {
                    next = Some(Next::Ready(idle.held));
                    break;
                }
                Some(None) => unsettled.push(idle),
                Some(Some(Err(_))) => pool.open -= 1,
            }
        }
        let next = next.unwrap_or_else(|| match unsettled.pop() {
            // all open: the permit this lease holds leaves at least one of them idle
            Some(Idle { held, settling: Some(settling) }) if pool.open >= MAX_CHANNELS => {
                Next::Wait(held, settling)
            }
            idle => {
                unsettled.extend(idle);
                pool.open += 1;
                Next::Open
            }
        });
        pool.idle.extend(unsettled);
        next
    }
}

fn busy(shared: &Shared) -> TransportError {
    TransportError::TimedOut(format!(
        "no channel for a mandatory publish to {} within {:?}: {MAX_CHANNELS} in use",
        shared.nodes.masked(),
        shared.options.publish_timeout
    ))
}

/// One channel, for one publish; back to the pool when dropped, unless discarded.
pub(crate) struct Lease<'a> {
    channels: &'a MandatoryChannels,
    held: Held,
    in_flight: bool,
    discarded: bool,
    _permit: SemaphorePermit<'a>,
}

impl<'a> Lease<'a> {
    fn new(channels: &'a MandatoryChannels, held: Held, permit: SemaphorePermit<'a>) -> Self {
        Lease { channels, held, in_flight: true, discarded: false, _permit: permit }
    }

    /// The leased channel and its link.
    pub(crate) fn held(&self) -> &Held {
        &self.held
    }

    /// The publish's confirm came. Until then the channel, back in the pool, is not handed
    /// out again before that confirm.
    pub(crate) fn settled(&mut self) {
        self.in_flight = false;
    }

    /// The channel failed: it goes out of the pool.
    pub(crate) fn discard(&mut self) {
        self.discarded = true;
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut pool = self.channels.pool();
        if self.discarded {
            pool.open -= 1;
        } else {
            let settling = self.in_flight.then(|| settling(self.held.channel.clone()));
            pool.idle.push(Idle { held: self.held.clone(), settling });
        }
    }
}

fn settling(channel: Arc<Channel>) -> Settling {
    // Also drains what lapin kept of the abandoned publish (its returned message).
    Box::pin(async move { channel.wait_for_confirms().await.map(drop) })
}
