//! [`DeadLetters`]: a command's connection to a dead-letter queue, and the messages it read
//! and holds until it hands them back.
//!
//! Reading does not consume: messages are fetched with `basic.get` and held unacknowledged
//! until the command is done, then handed back with a `basic.nack` (requeue) each, the oldest
//! first, before the connection closes. That keeps the queue's order: a classic queue puts
//! each message back at its place, and a quorum queue delivers the returned messages first,
//! in the order they came back. (Closing the connection with the messages unsettled instead
//! returned them channel by channel, out of order, on a quorum queue.) Only what settles a
//! message is held, not the message: each one is printed as it is read, so memory does not
//! grow with the queue.
//!
//! Handing a message back is not free on a quorum queue: before RabbitMQ 4.3 every return (a
//! nack, a reject, a closed channel or connection) counts a delivery of the message
//! (`x-delivery-count`), and past the queue's delivery-limit the broker drops it, for good
//! (a dead letter has no dead-letter exchange). RabbitMQ 4.0 to 4.2 set a delivery-limit of
//! 20 on every quorum queue by default (earlier versions only where a policy sets one), so
//! about 20 listings there would delete the dead letters. RabbitMQ 4.3 no longer counts a
//! nack (it still counts a reject and a close), which is why the messages go back by nack.
//! The queue's declaration cannot lift the limit (RabbitMQ refuses to declare an existing
//! queue again with other arguments), so a read that meets a message carrying the count
//! (`x-delivery-count`: a quorum queue) warns of it once, on stderr.
//!
//! The transport reconnects by itself when the connection is lost; the broker then puts back
//! the messages read so far, and `basic.get` would read them again. So a read checks the
//! connection before and after each get, and a loss fails the command.

use std::io::Write;
use std::time::{Duration, Instant};

use bytes::Bytes;
use micro_framework::transport::{Acker, Delivery, Properties, SharedTransport, TransportError};

use crate::broker;
use crate::error::CliError;
use crate::names;

/// The header a quorum queue adds to the messages it delivers: how many times each was
/// handed back (RabbitMQ 3.x adds it from the first delivery on, at 0; 4.x once it is 1).
const DELIVERY_COUNT: &str = "x-delivery-count";

/// A dead letter read, its acker held by the [`DeadLetters`] that read it.
pub struct DeadLetter {
    /// Its place in the queue when read: 0 is the oldest.
    pub index: usize,
    /// The exchange it was published to.
    pub exchange: String,
    /// The routing key it was published with.
    pub routing_key: String,
    /// Its properties and headers.
    pub properties: Properties,
    /// Its body.
    pub body: Bytes,
}

/// How the messages held went back to the queue.
#[must_use]
pub enum HandBack {
    /// Each by a nack, in order, on the connection that read them.
    InOrder,
    /// The connection was lost while they were read or held: the broker put them back itself.
    ByTheBroker,
}

/// A connection and the dead-letter queue it works on.
pub struct DeadLetters {
    transport: SharedTransport,
    queue: String,
    count: usize,
    /// The transport's count of reconnections when the queue was opened: another count means
    /// the connection the held messages came on is gone.
    reconnects: u64,
    /// What settles the dead letters read so far, the oldest first.
    held: Vec<Box<dyn Acker>>,
    /// Whether the counting of deliveries on a quorum queue was warned of.
    warned_of_counting: bool,
}

impl DeadLetters {
    /// Check the name, connect and check that the dead-letter queue of `queue` exists.
    pub async fn open(uri: &str, queue: &str) -> Result<Self, CliError> {
        let queue = if queue.ends_with(".dlq") { queue.to_owned() } else { format!("{queue}.dlq") };
        names::check("the dead-letter queue", &queue)?;
        let config = broker::config(uri, None)?;
        let transport = broker::connect(&config).await?;
        let reconnects = transport.reconnects();
        match transport.queue_info(&queue).await {
            Ok(info) => Ok(DeadLetters {
                transport,
                queue,
                count: info.message_count as usize,
                reconnects,
                held: Vec::new(),
                warned_of_counting: false,
            }),
            Err(error) => {
                transport.close().await;
                Err(match error {
                    TransportError::NotFound(_) => {
                        CliError::failure(format!("queue '{queue}' does not exist"))
                    }
                    other => CliError::failure(format!("cannot inspect '{queue}': {other}")),
                })
            }
        }
    }

    /// The dead-letter queue's name.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// How many messages the queue held when it was opened.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The connection.
    pub fn transport(&self) -> &SharedTransport {
        &self.transport
    }

    /// How many dead letters were read and are held.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// The next dead letter, held until [`close`](Self::close); `None` once none is left.
    /// Fails once the connection was lost: the broker put back what was read, which would be
    /// read again.
    pub async fn read(&mut self) -> Result<Option<DeadLetter>, CliError> {
        let delivery = match self.take().await {
            Ok(Some(delivery)) => delivery,
            Ok(None) => return Ok(None),
            // what was printed cannot be trusted: say so
            Err(_) if !self.connection_kept() => return Err(self.lost()),
            Err(error) => return Err(error),
        };
        let Delivery { exchange, routing_key, properties, body, acker, .. } = delivery;
        let index = self.held.len();
        self.hold(acker);
        // only a quorum queue writes it (the framework removes it from the copies it
        // publishes): reading this queue counts deliveries
        if properties.headers.contains_key(DELIVERY_COUNT) {
            self.warn_of_counting();
        }
        Ok(Some(DeadLetter { index, exchange, routing_key, properties, body }))
    }

