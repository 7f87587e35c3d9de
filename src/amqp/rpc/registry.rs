//! [`RpcRegistry`]: the RPC methods of one service instance, served by one consumer.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::pipeline::RouteHandle;
use crate::transport::connection_local::ConnectionLocal;
use crate::transport::SharedTransport;

static REGISTRIES: ConnectionLocal<RpcRegistry> = ConnectionLocal::new();

/// The RPC routes of a service instance by method name. Every `RPCListener` registers its
/// route at set-up; the first one to run consumes the service's request queue for all.
#[derive(Debug, Default)]
pub(crate) struct RpcRegistry {
    methods: Mutex<BTreeMap<String, RouteHandle>>,
    consuming: AtomicBool,
}

impl RpcRegistry {
    /// The registry of the service instance connected through `transport`.
    pub(crate) fn of(transport: &SharedTransport) -> Arc<RpcRegistry> {
        REGISTRIES.get_or_init(transport, RpcRegistry::default)
    }

    /// Drop the registry of `transport` (its service stopped).
    pub(crate) fn forget(transport: &SharedTransport) {
        REGISTRIES.remove(transport);
    }

    fn methods(&self) -> MutexGuard<'_, BTreeMap<String, RouteHandle>> {
        self.methods.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Serve `route` as the method named after it.
    pub(crate) fn register(&self, route: RouteHandle) {
        self.methods().insert(route.name().to_owned(), route);
    }

    /// Stop serving `method` on `transport`'s service instance; the registry goes when its
    /// last method does.
    pub(crate) fn unregister(transport: &SharedTransport, method: &str) {
        let registry = RpcRegistry::of(transport);
        let mut methods = registry.methods();
        methods.remove(method);
        if methods.is_empty() {
            RpcRegistry::forget(transport);
        }
    }

    /// The route of `method`.
    pub(crate) fn route(&self, method: &str) -> Option<RouteHandle> {
        self.methods().get(method).cloned()
    }

    /// True for the first caller only: it consumes the request queue.
    pub(crate) fn claim_consumer(&self) -> bool {
        !self.consuming.swap(true, Ordering::AcqRel)
    }

    /// The consumer's prefetch: `PREFETCH_COUNT` if set, else the sum of the routes' pool
    /// sizes, so that no method's requests can take every slot of another's.
    pub(crate) fn prefetch(&self, configured: Option<u16>) -> u16 {
        configured.unwrap_or_else(|| {
            self.methods().values().fold(0u16, |sum, route| sum.saturating_add(route.prefetch()))
        })
    }
}
