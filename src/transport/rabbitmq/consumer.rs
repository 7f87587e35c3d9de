//! Consumers (one channel each, per-consumer QoS, manual ack) that resume by themselves
//! after a reconnect. Their deliveries' acker is in `acker`.

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::Channel;
use tokio::sync::watch;
use tokio::time::Instant;

use super::acker::{to_delivery, Origin};
use super::channels::no_answer;
use super::connection::{Link, Shared};
use super::convert::short;
use super::error::{is_fatal, is_soft, map_error, reply_code};
use super::replay::lock_window;
use super::returns::LostConsumer;
use crate::clock::deadline_after;
use crate::transport::{ConsumeOptions, Consumer, Delivery, TransportError};

/// How many times a resume refused by the broker is retried before the consumer ends (not
/// counting refusals while the transport declares the consumer's exclusive queue again, nor
/// while the previous connection may still hold this exclusive consumer).
const RESUME_REFUSALS: u32 = 5;

/// `403 ACCESS_REFUSED`: RabbitMQ's refusal of a consume on a queue in exclusive use.
const ACCESS_REFUSED: u16 = 403;

/// What a consumer subscribes to.
#[derive(Clone, Debug)]
struct ConsumerSpec {
    /// The queue.
    queue: ShortString,
    /// The consumer tag, kept across reconnects.
    tag: ShortString,
    /// Per-consumer prefetch.
    prefetch: u16,
    /// Exclusive consumer.
    exclusive: bool,
}

/// Open a channel with per-consumer QoS and start consuming on it.
async fn subscribe(
    link: &Link,
    spec: &ConsumerSpec,
) -> lapin::Result<(Arc<Channel>, lapin::Consumer)> {
    let channel = link.connection.create_channel().await?;
    channel.basic_qos(spec.prefetch, BasicQosOptions { global: false }).await?;
    let options =
        BasicConsumeOptions { exclusive: spec.exclusive, ..BasicConsumeOptions::default() };
    let consumer = channel
        .basic_consume(spec.queue.clone(), spec.tag.clone(), options, FieldTable::default())
        .await?;
    Ok((Arc::new(channel), consumer))
}

/// Map an error of [`subscribe`]. RabbitMQ refuses a `basic.consume` with `403` when the
/// queue is in exclusive use: another consumer holds it exclusively, or this consume is
/// exclusive and the queue has consumers. That is [`TransportError::ResourceLocked`], as on
/// the in-process broker. (A user without read permission on the queue gets the same code;
/// only the reply text differs, and the framework does not classify by text. The text is
/// kept in the error.)
fn map_subscribe_error(error: &lapin::Error) -> TransportError {
    match (reply_code(error), map_error(error)) {
        (Some(ACCESS_REFUSED), TransportError::AccessRefused(text)) => {
            TransportError::ResourceLocked(text)
        }
        (_, mapped) => mapped,
    }
}

/// Subscribe (waiting for the connection up to the publish timeout) and return the
/// [`Consumer`], which resumes by itself after every reconnect.
///
/// The consumer reads lapin's stream directly when it is polled, with no task and channel
/// in between: each delivery wakes one task, the one that consumes.
pub(crate) async fn start(
    shared: Arc<Shared>,
    queue: &str,
    tag: &str,
    options: &ConsumeOptions,
) -> Result<Consumer, TransportError> {
    let spec = ConsumerSpec {
        queue: short(queue, "queue name")?,
        tag: short(tag, "consumer tag")?,
        prefetch: options.prefetch,
        exclusive: options.exclusive,
    };
    let deadline = deadline_after(shared.options.publish_timeout);
    let mut min_generation = 0;
    let mut closed_by_broker = false;
    let (link, channel, stream) = loop {
        let link = shared.link(min_generation, deadline).await?;
        // Bounded: on a connection gone silent, no answer comes until its heartbeat fails.
        let subscribed = tokio::time::timeout_at(deadline, link.guard(subscribe(&link, &spec)));
        match subscribed.await.map_err(|_| no_answer(&shared))? {
            Ok((channel, stream)) => break (link, channel, stream),
            // The broker closed the connection with a hard error: another operation's doing
            // (a consume on a channel of its own causes none), every one in flight gets it.
            // Tried once more on the next connection.
            Err(error) if is_fatal(&error) && !link.alive() && !closed_by_broker => {
                closed_by_broker = true;
                shared.kick();
                min_generation = link.generation + 1;
            }
            Err(error) if is_soft(&error) || is_fatal(&error) || link.alive() => {
                return Err(map_subscribe_error(&error))
            }
            Err(_) => {
                shared.kick();
                min_generation = link.generation + 1;
            }
        }
    };
    let (cancel, cancelled) = watch::channel(false);
    let tag = spec.tag.to_string();
    // Counted until the feeder drops (see its `Drop`).
    shared.topology().consumer_started(queue);
    // removed once the consumer is dropped or cancelled
    let entry = shared.consumer_links.subscribed(link.generation);
    let id = entry.id;
    let subscription = Subscription { link, channel, stream };
    let feeder = Feeder { shared, spec, id, cancelled, cancel_sent: false, failed: false };
    // The state is boxed: `unfold` moves it in and out of its future on every delivery.
    let deliveries =
        futures::stream::unfold(Box::new((feeder, Some(subscription))), |mut state| async move {
            let (feeder, subscription) = &mut *state;
            let delivery = feeder.next(subscription).await?;
            Some((delivery, state))
        });
    // Dropping the consumer drops lapin's, which cancels it at the broker.
    Ok(Consumer::from_stream(tag, deliveries, move || {
        let _ = cancel.send(true);
        drop(entry);
    }))
}