    /// The next dead letter, for the caller to settle or [`hold`](Self::hold); `None` once
    /// none is left. Fails once the connection was lost, as [`read`](Self::read).
    pub async fn take(&mut self) -> Result<Option<Delivery>, CliError> {
        let lost = || {
            CliError::failure(format!(
                "the connection to the broker was lost while reading '{}': the broker put back \
                 the dead letters read and not removed",
                self.queue
            ))
        };
        if !self.connection_kept() {
            return Err(lost());
        }
        let got = self.transport.get(&self.queue).await;
        // a get the transport retried on a new connection read from the head of the queue
        // again; held, the delivery goes back with the others, in order
        if !self.connection_kept() {
            let error = lost();
            if let Ok(Some(delivery)) = got {
                self.hold(delivery.acker);
            }
            return Err(error);
        }
        got.map_err(|error| CliError::failure(format!("cannot read '{}': {error}", self.queue)))
    }

    /// Keep `acker` unsettled until [`close`](Self::close) hands its message back.
    pub fn hold(&mut self, acker: Box<dyn Acker>) {
        self.held.push(acker);
    }

    /// Hand the held messages back, the oldest first, and close the connection.
    pub async fn close(self) -> HandBack {
        let mut kept = self.connection_kept();
        let mut returns = Returns::start(&self.transport, &self.queue).await;
        for acker in &self.held {
            // a nack, not a reject: RabbitMQ 4.3 and later do not count it as a delivery
            if acker.nack(true).await.is_err() {
                // its channel is gone: the broker put the message back itself
                kept = false;
                returns = None;
            }
            if let Some(returning) = &mut returns {
                if !returning.one_more().await {
                    returns = None;
                }
            }
        }
        self.transport.close().await;
        if kept {
            HandBack::InOrder
        } else {
            HandBack::ByTheBroker
        }
    }

    /// The error of a read that cannot go on: the connection was lost.
    pub fn lost(&self) -> CliError {
        lost_while_reading(&self.queue, self.held.len())
    }

    /// True while the connection the held messages came on is up.
    fn connection_kept(&self) -> bool {
        self.transport.is_connected() && self.transport.reconnects() == self.reconnects
    }

    /// Say once that reading a quorum queue counts deliveries.
    fn warn_of_counting(&mut self) {
        if std::mem::replace(&mut self.warned_of_counting, true) {
            return;
        }
        // stderr may be closed too: the warning is not worth failing the command for
        let _ = writeln!(
            std::io::stderr(),
            "warning: {} is a quorum queue (its messages carry {DELIVERY_COUNT}): on RabbitMQ \
             before 4.3 each reading counts a delivery against every message read, and past \
             the queue's delivery-limit (20 by default on RabbitMQ 4.0 to 4.2) the broker drops \
             the message; replay or purge the dead letters rather than list them repeatedly",
            self.queue
        );
    }
}

/// The messages handed back, each waited for before the next is: the transport reads on
/// several channels while deliveries are held (a channel per get, up to 32), and the broker
/// takes the nacks of different channels in no set order, while a quorum queue delivers the
/// returned messages in the order they came back. A message is back once the queue's count
/// of ready messages says so (a round trip per message, as its get was).
struct Returns<'a> {
    transport: &'a SharedTransport,
    queue: &'a str,
    /// The ready messages the queue is to count once the last nack is taken.
    expected: u32,
}

impl<'a> Returns<'a> {
    /// How long a message may take to be back before the rest go without waiting: another
    /// consumer of the queue takes them, say, and the count never gets there.
    const PATIENCE: Duration = Duration::from_secs(2);

    /// `None` when the queue's count cannot be read: the messages go back without waiting.
    async fn start(transport: &'a SharedTransport, queue: &'a str) -> Option<Self> {
        let ready = transport.queue_info(queue).await.ok()?.message_count;
        Some(Returns { transport, queue, expected: ready })
    }

    /// Wait for one more message to be back; `false` when it did not come in time (or the
    /// count cannot be read), after which waiting is pointless.
    async fn one_more(&mut self) -> bool {
        self.expected = self.expected.saturating_add(1);
        let deadline = Instant::now() + Self::PATIENCE;
        while Instant::now() < deadline {
            match self.transport.queue_info(self.queue).await {
                Ok(info) if info.message_count >= self.expected => return true,
                Ok(_) => tokio::task::yield_now().await,
                Err(_) => return false,
            }
        }
        false
    }
}

/// The error of a read of `queue` whose connection was lost after `read` messages.
pub fn lost_while_reading(queue: &str, read: usize) -> CliError {
    CliError::failure(format!(
        "the connection to the broker was lost while reading '{queue}' ({read} dead letters \
         read): the broker put them back, so the output above is incomplete and may repeat \
         messages (it cannot be taken back); the dead letters are still in the queue: run the \
         command again"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_connection_says_what_to_do() {
        let error = lost_while_reading("q.dlq", 3).to_string();
        assert!(error.contains("'q.dlq' (3 dead letters read)"), "{error}");
        assert!(error.contains("run the command again"), "{error}");
    }
}
