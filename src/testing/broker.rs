//! Where the services of tests run: a private in-process broker, or RabbitMQ when
//! `TEST_AMQP_URI` is set (one switch for a whole test suite).

use crate::config::{Config, MetricsConfig};
use crate::error::Result;
use crate::testing::broker_env::TEST_AMQP_URI_ENV;

/// A config for `service` on a broker of its own, so tests can run in parallel with the same
/// service and queue names. Its HTTP, WebSocket and metrics servers listen on ports the
/// system picks, on the loopback address (see
/// the addresses [`RunningService`](crate::RunningService) gives):
///
/// - by default a private in-process broker (`memory://test-{uuid}`);
/// - with `TEST_AMQP_URI` set, a new virtual host (`mf-test-{time}-{uuid}`) of that RabbitMQ,
///   made through its management HTTP API (plugin `rabbitmq_management`; the API is found at
///   port 15672 of the broker's host unless `TEST_RABBITMQ_API` gives its base URL, e.g.
///   `http://127.0.0.1:15672`) with all permissions for the URI's user. The
///   [`TestService`](crate::testing::TestService)s started with the config delete it when the
///   last of them stops or is dropped.
///
#[cfg_attr(
    feature = "test-rabbitmq",
    doc = concat!(
        "Virtual hosts left by a crashed run are removed by ",
        "[`remove_stale_vhosts`](crate::testing::remove_stale_vhosts), which the first call in ",
        "each test process runs for those older than an hour."
    )
)]
#[cfg_attr(
    not(feature = "test-rabbitmq"),
    doc = "Without the feature `test-rabbitmq`, a `TEST_AMQP_URI` that is set is an error."
)]
///
/// In a worker process of a process-mode test (see
/// [`TestService::start`](crate::testing::TestService::start)) it only names an in-process
/// broker: a worker's broker traffic goes through the test's service.
///
/// # Panics
///
/// When `TEST_AMQP_URI` is set and the virtual host cannot be made (see [`try_test_config`]
/// for the error instead).
pub fn test_config(service: &str) -> Config {
    match try_test_config(service) {
        Ok(config) => config,
        Err(error) => panic!("test_config(\"{service}\"): {error}"),
    }
}

/// Like [`test_config`], returning an error when `TEST_AMQP_URI` is set and its virtual host
/// cannot be made (the management API unreachable, the plugin missing, credentials refused).
pub fn try_test_config(service: &str) -> Result<Config> {
    match std::env::var(TEST_AMQP_URI_ENV) {
        Ok(uri) if !uri.is_empty() && !in_worker_process() => rabbitmq_config(service, &uri),
        _ => Ok(memory_test_config(service)),
    }
}

/// A config for `service` on a private in-process broker, whatever `TEST_AMQP_URI` says: for
/// tests that need the in-process broker, e.g. those on tokio's paused clock.
pub fn memory_test_config(service: &str) -> Config {
    on_loopback(Config::new(service))
        .with_amqp_uri(format!("memory://test-{}", uuid::Uuid::new_v4()))
}

/// `config` with its servers on ports the system picks, on the loopback address: tests with
/// HTTP or WebSocket routes then run in parallel, and reach no other machine.
fn on_loopback(config: Config) -> Config {
    let metrics = MetricsConfig { host: LOOPBACK.to_owned(), port: 0 };
    config
        .with_web_server_address(format!("{LOOPBACK}:0"))
        .with_websocket_ip(LOOPBACK.to_owned())
        .with_websocket_port(0)
        .with_metrics(metrics)
}

const LOOPBACK: &str = "127.0.0.1";

fn in_worker_process() -> bool {
    #[cfg(feature = "process")]
    return crate::pipeline::spawners::process::worker_socket().is_some();
    #[cfg(not(feature = "process"))]
    false
}

#[cfg(feature = "test-rabbitmq")]
fn rabbitmq_config(service: &str, uri: &str) -> Result<Config> {
    let vhost_uri = super::vhost::create(uri)?;
    Ok(on_loopback(Config::new(service)).with_amqp_uri(vhost_uri))
}

#[cfg(not(feature = "test-rabbitmq"))]
fn rabbitmq_config(_service: &str, _uri: &str) -> Result<Config> {
    Err(crate::error::Error::Startup(format!(
        "{TEST_AMQP_URI_ENV} is set, but micro-framework was built without the `test-rabbitmq` \
         feature: enable it, or unset {TEST_AMQP_URI_ENV}"
    )))
}

/// The share a [`TestService`](crate::testing::TestService) holds in the virtual host its
/// config names (nothing on the in-process broker): the host goes with the last share.
#[derive(Debug, Default)]
pub(crate) struct BrokerLease {
    #[cfg(feature = "test-rabbitmq")]
    _vhost: Option<std::sync::Arc<super::vhost::TestVhost>>,
}

impl BrokerLease {
    /// Let go of the share once `stopped` fires: now if it has (a stopped service), else in
    /// the background (a service dropped while it stops; now without a runtime to wait in).
    pub(crate) fn release_once(self, stopped: tokio_util::sync::CancellationToken) {
        #[cfg(feature = "test-rabbitmq")]
        if let (Some(_), false, Ok(runtime)) =
            (&self._vhost, stopped.is_cancelled(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(async move {
                stopped.cancelled().await;
                // the host's deletion is a blocking HTTP request
                let _ = tokio::task::spawn_blocking(move || drop(self)).await;
            });
        }
        #[cfg(not(feature = "test-rabbitmq"))]
        let _ = stopped;
    }

    pub(crate) fn for_config(config: &Config) -> Self {
        #[cfg(feature = "test-rabbitmq")]
        return BrokerLease { _vhost: super::vhost::claim(&config.amqp_uri) };
        #[cfg(not(feature = "test-rabbitmq"))]
        {
            let _ = config;
            BrokerLease {}
        }
    }
}
