//! The channels `basic.get`s run on, chosen so that a get the broker refuses takes no
//! delivery of an earlier get along.
//!
//! RabbitMQ answers a get it refuses (`404` of a missing queue, `405` of another
//! connection's exclusive queue, `403` without read permission) by closing the channel, and
//! takes back every delivery still unsettled on that channel: their settlements then fail
//! and the messages are delivered again, their work done twice. So a get runs on a channel
//! that holds no unsettled delivery: the current one while all its deliveries are settled
//! (a loop that settles each delivery before the next get keeps using one channel), else a
//! new one, which becomes the current. Each delivery keeps its channel open until it is
//! settled, so a channel left behind closes with the settlement of its last delivery.
//!
//! A caller may hold thousands of deliveries (the CLI's `dlq list` holds every dead letter it
//! read until it closes), more than the channels a connection may open (2,047 by default on
//! RabbitMQ). Once [`MAX_HOLDING`] channels are left behind, a get of a queue runs on one
//! that holds deliveries of that same queue only, when there is one: its refusal takes only
//! those along, whose queue was deleted (their messages with it: none comes again) or made
//! unreadable meanwhile.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use lapin::options::BasicGetOptions;
use lapin::types::ShortString;
use lapin::Channel;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::acker::{to_delivery, Origin};
use super::channels::{open_held, run_on, ChannelSource, Held};
use super::connection::{Link, Shared};
use crate::clock::deadline_after;
use crate::transport::{Delivery, TransportError};

/// How many channels left behind with unsettled deliveries a transport keeps before a get
/// runs on the latest that holds deliveries of its queue (it opens one while none does).
pub(crate) const MAX_HOLDING: usize = 32;

/// The count of a channel's unsettled deliveries of gets, kept by their ackers.
#[derive(Debug, Default)]
pub(crate) struct Unsettled(AtomicUsize);

impl Unsettled {
    /// A get fetched one more delivery on the channel.
    pub(crate) fn fetched(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    /// A delivery's settlement was sent (a get sent after it reaches the broker after it), or
    /// its channel is gone.
    pub(crate) fn settled(&self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }

    fn none(&self) -> bool {
        self.0.load(Ordering::SeqCst) == 0
    }
}

/// The channels of one transport's gets.
#[derive(Default)]
pub(crate) struct GetChannels {
    /// Locked for the whole of each get: a get chooses its channel by what the earlier ones
    /// fetched, counted once they return.
    channels: Mutex<Channels>,
}

impl GetChannels {
    /// A `basic.get` (manual ack) of `queue`, on a channel whose closing by the broker takes
    /// no delivery of another get along.
    pub(crate) async fn get(
        &self,
        shared: &Shared,
        queue: ShortString,
    ) -> Result<Option<Delivery>, TransportError> {
        let deadline = deadline_after(shared.options.publish_timeout);
        let mut channels = self.channels.lock().await;
        let mut pick = Pick { channels: &mut channels, queue: &queue, taken: None };
        run_on(shared, &mut pick, true, deadline, |taken: Taken| {
            let queue = queue.clone();
            async move {
                let options = BasicGetOptions { no_ack: false };
                let message = taken.held.channel.basic_get(queue, options).await?;
                let origin = Origin::Get(&taken.unsettled);
                Ok(message.map(|m| {
                    to_delivery(m.delivery, &taken.held.channel, &taken.held.link, origin)
                }))
            }
        })
        .await
    }

