//! [`WsRegistry`]: the WebSocket commands of one service instance.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use serde_json::Value;

use crate::data::ufw_wire::target_detail;

use crate::pipeline::RouteHandle;

/// The WebSocket routes of a service instance by command name. Every `WebSocketEntrypoint`
/// registers its route at set-up.
#[derive(Debug, Default)]
pub(crate) struct WsRegistry {
    commands: Mutex<BTreeMap<String, RouteHandle>>,
}

impl WsRegistry {
    fn commands(&self) -> MutexGuard<'_, BTreeMap<String, RouteHandle>> {
        self.commands.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Serve `route` as the command named after it.
    pub(crate) fn register(&self, route: RouteHandle) {
        self.commands().insert(route.name().to_owned(), route);
    }

    /// The route of `command`.
    pub(crate) fn route(&self, command: &str) -> Option<RouteHandle> {
        self.commands().get(command).cloned()
    }

    /// What `__list_targets__` and `__get_target__` describe of a command.
    pub(crate) fn target_detail(&self, command: &str) -> Option<Value> {
        self.commands().contains_key(command).then(|| target_detail(command))
    }

    /// Every command's detail, by name.
    pub(crate) fn target_details(&self) -> Vec<Value> {
        self.commands().keys().map(|command| target_detail(command)).collect()
    }
}