/// A live subscription: the connection, the channel and lapin's consumer on it.
struct Subscription {
    link: Arc<Link>,
    /// Shared with the ackers of its deliveries: a lapin `Channel` is costly to clone.
    channel: Arc<Channel>,
    stream: lapin::Consumer,
}

/// What the stream behind one [`Consumer`] keeps between deliveries.
struct Feeder {
    shared: Arc<Shared>,
    spec: ConsumerSpec,
    /// Its entry in the transport's [`ConsumerLinks`](super::consumer_links::ConsumerLinks).
    id: u64,
    cancelled: watch::Receiver<bool>,
    cancel_sent: bool,
    /// The current subscription's channel failed.
    failed: bool,
}

impl Drop for Feeder {
    fn drop(&mut self) {
        // The queue is no longer in use by this consumer: its `x-expires` lease runs again.
        self.shared.topology().consumer_ended(self.spec.queue.as_str());
    }
}

enum Step {
    Cancel,
    Closed,
    Died,
    Item(Box<Option<lapin::Result<lapin::message::Delivery>>>),
}

impl Feeder {
    /// The next delivery, resuming the subscription after a reconnect; `None` once the
    /// consumer ends (cancelled, closed, or given up by the broker).
    async fn next(&mut self, current: &mut Option<Subscription>) -> Option<Delivery> {
        let next = self.next_or_end(current).await;
        if next.is_none() && !self.cancel_sent && !self.shared.is_closed() {
            // ended by itself (refused, cancelled by the broker): its queue has no consumer
            // while its owner keeps it (a route trying to consume again)
            self.shared.consumer_links.unsubscribed(self.id);
        }
        next
    }

    /// [`Feeder::next`], before the end is recorded.
    async fn next_or_end(&mut self, current: &mut Option<Subscription>) -> Option<Delivery> {
        loop {
            let subscription = current.as_mut()?;
            if let Some(delivery) = self.forward(subscription).await {
                return Some(delivery);
            }
            let Subscription { link, channel, .. } = current.take()?;
            let channel_gone = self.failed || !link.alive() || !channel.status().connected();
            if channel_gone {
                let consumer =
                    LostConsumer { queue: self.spec.queue.as_str(), prefetch: self.spec.prefetch };
                self.shared.returns.channel_lost((link.generation, channel.id()), consumer);
            }
            if self.cancel_sent || self.shared.is_closed() {
                return None;
            }
            if !channel_gone {
                tracing::warn!(queue = %self.spec.queue, tag = %self.spec.tag, "consumer cancelled by the broker");
                return None;
            }
            let (link, channel, stream) = self.resume(&link).await?;
            self.shared.consumer_links.resumed(self.id, link.generation);
            tracing::info!(queue = %self.spec.queue, tag = %self.spec.tag, generation = link.generation, "consumer resumed");
            self.failed = false;
            *current = Some(Subscription { link, channel, stream });
        }
    }

    /// The next delivery of `subscription`; `None` once lapin's consumer ends (`failed` says
    /// whether with an error).
    async fn forward(&mut self, subscription: &mut Subscription) -> Option<Delivery> {
        let Subscription { link, channel, stream } = subscription;
        loop {
            let step = match self.ready(link, stream) {
                Some(item) => Step::Item(Box::new(item)),
                None => tokio::select! {
                    biased;
                    _ = self.cancelled.wait_for(|c| *c), if !self.cancel_sent => Step::Cancel,
                    _ = self.shared.closed() => Step::Closed,
                    () = link.died() => Step::Died,
                    item = stream.next() => Step::Item(Box::new(item)),
                },
            };
            match step {
                Step::Item(item) => match *item {
                    Some(Ok(delivery)) => {
                        let returns = &self.shared.returns;
                        let origin = Origin::Consumer { returns, queue: self.spec.queue.as_str() };
                        return Some(to_delivery(delivery, channel, link, origin));
                    }
                    Some(Err(error)) => {
                        tracing::debug!(queue = %self.spec.queue, error = %map_error(&error), "consumer channel failed");
                        self.failed = true;
                    }
                    None => return None,
                },
                Step::Cancel => {
                    // Keep draining: deliveries sent before cancel-ok are still handed out.
                    self.cancel_sent = true;
                    let tag = self.spec.tag.clone();
                    let cancel = channel.basic_cancel(tag, BasicCancelOptions::default());
                    if link.guard(cancel).await.is_err() {
                        self.failed = true;
                        return None;
                    }
                }
                Step::Closed => return None,
                Step::Died => {
                    self.failed = true;
                    return None;
                }
            }
        }
    }

