//! [`RouteWaiter`]: wait for the next call of a route, and get how it ended (Nameko's
//! `entrypoint_waiter`).

use std::time::Duration;

use serde_json::Value;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::broadcast::Receiver;
use tokio_util::sync::CancellationToken;

use crate::data::bounded;
use crate::error::{Error, Result};
use crate::pipeline::FinishedCall;
use crate::testing::{TestService, WAIT_LIMIT};

/// How many of the calls seen a timeout error quotes, and how much of each payload.
const QUOTED_CALLS: usize = 5;
const QUOTED_PAYLOAD: usize = 200;

/// A test of a call's JSON payload.
type PayloadPredicate = Box<dyn Fn(&Value) -> bool + Send + Sync>;

/// Waits for the next call of a route that finishes (optionally one whose payload matches),
/// from the moment the waiter was made: make it before what triggers the call.
///
/// ```
/// use micro_framework::prelude::*;
/// use micro_framework::amqp::entrypoints::EventListener;
/// use micro_framework::testing::{test_config, TestService};
/// use serde_json::{json, Value};
///
/// fn on_paid(Payload(order): Payload<Value>) -> Result<u64, String> {
///     order["id"].as_u64().ok_or_else(|| "no id".to_owned())
/// }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let routes = vec![Route::new(on_paid).entrypoint(EventListener::new("shop", "paid"))];
/// let service = TestService::start(routes, test_config("orders")).await.unwrap();
///
/// let waiter = service.waiter("on_paid").unwrap().matching(|order| order["id"] == 2);
/// service.dispatch("shop", "paid", &json!({"id": 1})).await.unwrap();
/// service.dispatch("shop", "paid", &json!({"id": 2})).await.unwrap();
/// let call = waiter.wait().await.unwrap();
/// assert_eq!(call.result::<u64>().unwrap(), 2);
/// // calls run concurrently: let both finish, so the next waiter cannot see the first
/// service.wait_for_route("on_paid", 2).await.unwrap();
///
/// let failing = service.waiter("on_paid").unwrap();
/// service.dispatch("shop", "paid", &json!({"ref": "x"})).await.unwrap();
/// assert_eq!(failing.wait().await.unwrap().result::<u64>().unwrap_err().message, "no id");
/// service.stop().await.unwrap();
/// # });
/// ```
pub struct RouteWaiter {
    route: String,
    calls: Receiver<FinishedCall>,
    /// Fires once the service has stopped: no call can come any more, though the test's
    /// `TestService` (between `begin_stop` and `wait_stopped`) keeps the route's channel open.
    stopped: CancellationToken,
    matches: Option<PayloadPredicate>,
    limit: Duration,
}

impl std::fmt::Debug for RouteWaiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteWaiter")
            .field("route", &self.route)
            .field("matching", &self.matches.is_some())
            .field("limit", &self.limit)
            .finish()
    }
}

impl TestService {
    /// A waiter for the next call of `route` that finishes from now on.
    pub fn waiter(&self, route: &str) -> Result<RouteWaiter> {
        let calls = self.route(route)?.watch_calls();
        let stopped = self.service().stopped().clone();
        Ok(RouteWaiter {
            route: route.to_owned(),
            calls,
            stopped,
            matches: None,
            limit: WAIT_LIMIT,
        })
    }
}

impl RouteWaiter {
    /// Wait only for a call whose JSON payload (`null` when the body is not JSON) satisfies
    /// `predicate`.
    pub fn matching(mut self, predicate: impl Fn(&Value) -> bool + Send + Sync + 'static) -> Self {
        self.matches = Some(Box::new(predicate));
        self
    }

    /// Wait at most `limit` (default [`WAIT_LIMIT`]).
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.limit = limit;
        self
    }

    /// The call, once it finished. Fails after the time limit with an error naming the route
    /// and the calls seen meanwhile, or when the service stops.
    pub async fn wait(mut self) -> Result<FinishedCall> {
        let mut seen = Vec::new();
        let mut missed = 0;
        let waited = tokio::time::timeout(self.limit, async {
            loop {
                let received = tokio::select! {
                    biased;
                    received = self.calls.recv() => received,
                    // the calls that finished before the stop are still handed over
                    () = self.stopped.cancelled() => match self.calls.try_recv() {
                        Ok(call) => Ok(call),
                        Err(TryRecvError::Lagged(count)) => Err(RecvError::Lagged(count)),
                        Err(TryRecvError::Empty | TryRecvError::Closed) => Err(RecvError::Closed),
                    },
                };
                match received {
                    Ok(call) => {
                        let payload = call.payload();
                        if self.matches.as_ref().is_none_or(|matches| matches(&payload)) {
                            return Ok(call);
                        }
                        seen.push(payload);
                    }
                    Err(RecvError::Lagged(count)) => missed += count,
                    Err(RecvError::Closed) => return Err(()),
                }
            }
        })
        .await;
        match waited {
            Ok(Ok(call)) => Ok(call),
            Ok(Err(())) => {
                Err(Error::Stopped(format!("route '{}' stopped before the call came", self.route)))
            }
            Err(_) => Err(Error::Timeout(self.nothing_came(&seen, missed))),
        }
    }

    fn nothing_came(&self, seen: &[Value], missed: u64) -> String {
        let wanted = if self.matches.is_some() { "no matching call" } else { "no call" };
        let mut text = format!(
            "route '{}': {wanted} finished within {:?}; {} other call(s) seen",
            self.route,
            self.limit,
            seen.len()
        );
        for payload in seen.iter().take(QUOTED_CALLS) {
            text.push_str(&format!(
                "\n  payload {}",
                bounded(&payload.to_string(), QUOTED_PAYLOAD)
            ));
        }
        if missed > 0 {
            text.push_str(&format!("\n  and {missed} call(s) missed (the waiter fell behind)"));
        }
        text
    }
}
