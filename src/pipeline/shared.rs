//! [`SharedExtension`]: a part of a service instance that several of its entrypoints share.

use std::any::type_name;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use futures::future::BoxFuture;

use crate::error::Result;

/// What a started shared extension does until the service stops.
pub type Serving = BoxFuture<'static, Result<()>>;

/// A part of a service instance shared by several of its entrypoints (the RPC request
/// consumer, the HTTP server, the WebSocket server), as Nameko's shared extensions: the first
/// route that asks for it during set-up makes it
/// ([`RouteHandle::shared_extension`](crate::pipeline::RouteHandle::shared_extension)), the
/// others get the same one; once every route is set up the runner starts it and runs what
/// it returns until the service stops. A service only set up to read its topology never
/// starts it.
#[async_trait]
pub trait SharedExtension: Send + Sync + 'static {
    /// Called once every route is set up, before any message flows: bind sockets, check what
    /// the routes registered (an error stops the start), and return the future that serves
    /// until the service stops, then finishes as the worker mode says.
    async fn start(self: Arc<Self>) -> Result<Serving>;
}

/// A shared extension with its type's name, for logs.
pub(crate) type NamedExtension = (&'static str, Arc<dyn SharedExtension>);

/// The shared extensions a service instance made, in the order they were made.
#[derive(Clone, Default)]
pub(crate) struct SharedExtensions {
    made: Arc<Mutex<Vec<NamedExtension>>>,
}

impl SharedExtensions {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Vec<NamedExtension>> {
        self.made.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Remember `extension` to be started and run with the service.
    pub(crate) fn add<T: SharedExtension>(made: &mut Vec<NamedExtension>, extension: Arc<T>) {
        made.push((type_name::<T>(), extension));
    }

    /// Every extension made, to start and run; the list is left empty.
    pub(crate) fn take(&self) -> Vec<NamedExtension> {
        std::mem::take(&mut *self.lock())
    }
}

impl fmt::Debug for SharedExtensions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.lock().iter().map(|(name, _)| *name).collect();
        f.debug_struct("SharedExtensions").field("made", &names).finish()
    }
}
