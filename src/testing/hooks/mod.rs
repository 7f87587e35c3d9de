//! [`EntrypointHook`]: call a route of a [`TestService`] through what its entrypoint would
//! hand it (Nameko's `entrypoint_hook`), and get the target's result or its failure back.

mod error;
#[cfg(feature = "http")]
mod http;
mod requests;

use std::time::SystemTime;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::amqp::entrypoints::{event_delivery, rpc_request};
use crate::data::{Failure, Handled, HeaderValue, Headers, Message};
use crate::pipeline::entrypoint_kind::Kind;
use crate::pipeline::RouteHandle;
use crate::testing::TestService;

pub use error::HookError;
pub(crate) use error::{call_result, typed};
#[cfg(feature = "http")]
pub use http::{HttpCall, HttpResponse};
pub(crate) use requests::{arguments, encoded};

/// Calls one route of a running [`TestService`] as its entrypoint would: the message is the
/// one the entrypoint builds (an event delivery, an RPC request, a WebSocket command, an HTTP
/// request, a timer's firing), and the call goes through the real route: its translators, its
/// dependencies, its in-worker `BackOff` retries and its callback. It waits for a worker slot
/// like any call (`MAX_WORKERS` applies) and counts in the route's stats and metrics.
///
/// Nothing goes through the broker: nothing is acked, dead-lettered or replied, and a failure
/// that an `AsyncBackOff` would retry on the broker is returned at once.
///
/// ```
/// use micro_framework::prelude::*;
/// use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
/// use micro_framework::amqp::rpc::Args;
/// use micro_framework::testing::{test_config, TestService};
///
/// #[derive(serde::Deserialize)]
/// struct Order { id: u64, amount: f64 }
///
/// fn on_paid(Payload(order): Payload<Order>) -> u64 { order.id }
/// fn total(Args((a, b)): Args<(f64, f64)>) -> f64 { a + b }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let routes = vec![
///     Route::new(on_paid).entrypoint(EventListener::new("shop", "paid")),
///     Route::new(total).entrypoint(RPCListener::new()),
/// ];
/// let service = TestService::start(routes, test_config("orders")).await.unwrap();
/// let paid = service.hook("on_paid").unwrap();
/// let id: u64 = paid.event(&serde_json::json!({"id": 7, "amount": 9.5})).await.unwrap();
/// assert_eq!(id, 7);
/// let sum: f64 = service.hook("total").unwrap().rpc([1.5, 2.0], ()).await.unwrap();
/// assert_eq!(sum, 3.5);
/// service.stop().await.unwrap();
/// # });
/// ```
#[derive(Clone, Debug)]
pub struct EntrypointHook {
    route: RouteHandle,
    headers: Headers,
}

impl TestService {
    /// A hook calling the route `route` as its entrypoint would; an unknown name is
    /// [`HookError::UnknownRoute`].
    pub fn hook(&self, route: &str) -> Result<EntrypointHook, HookError> {
        match self.service().route(route) {
            Some(handle) => Ok(EntrypointHook { route: handle.clone(), headers: Headers::new() }),
            None => Err(HookError::UnknownRoute {
                route: route.to_owned(),
                known: self.service().route_names().map(str::to_owned).collect(),
            }),
        }
    }
}

impl EntrypointHook {
    /// Add the header `name` to the events and RPC requests this hook sends: context data
    /// such as `nameko.language` or `nameko.call_id_stack` (Nameko's `context_data`).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<HeaderValue>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Call an [`EventListener`](crate::amqp::entrypoints::EventListener)'s route with the
    /// event `payload`, delivered as from the source service's exchange. An event the
    /// listener's filter skips is [`HookError::Skipped`].
    pub async fn event<T: DeserializeOwned>(
        &self,
        payload: &(impl Serialize + ?Sized),
    ) -> Result<T, HookError> {
        let Some(Kind::Event { source_service, event_name, accept }) = self.kind() else {
            return Err(self.wrong_entrypoint("an EventListener"));
        };
        let config = self.route.config();
        let message =
            event_delivery(config, source_service, event_name, payload, self.headers.clone());
        let message = encoded(self.route.name(), message)?;
        match accept(&message) {
            Ok(true) => self.call(message).await,
            Ok(false) => {
                self.route.skipped();
                Err(HookError::Skipped { route: self.route.name().to_owned() })
            }
            // the filter cannot tell: bad input, as the listener settles it
            Err(reason) => {
                let handled = Handled::Failed(Failure::bad_input(reason));
                self.route.settled(&handled);
                call_result(self.route.name(), handled)
            }
        }
    }

