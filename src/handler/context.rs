//! [`WorkerContext`]: everything a call can draw its arguments from.

use std::sync::{Arc, OnceLock};

use serde_json::Value;

use crate::config::Config;
use crate::data::BackOffData;
use crate::data::CallContext;
use crate::data::{DecodeError, Message};
use crate::data::{Failure, TargetRole};
use crate::handler::dependencies::DependencyValues;
use crate::handler::ServiceState;
use crate::transport::SharedTransport;

/// The context of one call, from which extractors ([`crate::FromContext`]) take the target's
/// arguments: an extractor of your own reads it (the call's payload, headers, context data
/// and configuration), as [`crate::FromContext`]'s example shows.
#[derive(Debug)]
pub struct WorkerContext {
    pub(crate) service: Arc<str>,
    pub(crate) route: Arc<str>,
    pub(crate) role: TargetRole,
    /// Shared with the entrypoint, which may still need it once handled (an RPC reply).
    pub(crate) message: Arc<Message>,
    /// Set before the call on a route with translators; otherwise decoded when first asked
    /// for, so that a target that takes no payload costs no parse.
    pub(crate) payload: OnceLock<Result<Value, DecodeError>>,
    pub(crate) call: CallContext,
    pub(crate) config: Arc<Config>,
    pub(crate) failure: Option<Failure>,
    pub(crate) transport: SharedTransport,
    pub(crate) dependencies: Arc<DependencyValues>,
    pub(crate) state: ServiceState,
    pub(crate) retry: BackOffData,
    /// A lone call (no other call of the route's worker pool runs, and none ended just
    /// before): a sync target may run on the calling thread rather than hop to a blocking one.
    pub(crate) lone_call: bool,
}

impl WorkerContext {
    /// The service's name.
    pub fn service_name(&self) -> &str {
        &self.service
    }

    /// The route's name.
    pub fn route_name(&self) -> &str {
        &self.route
    }

    /// Whether this call runs the target or the callback.
    pub fn role(&self) -> TargetRole {
        self.role
    }

    /// The incoming message, as received.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The payload after decoding and translation, or why it could not be decoded.
    pub fn payload(&self) -> Result<&Value, &DecodeError> {
        self.payload.get_or_init(|| self.message.decode()).as_ref()
    }

    /// True once the payload is decoded (translated, or asked for).
    pub(crate) fn payload_decoded(&self) -> bool {
        self.payload.get().is_some()
    }

    /// Call ids and context data.
    pub fn call(&self) -> &CallContext {
        &self.call
    }

    /// The service's configuration.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// The failure being called back, in a callback.
    pub fn failure(&self) -> Option<&Failure> {
        self.failure.as_ref()
    }

    /// The broker connection.
    pub fn transport(&self) -> &SharedTransport {
        &self.transport
    }

    /// The values shared by every call of this service instance.
    pub fn service_state(&self) -> &ServiceState {
        &self.state
    }

    /// The value a dependency provided for this call.
    pub fn dependency<T: Clone + Send + Sync + 'static>(&self) -> Option<T> {
        self.dependencies.get::<T>()
    }

    /// Why the dependency of output `T` gave no value for this call, when it failed to (a
    /// callback runs without it).
    pub(crate) fn dependency_failure<T: 'static>(&self) -> Option<&str> {
        self.dependencies.failure::<T>()
    }
}
