//! A reusable channel that is reopened after a channel error or a reconnect.

use std::future::Future;
use std::sync::Arc;

use lapin::options::ConfirmSelectOptions;
use lapin::Channel;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::connection::{Link, Shared};
use super::error::{is_fatal, is_soft, map_error};
use crate::clock::deadline_after;
use crate::transport::TransportError;

/// A channel and the link it belongs to.
#[derive(Clone)]
pub(crate) struct Held {
    /// The connection the channel is on.
    pub(crate) link: Arc<Link>,
    /// The channel, shared: a lapin `Channel` holds a dozen reference counts, each bumped on
    /// a clone, and a channel is handed to every publish.
    pub(crate) channel: Arc<Channel>,
}

impl AsRef<Held> for Held {
    fn as_ref(&self) -> &Held {
        self
    }
}

impl Held {
    pub(crate) fn usable(&self, min_generation: u64) -> bool {
        self.link.generation >= min_generation
            && self.link.alive()
            && self.channel.status().connected()
    }
}

/// Where [`run_on`] takes the channel of each attempt from.
pub(crate) trait ChannelSource {
    /// A channel and what goes with it.
    type Taken: AsRef<Held> + Clone;

    /// A usable channel on a link of at least `min_generation`, opened if needed.
    async fn take(
        &mut self,
        shared: &Shared,
        min_generation: u64,
        deadline: Instant,
    ) -> Result<Self::Taken, TransportError>;

    /// Forget the channel [`ChannelSource::take`] gave last: an operation on it failed.
    fn discard(&mut self);
}

/// A slot holding the current channel of one purpose (publishing, declarations).
pub(crate) struct ChannelSlot {
    confirm: bool,
    current: Mutex<Option<Held>>,
}

impl ChannelSlot {
    /// An empty slot; `confirm` puts its channels in publisher-confirm mode.
    pub(crate) fn new(confirm: bool) -> Self {
        ChannelSlot { confirm, current: Mutex::new(None) }
    }

    /// A usable channel on a link of at least `min_generation`, opened if needed.
    pub(crate) async fn get(
        &self,
        shared: &Shared,
        min_generation: u64,
        deadline: Instant,
    ) -> Result<Held, TransportError> {
        let mut slot = self.current.lock().await;
        Current { confirm: self.confirm, slot: &mut slot }
            .take(shared, min_generation, deadline)
            .await
    }

    /// Drop `held` from the slot if it is still the current channel.
    pub(crate) async fn invalidate(&self, held: &Held) {
        let mut slot = self.current.lock().await;
        if slot.as_ref().is_some_and(|current| {
            current.link.generation == held.link.generation
                && current.channel.id() == held.channel.id()
        }) {
            *slot = None;
        }
    }

    /// Run `op` on this slot's channel, one operation at a time (see [`run_on`]).
    pub(crate) async fn run<T, F, Fut>(&self, shared: &Shared, op: F) -> Result<T, TransportError>
    where
        F: FnMut(Held) -> Fut,
        Fut: Future<Output = lapin::Result<T>>,
    {
        let deadline = deadline_after(shared.options.publish_timeout);
        let mut slot = self.current.lock().await;
        let mut current = Current { confirm: self.confirm, slot: &mut slot };
        run_on(shared, &mut current, false, deadline, op).await
    }
}

/// The locked content of a [`ChannelSlot`].
struct Current<'a> {
    confirm: bool,
    slot: &'a mut Option<Held>,
}

impl ChannelSource for Current<'_> {
    type Taken = Held;

    async fn take(
        &mut self,
        shared: &Shared,
        min_generation: u64,
        deadline: Instant,
    ) -> Result<Held, TransportError> {
        if let Some(held) = self.slot.as_ref().filter(|held| held.usable(min_generation)) {
            return Ok(held.clone());
        }
        *self.slot = None;
        let held = open_held(shared, min_generation, deadline, self.confirm).await?;
        *self.slot = Some(held.clone());
        Ok(held)
    }

    fn discard(&mut self) {
        *self.slot = None;
    }
}

