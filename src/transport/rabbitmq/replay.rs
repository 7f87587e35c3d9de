//! The replay of the recorded topology on a new connection, and the reclaim of exclusive
//! queues the previous connection still holds.
//!
//! The client often notices a lost connection before the broker does (its own missed
//! heartbeat, a reset on its side): the broker keeps the old connection, and its exclusive
//! queues, until its heartbeat timeout. Declaring such a queue meanwhile fails with
//! `405 RESOURCE_LOCKED`; once the broker drops the old connection the queue is deleted.
//! So a locked queue is declared again (with its bindings) in the background, with backoff,
//! for as long as the old connection may live, and the consumers of the queue wait for it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use lapin::Channel;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::connection::{Link, Shared};
use super::error::{is_fatal, is_soft, map_error, reply_code};
use super::topology::{apply, prepare, Declaration};
use crate::transport::TransportError;

const NOT_FOUND: u16 = 404;
const RESOURCE_LOCKED: u16 = 405;

/// The heartbeat assumed when it is disabled, to bound the wait for a locked queue (without
/// heartbeats the broker only notices a dead connection through TCP).
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(60);

/// Added to the broker's heartbeat timeout: it checks the heartbeats once per interval, and
/// the client may have seen the loss a little after the last frame got through.
const LOCK_MARGIN: Duration = Duration::from_secs(5);

/// How long the previous connection may still hold its exclusive queues at the broker:
/// the broker drops a connection after two missed heartbeats, checked once per interval.
pub(crate) fn lock_window(heartbeat_secs: u16) -> Duration {
    let heartbeat = match heartbeat_secs {
        0 => DEFAULT_HEARTBEAT,
        secs => Duration::from_secs(u64::from(secs)),
    };
    heartbeat * 3 + LOCK_MARGIN
}

/// The exclusive queues being reclaimed, each with the generation of the link that does it.
#[derive(Debug, Default)]
pub(crate) struct Reclaims {
    queues: Mutex<HashMap<String, u64>>,
    ended: Notify,
}

impl Reclaims {
    fn queues(&self) -> MutexGuard<'_, HashMap<String, u64>> {
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The link of `generation` reclaims `queues` (before it is announced, so a consumer
    /// that resumes on it already knows to wait).
    pub(crate) fn begin(&self, queues: &[String], generation: u64) {
        let mut pending = self.queues();
        for queue in queues {
            pending.insert(queue.clone(), generation);
        }
    }

    /// True while `queue` is being reclaimed: a refused consume on it is not final.
    pub(crate) fn pending(&self, queue: &str) -> bool {
        self.queues().contains_key(queue)
    }

    /// Resolves at the next end of a reclaim.
    pub(crate) async fn ended(&self) {
        self.ended.notified().await;
    }

    fn end(&self, queue: &str, generation: u64) {
        let mut pending = self.queues();
        if pending.get(queue) == Some(&generation) {
            pending.remove(queue);
        }
        drop(pending);
        self.ended.notify_waiters();
    }
}

/// Declare the recorded topology on `link`, each step bounded by the connect timeout.
/// Returns the exclusive queues the previous connection still holds (their bindings skipped):
/// see [`reclaim`]. A queue the broker may have deleted by itself is only checked, and
/// forgotten with its bindings when gone.
pub(crate) async fn replay(shared: &Shared, link: &Link) -> Result<Vec<String>, TransportError> {
    let limit = shared.options.connect_timeout;
    let timed_out = || TransportError::TimedOut("topology replay timed out".into());
    let steps = shared.topology().replay(Instant::now());
    // Queues gone or locked: their bindings are not replayed.
    let mut skipped = HashSet::new();
    let mut locked = Vec::new();
    let mut channel = None;
    for step in &steps {
        let declaration = &step.declaration;
        if matches!(declaration, Declaration::Binding(b) if skipped.contains(&b.queue)) {
            continue;
        }
        // Recorded declarations were validated when first declared.
        let Ok((prepared, arguments)) = prepare(declaration) else { continue };
        let prepared = if step.check_first { prepared.passive() } else { prepared };
        let current = match channel.take() {
            Some(channel) => channel,
            None => tokio::time::timeout(limit, link.connection.create_channel())
                .await
                .map_err(|_| timed_out())?
                .map_err(|e| map_error(&e))?,
        };
        let applied = tokio::time::timeout(limit, apply(&current, prepared, arguments))
            .await
            .map_err(|_| timed_out())?;
        let error = match applied {
            Ok(_) => {
                channel = Some(current);
                continue;
            }
            Err(error) => error,
        };
        match (declaration, reply_code(&error)) {
            (Declaration::Queue(spec), Some(NOT_FOUND)) if step.check_first => {
                tracing::info!(queue = %spec.name, "the broker deleted the queue; no longer declared on reconnect");
                shared.topology().drop_queue(&spec.name, step.stamp);
                skipped.insert(spec.name.clone());
            }
            (Declaration::Queue(spec), Some(RESOURCE_LOCKED)) if spec.exclusive => {
                tracing::warn!(queue = %spec.name, "the previous connection still holds the exclusive queue; declaring it again once released");
                skipped.insert(spec.name.clone());
                locked.push(spec.name.clone());
            }
            _ if is_soft(&error) => {
                tracing::warn!(?declaration, error = %map_error(&error), "replaying a declaration failed");
            }
            _ if is_fatal(&error) => {
                // The broker closes the connection for this declaration: never replay it.
                tracing::warn!(?declaration, error = %map_error(&error), "dropping a declaration the broker rejects");
                shared.topology().forget(declaration);
                return Err(map_error(&error));
            }
            _ => return Err(map_error(&error)),
        }
    }
    if let Some(channel) = channel {
        let _ = tokio::time::timeout(limit, channel.close(200, "replay done".into())).await;
    }
    Ok(locked)
}

/// How one attempt to declare a locked queue again went.
enum Attempt {
    /// Declared with its bindings (or no longer recorded): done.
    Done,
    /// Still held by the previous connection.
    Locked,
    /// Refused otherwise: stop.
    Failed(TransportError),
}

/// Declare `queues` (exclusive queues the previous connection held at the replay) and their
/// bindings again on `link`, with backoff, until each is declared, their lock window (see
/// [`lock_window`]) ends, the link dies or the transport closes. On a new link, the replay
/// tries again.
pub(crate) async fn reclaim(shared: Arc<Shared>, link: Arc<Link>, mut queues: Vec<String>) {
    let window = lock_window(link.connection.configuration().heartbeat());
    let deadline = Instant::now() + window;
    let mut delay = shared.options.reconnect_min;
    while !queues.is_empty() {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = link.died() => break,
            () = shared.closed() => break,
        }
        delay = (delay * 2).min(shared.options.reconnect_max);
        let mut still = Vec::new();
        for queue in queues {
            match declare_again(&shared, &link, &queue).await {
                Attempt::Done => {
                    tracing::info!(queue = %queue, "exclusive queue declared again");
                    shared.reclaims.end(&queue, link.generation);
                }
                Attempt::Locked => still.push(queue),
                Attempt::Failed(error) => {
                    tracing::error!(queue = %queue, %error, "cannot declare the exclusive queue again");
                    shared.reclaims.end(&queue, link.generation);
                }
            }
        }
        queues = still;
        if !queues.is_empty() && Instant::now() >= deadline {
            for queue in &queues {
                tracing::error!(queue = %queue, ?window, "the exclusive queue is still held by the previous connection; giving up: it is not declared again and its consumers end");
            }
            break;
        }
    }
    for queue in &queues {
        shared.reclaims.end(queue, link.generation);
    }
}

