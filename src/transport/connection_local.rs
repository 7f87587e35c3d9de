//! [`ConnectionLocal`]: one value per broker connection (per service instance).
//!
//! Routes and calls of a service share its transport, so the transport's identity names the
//! service instance: the RPC method registry and the reply queue hang on it. An entry goes
//! away with its transport (it keeps only a weak reference to it).

use std::sync::{Arc, Mutex, Weak};

use crate::transport::{SharedTransport, Transport};

type Entry<T> = (Weak<dyn Transport>, Arc<T>);

/// Values of type `T`, one per live transport.
pub(crate) struct ConnectionLocal<T> {
    entries: Mutex<Vec<Entry<T>>>,
}

impl<T> ConnectionLocal<T> {
    /// An empty map (usable in a `static`).
    pub(crate) const fn new() -> Self {
        ConnectionLocal { entries: Mutex::new(Vec::new()) }
    }

    /// The value of `transport`, made with `init` if it has none.
    pub(crate) fn get_or_init(
        &self,
        transport: &SharedTransport,
        init: impl FnOnce() -> T,
    ) -> Arc<T> {
        let mut entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        entries.retain(|(weak, _)| weak.strong_count() > 0);
        if let Some((_, value)) = entries.iter().find(|(weak, _)| same(weak, transport)) {
            return value.clone();
        }
        let value = Arc::new(init());
        entries.push((Arc::downgrade(transport), value.clone()));
        value
    }

    /// The value of `transport`, if it has one.
    pub(crate) fn get(&self, transport: &SharedTransport) -> Option<Arc<T>> {
        let entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        entries
            .iter()
            .find(|(weak, _)| weak.strong_count() > 0 && same(weak, transport))
            .map(|(_, value)| value.clone())
    }

    /// Forget the value of `transport`.
    pub(crate) fn remove(&self, transport: &SharedTransport) {
        let mut entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        entries.retain(|(weak, _)| weak.strong_count() > 0 && !same(weak, transport));
    }
}

fn same(weak: &Weak<dyn Transport>, transport: &SharedTransport) -> bool {
    std::ptr::addr_eq(weak.as_ptr(), Arc::as_ptr(transport))
}
