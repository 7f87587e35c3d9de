//! [`TestService`]: a service running under test.

use serde::Serialize;

use crate::amqp::dependencies::Producer;
use crate::config::Config;
use crate::data::Message;
use crate::error::{Error, Result};
use crate::pipeline::routes::Route;
use crate::pipeline::RouteHandle;
use crate::runner::{Runner, RunningService};
use crate::testing::broker::BrokerLease;
use crate::testing::{take_messages, WAIT_LIMIT};
use crate::transport::SharedTransport;

/// A running service under test.
#[derive(Debug)]
pub struct TestService {
    service: RunningService,
    config: Config,
    // after `service`: a RabbitMQ virtual host goes once the service has closed its connection
    _broker: BrokerLease,
}

impl TestService {
    /// Start `routes` with `config` (see [`test_config`](crate::testing::test_config)).
    pub async fn start(routes: Vec<Route>, config: Config) -> Result<Self> {
        Self::start_runner(Runner::new(routes, config)).await
    }

    /// Start a runner built by the test (contexts, runner dependencies), with the config it
    /// was built with.
    pub async fn start_runner(runner: Runner) -> Result<Self> {
        #[cfg(feature = "process")]
        let runner = crate::testing::process::prepare(runner).await;
        let config = runner.config().clone();
        let _broker = BrokerLease::for_config(&config);
        Ok(TestService { service: runner.spawn_service().await?, config, _broker })
    }

    /// The broker connection of the service.
    pub fn transport(&self) -> &SharedTransport {
        self.service.transport()
    }

    /// The running service.
    pub fn service(&self) -> &RunningService {
        &self.service
    }

    /// See [`RunningService::is_ready`].
    pub fn is_ready(&self) -> bool {
        self.service.is_ready()
    }

    /// A running route.
    pub fn route(&self, name: &str) -> Result<&RouteHandle> {
        self.service.route(name).ok_or_else(|| Error::UnknownRoute {
            route: name.to_owned(),
            known: self.service.route_names().map(str::to_owned).collect(),
        })
    }

    /// Dispatch an event as `source_service` would.
    pub async fn dispatch<T: Serialize + ?Sized>(
        &self,
        source_service: &str,
        event: &str,
        payload: &T,
    ) -> Result<()> {
        let config = self.config.clone().with_service_name(source_service.to_owned());
        Producer::new(self.transport().clone(), &config).dispatch(event, payload).await
    }

    /// Wait until `route` has settled at least `count` messages in all, for at most
    /// [`WAIT_LIMIT`].
    pub async fn wait_for_route(&self, route: &str, count: u64) -> Result<()> {
        self.wait_for_route_within(route, count, WAIT_LIMIT).await
    }

    /// Messages ready in `queue`.
    pub async fn queue_len(&self, queue: &str) -> Result<u32> {
        Ok(self.transport().queue_info(queue).await?.message_count)
    }

    /// Take (get and ack) every ready message of `queue`.
    pub async fn take_messages(&self, queue: &str) -> Result<Vec<Message>> {
        take_messages(self.transport().as_ref(), queue).await
    }

    /// Stop gracefully.
    pub async fn stop(mut self) -> Result<()> {
        self.service.begin_stop();
        self.service.wait_finished().await
    }

    /// Begin a graceful stop without waiting for it, to inspect the service while it stops;
    /// [`TestService::wait_stopped`] waits for its end.
    pub fn begin_stop(&self) {
        self.service.begin_stop();
    }

    /// Wait until a stop begun with [`TestService::begin_stop`] has finished.
    pub async fn wait_stopped(mut self) -> Result<()> {
        self.service.wait_finished().await
    }
}

impl Drop for TestService {
    /// A service dropped without [`TestService::stop`] (a test that returned early, a helper
    /// that forgot it) stops in the background: left running, it went on consuming beside the
    /// services the test starts next on the same broker, to the end of the test.
    fn drop(&mut self) {
        self.service.begin_stop();
        // Its RabbitMQ virtual host goes once it has stopped: deleted at once, the service
        // (its worker processes too) went on reconnecting to it for 30 s.
        std::mem::take(&mut self._broker).release_once(self.service.stopped().clone());
    }
}