    /// How many channels for gets are open: the current one and those left behind that
    /// deliveries still hold.
    #[cfg(test)]
    pub(crate) async fn channels_open(&self) -> usize {
        let channels = self.channels.lock().await;
        let current = channels.current.as_ref().filter(|current| current.held.usable(0));
        let left_behind = channels.left_behind.iter().filter_map(|left| left.held(0)).count();
        usize::from(current.is_some()) + left_behind
    }
}

#[derive(Default)]
struct Channels {
    /// The channel gets run on while it holds no unsettled delivery.
    current: Option<GetChannel>,
    /// Former current channels with unsettled deliveries, which alone keep them open.
    left_behind: Vec<LeftBehind>,
}

/// A channel for gets, the count of its unsettled deliveries, and the queue they come from
/// (they are never of two queues: a get runs on a channel holding deliveries only when they
/// are of its queue).
struct GetChannel {
    held: Held,
    unsettled: Arc<Unsettled>,
    queue: ShortString,
}

/// A [`GetChannel`] that is no longer the current, known only while its deliveries keep it.
struct LeftBehind {
    channel: Weak<Channel>,
    link: Weak<Link>,
    unsettled: Arc<Unsettled>,
    queue: ShortString,
}

impl LeftBehind {
    fn of(current: &GetChannel) -> Self {
        LeftBehind {
            channel: Arc::downgrade(&current.held.channel),
            link: Arc::downgrade(&current.held.link),
            unsettled: current.unsettled.clone(),
            queue: current.queue.clone(),
        }
    }

    /// The channel, while a delivery keeps it open and it is usable.
    fn held(&self, min_generation: u64) -> Option<Held> {
        let held = Held { channel: self.channel.upgrade()?, link: self.link.upgrade()? };
        held.usable(min_generation).then_some(held)
    }
}

/// A channel given to a get, and the count its delivery joins.
#[derive(Clone)]
struct Taken {
    held: Held,
    unsettled: Arc<Unsettled>,
}

impl AsRef<Held> for Taken {
    fn as_ref(&self) -> &Held {
        &self.held
    }
}

/// The channels, locked for one get of `queue`.
struct Pick<'a> {
    channels: &'a mut Channels,
    queue: &'a ShortString,
    /// Which channel was taken last.
    taken: Option<Which>,
}

/// The current channel, or one left behind.
enum Which {
    Current,
    LeftBehind(Weak<Channel>),
}

impl Pick<'_> {
    /// The current channel if it holds no unsettled delivery; one that does is left behind.
    fn idle_current(&mut self, min_generation: u64) -> Option<Taken> {
        let current = self.channels.current.take()?;
        if !current.held.usable(min_generation) {
            return None;
        }
        if !current.unsettled.none() {
            self.channels.left_behind.push(LeftBehind::of(&current));
            return None;
        }
        let taken = Taken { held: current.held.clone(), unsettled: current.unsettled.clone() };
        self.channels.current = Some(GetChannel { queue: self.queue.clone(), ..current });
        Some(taken)
    }

    /// Once [`MAX_HOLDING`] channels are left behind, the latest that holds deliveries of
    /// this get's queue.
    fn sharing(&self, min_generation: u64) -> Option<Taken> {
        let left_behind = &self.channels.left_behind;
        if left_behind.len() < MAX_HOLDING {
            return None;
        }
        left_behind.iter().rev().filter(|left| left.queue == *self.queue).find_map(|left| {
            let held = left.held(min_generation)?;
            Some(Taken { held, unsettled: left.unsettled.clone() })
        })
    }
}

impl ChannelSource for Pick<'_> {
    type Taken = Taken;

    async fn take(
        &mut self,
        shared: &Shared,
        min_generation: u64,
        deadline: Instant,
    ) -> Result<Taken, TransportError> {
        // Those whose deliveries are all settled are closed (or closing) by now.
        self.channels.left_behind.retain(|left| left.held(0).is_some());
        if let Some(taken) = self.idle_current(min_generation) {
            self.taken = Some(Which::Current);
            return Ok(taken);
        }
        if let Some(taken) = self.sharing(min_generation) {
            self.taken = Some(Which::LeftBehind(Arc::downgrade(&taken.held.channel)));
            return Ok(taken);
        }
        let held = open_held(shared, min_generation, deadline, false).await?;
        let unsettled = Arc::new(Unsettled::default());
        let taken = Taken { held: held.clone(), unsettled: unsettled.clone() };
        self.channels.current = Some(GetChannel { held, unsettled, queue: self.queue.clone() });
        self.taken = Some(Which::Current);
        Ok(taken)
    }

    fn discard(&mut self) {
        match self.taken.take() {
            Some(Which::Current) => self.channels.current = None,
            Some(Which::LeftBehind(channel)) => {
                self.channels.left_behind.retain(|left| !left.channel.ptr_eq(&channel));
            }
            None => {}
        }
    }
}