    /// What lapin already holds for this consumer, taken without arming the waits of
    /// [`Feeder::forward`]'s select (under load a delivery is usually there); `None` when
    /// nothing is ready, or when a cancel, a close or a dead link must be seen first.
    fn ready(
        &self,
        link: &Link,
        stream: &mut lapin::Consumer,
    ) -> Option<Option<lapin::Result<lapin::message::Delivery>>> {
        let quiet = !self.cancel_sent
            && !*self.cancelled.borrow()
            && !self.shared.is_closed()
            && link.alive();
        if quiet {
            stream.next().now_or_never()
        } else {
            None
        }
    }

    /// Subscribe again once a usable connection is there. `None` when the consumer must end.
    async fn resume(
        &mut self,
        failed: &Link,
    ) -> Option<(Arc<Link>, Arc<Channel>, lapin::Consumer)> {
        let mut min_generation = failed.generation;
        if !failed.alive() {
            self.shared.kick();
            min_generation += 1;
        }
        let mut delay = self.shared.options.reconnect_min;
        let mut refusals = 0;
        let mut held_until = None;
        loop {
            let far = Instant::now() + Duration::from_secs(3600);
            let link = tokio::select! {
                link = self.shared.link(min_generation, far) => link,
                _ = self.cancelled.wait_for(|c| *c) => return None,
            };
            let link = match link {
                Ok(link) => link,
                Err(_) if self.shared.is_closed() => return None,
                Err(_) => continue,
            };
            match link.guard(subscribe(&link, &self.spec)).await {
                Ok((channel, stream)) => return Some((link, channel, stream)),
                Err(error)
                    if is_soft(&error)
                        && (self.shared.reclaims.pending(self.spec.queue.as_str())
                            || self.old_consumer_holds(&error, failed, &link, &mut held_until)) =>
                {
                    // The previous connection still holds the exclusive queue (`405`) or
                    // this exclusive consumer (`403`), or the broker just deleted the queue
                    // (`404`) and the reclaim declares it again.
                    tracing::info!(queue = %self.spec.queue, error = %map_subscribe_error(&error), "the consumer waits for the previous connection to release its queue");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.shared.reclaims.ended() => {}
                        _ = self.cancelled.wait_for(|c| *c) => return None,
                    }
                    delay = (delay * 2).min(self.shared.options.reconnect_max);
                    continue;
                }
                Err(error) if is_soft(&error) => {
                    refusals += 1;
                    tracing::warn!(queue = %self.spec.queue, error = %map_subscribe_error(&error), refusals, "broker refused to resume the consumer");
                    if refusals >= RESUME_REFUSALS {
                        return None;
                    }
                }
                Err(_) if !link.alive() => {
                    self.shared.kick();
                    min_generation = link.generation + 1;
                    continue;
                }
                Err(error) => {
                    tracing::warn!(queue = %self.spec.queue, error = %map_error(&error), "cannot resume the consumer");
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(self.shared.options.reconnect_max);
        }
    }

    /// True while a refused resume of this exclusive consumer on a new link may be its own
    /// consumer of the `failed` link, which the broker keeps (refusing others with `403`)
    /// until it notices that connection died: when the client saw the loss first, up to its
    /// heartbeat timeout. Ending sooner would drop the consumer for good (an RPC caller's
    /// reply consumer, and the replies on their way). `held_until` is set at the first such
    /// refusal.
    fn old_consumer_holds(
        &self,
        error: &lapin::Error,
        failed: &Link,
        link: &Link,
        held_until: &mut Option<Instant>,
    ) -> bool {
        if !self.spec.exclusive
            || reply_code(error) != Some(ACCESS_REFUSED)
            || link.generation == failed.generation
        {
            return false;
        }
        let window = lock_window(link.connection.configuration().heartbeat());
        Instant::now() < *held_until.get_or_insert_with(|| Instant::now() + window)
    }
}
