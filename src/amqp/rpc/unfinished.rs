//! [`Unfinished`]: deletes a reply queue whose set-up did not finish.

use crate::transport::SharedTransport;

/// A reply queue being set up, deleted unless [`Unfinished::finish`] is called: a set-up that
/// failed, or whose caller gave up (its own timeout, an aborted task), leaves a queue that no
/// slot holds, so nothing else would delete it, and on RabbitMQ the transport would declare it
/// again after every reconnect.
#[must_use = "dropped, it deletes the queue"]
pub(super) struct Unfinished {
    transport: SharedTransport,
    /// The queue, until the set-up is finished.
    queue: Option<String>,
}

impl Unfinished {
    /// Watch `queue`: armed before it is declared, since a declare the caller abandons may
    /// still reach the broker.
    pub(super) fn new(transport: &SharedTransport, queue: &str) -> Self {
        Unfinished { transport: transport.clone(), queue: Some(queue.to_owned()) }
    }

    /// The queue is in its slot: whoever empties the slot deletes it.
    pub(super) fn finish(mut self) {
        self.queue = None;
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        let Some(queue) = self.queue.take() else { return };
        // a drop cannot await: the delete runs on its own, if a runtime is there to run it
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::debug!("cannot delete the unfinished reply queue {queue}: no runtime");
            return;
        };
        let transport = self.transport.clone();
        runtime.spawn(async move {
            if let Err(error) = transport.delete_queue(&queue).await {
                tracing::debug!("cannot delete the unfinished reply queue {queue}: {error}");
            }
        });
    }
}
