//! Starting a [`TestService`] with only some of its entrypoints (Nameko's
//! `restrict_entrypoints`).

use crate::config::Config;
use crate::error::Result;
use crate::pipeline::routes::Route;
use crate::runner::Runner;
use crate::testing::TestService;

impl TestService {
    /// Start `routes` with only the entrypoints of the routes named in `enabled`. The other
    /// routes are set up (their dependencies) without their entrypoint: nothing is declared
    /// or consumed for them, and tests call them through [`TestService::hook`]. A name that
    /// no route has stops the start.
    ///
    /// ```
    /// use micro_framework::prelude::*;
    /// use micro_framework::amqp::entrypoints::EventListener;
    /// use micro_framework::entrypoints::TimeEntrypoint;
    /// use micro_framework::testing::{test_config, TestService};
    ///
    /// fn on_paid(Payload(id): Payload<u64>) -> u64 { id }
    /// fn nightly() -> &'static str { "cleaned" }
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let routes = vec![
    ///     Route::new(on_paid).entrypoint(EventListener::new("shop", "paid")),
    ///     Route::new(nightly).entrypoint(TimeEntrypoint::cron("0 3 * * *").unwrap()),
    /// ];
    /// // the timer does not run by itself: the test fires it
    /// let service = TestService::start_only(routes, test_config("orders"), &["on_paid"])
    ///     .await
    ///     .unwrap();
    /// let cleaned: String = service.hook("nightly").unwrap().timer().await.unwrap();
    /// assert_eq!(cleaned, "cleaned");
    /// service.stop().await.unwrap();
    /// # });
    /// ```
    pub async fn start_only(routes: Vec<Route>, config: Config, enabled: &[&str]) -> Result<Self> {
        Self::start_runner_only(Runner::new(routes, config), enabled).await
    }

    /// [`TestService::start_only`] for a runner built by the test (see
    /// [`TestService::start_runner`]).
    pub async fn start_runner_only(runner: Runner, enabled: &[&str]) -> Result<Self> {
        Self::start_runner(runner.restrict_entrypoints(enabled)).await
    }
}