/// One attempt at declaring an exclusive queue and its bindings again, on a channel of its own
/// (a refusal closes the channel).
async fn declare_again(shared: &Shared, link: &Link, queue: &str) -> Attempt {
    let declarations = shared.topology().queue_with_bindings(queue);
    if declarations.is_empty() {
        return Attempt::Done;
    }
    let limit = shared.options.connect_timeout;
    let attempt = async {
        let channel = link.guard(link.connection.create_channel()).await?;
        let result = declare_all(link, &channel, &declarations).await;
        if result.is_ok() {
            let _ = link.guard(channel.close(200, "reclaimed".into())).await;
        }
        result
    };
    match tokio::time::timeout(limit, attempt).await {
        Ok(Ok(())) => Attempt::Done,
        // The link's death ends the reclaim; the next link's replay declares the queue.
        _ if !link.alive() => Attempt::Locked,
        Ok(Err(error)) if reply_code(&error) == Some(RESOURCE_LOCKED) => Attempt::Locked,
        Ok(Err(error)) => Attempt::Failed(map_error(&error)),
        Err(_) => Attempt::Locked,
    }
}

async fn declare_all(
    link: &Link,
    channel: &Channel,
    declarations: &[Declaration],
) -> lapin::Result<()> {
    for declaration in declarations {
        // Recorded declarations were validated when first declared.
        let Ok((prepared, arguments)) = prepare(declaration) else { continue };
        link.guard(apply(channel, prepared, arguments)).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_window_outlasts_the_broker_heartbeat_timeout() {
        assert_eq!(lock_window(3), Duration::from_secs(14));
        assert_eq!(lock_window(0), Duration::from_secs(185));
    }

    #[tokio::test]
    async fn a_reclaim_ends_only_for_its_own_generation() {
        let reclaims = Reclaims::default();
        reclaims.begin(&["q".to_owned()], 1);
        reclaims.begin(&["q".to_owned()], 2);
        reclaims.end("q", 1);
        assert!(reclaims.pending("q"));
        reclaims.end("q", 2);
        assert!(!reclaims.pending("q"));
    }
}
