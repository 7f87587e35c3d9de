//! Tests on tokio's paused clock: waiting with a limit of the test clock.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::testing::TestService;

impl TestService {
    /// Wait until `route` has settled at least `count` messages in all, for at most `limit`
    /// of tokio's time.
    ///
    /// On the in-process broker, retries (delay queues, the delayed-message plugin's delays,
    /// in-worker back-offs), message TTLs, `x-expires`, timers and RPC timeouts keep tokio's
    /// time. Under a paused clock (`#[tokio::test(start_paused = true)]`, with tokio's
    /// `test-util` feature among the dev-dependencies) the clock jumps to the next of them
    /// whenever nothing else is left to do, so a test of minutes of retries takes
    /// milliseconds and sees exact times. Limits run on the same clock: wait longer than
    /// the schedule under test (the ten seconds of [`wait_for_route`](Self::wait_for_route)
    /// pass before a second retry ten seconds apart).
    ///
    /// Sync targets run on tokio's blocking pool, which holds the paused clock still while
    /// they run. Limits: their blocking helpers (`dispatch_blocking`, `call_blocking`) need a
    /// multi-threaded runtime, which cannot be paused (use async targets in such tests);
    /// process worker modes and RabbitMQ keep real time.
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use std::time::Duration;
    /// use micro_framework::amqp::entrypoints::EventListener;
    /// use micro_framework::dependencies::Shared;
    /// use micro_framework::prelude::*;
    /// use micro_framework::retry::AsyncBackOff;
    /// use micro_framework::testing::{memory_test_config, TestService};
    /// use tokio::time::Instant;
    ///
    /// type Attempts = Arc<Mutex<Vec<Instant>>>;
    ///
    /// fn charge(Dep(attempts): Dep<Attempts>) -> Result<(), String> {
    ///     attempts.lock().unwrap().push(Instant::now());
    ///     Err("the bank is down".into())
    /// }
    ///
    /// // #[tokio::test(start_paused = true)]
    /// async fn charges_are_retried_five_times_ten_seconds_apart() {
    ///     let attempts = Attempts::default();
    ///     let route = Route::new(charge)
    ///         .entrypoint(EventListener::new("shop", "paid"))
    ///         .backoff(AsyncBackOff::new(5, Duration::from_secs(10)))
    ///         .dependency(Shared(attempts.clone()));
    ///     let service = TestService::start(vec![route], memory_test_config("billing")).await.unwrap();
    ///     service.dispatch("shop", "paid", "order 1").await.unwrap();
    ///     // six attempts: fifty seconds of the test clock, milliseconds of real time
    ///     service.wait_for_route_within("charge", 6, Duration::from_secs(60)).await.unwrap();
    ///     let attempts = attempts.lock().unwrap().clone();
    ///     for pair in attempts.windows(2) {
    ///         assert_eq!((pair[1] - pair[0]).as_secs(), 10);
    ///     }
    ///     service.stop().await.unwrap();
    /// }
    /// # tokio::runtime::Builder::new_current_thread()
    /// #     .enable_all()
    /// #     .start_paused(true)
    /// #     .build()
    /// #     .unwrap()
    /// #     .block_on(charges_are_retried_five_times_ten_seconds_apart());
    /// ```
    pub async fn wait_for_route_within(
        &self,
        route: &str,
        count: u64,
        limit: Duration,
    ) -> Result<()> {
        let stats = self.route(route)?.stats();
        // a stopped service settles nothing more: waiting out the limit would only hide why
        let stopped = self.service().stopped().clone();
        let waited = tokio::time::timeout(limit, async {
            tokio::select! {
                () = stats.wait_settled(count) => true,
                () = stopped.cancelled() => stats.settled_count() >= count,
            }
        });
        match waited.await {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::Stopped(format!(
                "route '{route}' settled {} of {count} messages before its service stopped",
                stats.settled_count()
            ))),
            Err(_) => Err(Error::Timeout(format!(
                "route '{route}' settled {} of {count} messages in {limit:?}",
                stats.settled_count()
            ))),
        }
    }
}
