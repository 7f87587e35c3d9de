//! Settling deliveries: the in-memory [`Acker`].

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Weak;

use async_trait::async_trait;

use crate::transport::{Acker, ClosedPart, TransportError};

use super::broker::{MemoryBroker, Settle};

/// Settles one delivery; dropping it unsettled hands the message back to its queue.
pub(super) struct MemoryAcker {
    broker: Weak<MemoryBroker>,
    tag: u64,
    settled: AtomicBool,
}

impl MemoryAcker {
    /// The acker of delivery `tag`.
    pub fn new(broker: Weak<MemoryBroker>, tag: u64) -> Self {
        MemoryAcker { broker, tag, settled: AtomicBool::new(false) }
    }

    fn settle(&self, how: Settle) -> Result<(), TransportError> {
        if self.settled.swap(true, Ordering::AcqRel) {
            return Err(TransportError::AlreadySettled);
        }
        match self.broker.upgrade() {
            Some(broker) => broker.settle(self.tag, how),
            None => Err(TransportError::Closed {
                what: ClosedPart::Transport,
                reason: "the in-memory broker is gone".to_owned(),
            }),
        }
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self) -> Result<(), TransportError> {
        self.settle(Settle::Ack)
    }

    async fn nack(&self, requeue: bool) -> Result<(), TransportError> {
        self.settle(if requeue { Settle::Requeue } else { Settle::Discard })
    }

    async fn reject(&self, requeue: bool) -> Result<(), TransportError> {
        self.nack(requeue).await
    }
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        if !*self.settled.get_mut() {
            if let Some(broker) = self.broker.upgrade() {
                // Unknown tags (transport closed, message already handed back) are fine here.
                let _ = broker.settle(self.tag, Settle::Requeue);
            }
        }
    }
}

impl fmt::Debug for MemoryAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryAcker")
            .field("delivery_tag", &self.tag)
            .field("settled", &self.settled.load(Ordering::Relaxed))
            .finish()
    }
}