/// Run `op` on a channel of `source` by `deadline` (the publish timeout, counted from before
/// the caller waited for its turn).
///
/// A broker refusal (soft error) is returned as is and the channel is discarded, so the next
/// operation gets another; a lost connection waits for the reconnect and retries.
/// `harmless` operations never make the broker close the connection (`basic.get`): one that
/// gets a hard error (another operation's, on the connection the broker closed) is tried
/// once more on the next connection.
pub(crate) async fn run_on<S, T, F, Fut>(
    shared: &Shared,
    source: &mut S,
    harmless: bool,
    deadline: Instant,
    mut op: F,
) -> Result<T, TransportError>
where
    S: ChannelSource,
    F: FnMut(S::Taken) -> Fut,
    Fut: Future<Output = lapin::Result<T>>,
{
    let mut min_generation = 0;
    let mut failures_while_connected = 0;
    let mut closed_by_broker = false;
    loop {
        let taken = source.take(shared, min_generation, deadline).await?;
        let held = taken.as_ref().clone();
        let operation = held.link.guard(op(taken));
        let error = match tokio::time::timeout_at(deadline, operation).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) => error,
            Err(_) => {
                source.discard();
                return Err(no_answer(shared));
            }
        };
        source.discard();
        if is_soft(&error) {
            held.link.channel_refused();
        }
        let elsewhere = harmless && is_fatal(&error) && !held.link.alive();
        if elsewhere && !closed_by_broker {
            closed_by_broker = true;
            shared.kick();
            min_generation = held.link.generation + 1;
            continue;
        }
        if is_soft(&error) || is_fatal(&error) {
            shared.kick();
            return Err(map_error(&error));
        }
        if held.link.alive() {
            failures_while_connected += 1;
            if failures_while_connected > 1 {
                return Err(map_error(&error));
            }
        } else {
            shared.kick();
            min_generation = held.link.generation + 1;
        }
    }
}

/// A new channel (`confirm`: in publisher-confirm mode) on a link of at least
/// `min_generation`, waiting for a reconnect when the link dies under it.
pub(crate) async fn open_held(
    shared: &Shared,
    mut min_generation: u64,
    deadline: Instant,
    confirm: bool,
) -> Result<Held, TransportError> {
    loop {
        let link = shared.link(min_generation, deadline).await?;
        // Bounded: on a connection gone silent, no answer comes until its heartbeat fails.
        let opened = tokio::time::timeout_at(deadline, link.guard(open_channel(&link, confirm)));
        match opened.await.map_err(|_| no_answer(shared))? {
            Ok(channel) => return Ok(Held { link, channel: Arc::new(channel) }),
            Err(error) if link.alive() && !link.had_channels_refused() => {
                return Err(map_error(&error))
            }
            Err(error) => {
                if link.alive() {
                    // lapin numbers channels in turn up to channel_max, then again from 1: a
                    // number whose channel the broker closed fails every open, with that
                    // channel's old error, and is lost (a cluster-wide timer's follower, one
                    // per tick, ran out of channels within channel_max ticks). Only a new
                    // connection has them all again.
                    tracing::warn!(
                        error = %map_error(&error),
                        "a channel cannot be opened on a connection whose channels the broker \
                         closed before: reconnecting"
                    );
                    link.close(CLOSE_LIMIT).await;
                }
                shared.kick();
                min_generation = link.generation + 1;
            }
        }
    }
}

/// How long closing a connection whose channels ran out may take.
const CLOSE_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The error of an operation the broker did not answer within the publish timeout.
pub(crate) fn no_answer(shared: &Shared) -> TransportError {
    TransportError::TimedOut(format!(
        "no answer from {} within {:?}",
        shared.nodes.masked(),
        shared.options.publish_timeout
    ))
}

pub(crate) async fn open_channel(link: &Link, confirm: bool) -> lapin::Result<Channel> {
    let channel = link.connection.create_channel().await?;
    if confirm {
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
    }
    Ok(channel)
}