    /// Call an [`RPCListener`](crate::amqp::entrypoints::RPCListener)'s route as
    /// `method(*args, **kwargs)`: `args` a list (or `()`), `kwargs` a map (or `()`), read by
    /// the target's [`Args`](crate::amqp::rpc::Args) as those of a request from a caller.
    pub async fn rpc<T: DeserializeOwned>(
        &self,
        args: impl Serialize,
        kwargs: impl Serialize,
    ) -> Result<T, HookError> {
        let Some(Kind::Rpc { protocol, .. }) = self.kind() else {
            return Err(self.wrong_entrypoint("an RPCListener"));
        };
        let (args, kwargs) = arguments(self.route.name(), args, kwargs)?;
        let (config, method) = (self.route.config(), self.route.name());
        let message = rpc_request(config, *protocol, method, args, kwargs, self.headers.clone());
        self.call(message).await
    }

    /// Call a [`WebSocketEntrypoint`](crate::websocket::WebSocketEntrypoint)'s route as the
    /// command `{route}(*args, **kwargs)`. Where the server refuses a command when no worker
    /// is free, the hook waits for one.
    #[cfg(feature = "websocket")]
    pub async fn websocket<T: DeserializeOwned>(
        &self,
        args: impl Serialize,
        kwargs: impl Serialize,
    ) -> Result<T, HookError> {
        let Some(Kind::WebSocket) = self.kind() else {
            return Err(self.wrong_entrypoint("a WebSocketEntrypoint"));
        };
        let (args, kwargs) = arguments(self.route.name(), args, kwargs)?;
        let command = self.route.name().to_owned();
        let request = crate::data::ufw_wire::Request { id: None, command, args, kwargs };
        self.call(crate::websocket::command_message(request)).await
    }

    /// Fire a [`TimeEntrypoint`](crate::entrypoints::TimeEntrypoint)'s route now, by tokio's
    /// clock as the timer's own ticks are: on a paused test clock, the time it was moved to.
    pub async fn timer<T: DeserializeOwned>(&self) -> Result<T, HookError> {
        self.timer_at(crate::clock::wall_now()).await
    }

    /// Fire a [`TimeEntrypoint`](crate::entrypoints::TimeEntrypoint)'s route as at
    /// `fired_at`: the payload is that time, written as the timer writes it.
    pub async fn timer_at<T: DeserializeOwned>(
        &self,
        fired_at: SystemTime,
    ) -> Result<T, HookError> {
        let Some(Kind::Timer) = self.kind() else {
            return Err(self.wrong_entrypoint("a TimeEntrypoint"));
        };
        let Some(fired_at) = crate::timer::python_datetime(fired_at) else {
            let reason = format!(
                "{fired_at:?} is outside the years 1 to 9999, which a timer's payload (a Python \
                 datetime) can hold"
            );
            return Err(HookError::Request { route: self.route.name().to_owned(), reason });
        };
        let message = crate::timer::tick_message(fired_at);
        self.call(encoded(self.route.name(), message)?).await
    }

    /// Hand `message` to the route as it is, whatever its entrypoint (a work queue's message,
    /// a custom entrypoint's, a hand-made event).
    pub async fn message<T: DeserializeOwned>(&self, message: Message) -> Result<T, HookError> {
        self.call(message).await
    }

    /// The route's entrypoint kind.
    fn kind(&self) -> Option<&Kind> {
        self.route.entrypoint().map(|entrypoint| &entrypoint.kind)
    }

    fn wrong_entrypoint(&self, expected: &'static str) -> HookError {
        let actual = self.route.entrypoint().map(|entrypoint| entrypoint.description.clone());
        HookError::WrongEntrypoint {
            route: self.route.name().to_owned(),
            expected,
            actual: actual.unwrap_or_else(|| "no entrypoint".to_owned()),
        }
    }

    /// Handle `message` in a worker slot, count it as settled, and give its result.
    async fn call<T: DeserializeOwned>(&self, message: Message) -> Result<T, HookError> {
        let route = &self.route;
        let Some(permit) = route.acquire().await else {
            return Err(HookError::Stopping { route: route.name().to_owned() });
        };
        let handled = match route.handle(permit, message).await {
            // no broker to schedule the retry on: the attempt's failure is the call's
            Handled::Retry { failure, .. } => Handled::Failed(failure),
            handled => handled,
        };
        route.settled(&handled);
        call_result(route.name(), handled)
    }
}
