//! RabbitMQ virtual hosts for tests, made and deleted through the management HTTP API.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Once, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use url::Url;

use crate::error::{Error, Result};

/// The environment variable that gives the base URL of RabbitMQ's management API (default:
/// port 15672 of the `TEST_AMQP_URI` host).
pub const TEST_RABBITMQ_API_ENV: &str = "TEST_RABBITMQ_API";

const PREFIX: &str = "mf-test-";
const MANAGEMENT_PORT: u16 = 15672;
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// Test virtual hosts older than this are taken for leftovers of a crashed run.
const STALE_AFTER: Duration = Duration::from_secs(3600);

/// A virtual host made for tests: deleted when dropped.
#[derive(Debug)]
pub(crate) struct TestVhost {
    api: ManagementApi,
    name: String,
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        match self.api.delete_vhost(&self.name) {
            Ok(()) => tracing::debug!("test virtual host {} deleted", self.name),
            Err(error) => tracing::warn!("test virtual host {} left: {error}", self.name),
        }
    }
}

/// A virtual host made by `test_config`: held here until a service claims it, then only by
/// the services that run on it.
struct Made {
    unclaimed: Option<Arc<TestVhost>>,
    vhost: Weak<TestVhost>,
}

/// The virtual hosts made by this process, by the broker URI that names them.
static MADE: Mutex<BTreeMap<String, Made>> = Mutex::new(BTreeMap::new());
static STALE_SWEEP: Once = Once::new();
static EXIT_CLEANUP: Once = Once::new();

/// At exit: delete the virtual hosts that no service claimed (configs made and never started,
/// or only handed to fakes).
extern "C" fn delete_unclaimed() {
    let unclaimed: Vec<_> = {
        let mut made = MADE.lock().unwrap_or_else(PoisonError::into_inner);
        made.values_mut().filter_map(|entry| entry.unclaimed.take()).collect()
    };
    drop(unclaimed);
}

/// Make a virtual host on the broker of `uri` and return `uri` naming it.
pub(crate) fn create(uri: &str) -> Result<String> {
    let api = ManagementApi::for_broker(uri)?;
    EXIT_CLEANUP.call_once(|| {
        // SAFETY: registers a plain function without arguments, as atexit expects.
        if unsafe { libc::atexit(delete_unclaimed) } != 0 {
            tracing::warn!("cannot register the exit clean-up of test virtual hosts");
        }
    });
    STALE_SWEEP.call_once(|| match api.remove_stale(STALE_AFTER) {
        Ok(0) => {}
        Ok(removed) => tracing::info!("removed {removed} stale test virtual host(s)"),
        Err(error) => tracing::warn!("cannot remove stale test virtual hosts: {error}"),
    });
    let name = format!("{PREFIX}{}-{}", unix_seconds(SystemTime::now()), uuid::Uuid::new_v4());
    api.create_vhost(&name)?;
    let mut url = Url::parse(uri).map_err(|error| bad_uri(uri, error))?;
    url.set_path(&format!("/{name}"));
    let vhost = Arc::new(TestVhost { api, name });
    let mut made = MADE.lock().unwrap_or_else(PoisonError::into_inner);
    made.retain(|_, entry| entry.vhost.strong_count() > 0);
    let entry = Made { vhost: Arc::downgrade(&vhost), unclaimed: Some(vhost) };
    made.insert(url.to_string(), entry);
    Ok(url.to_string())
}

/// A share in the virtual host `uri` names, if this process made it and it still exists.
pub(crate) fn claim(uri: &str) -> Option<Arc<TestVhost>> {
    let mut made = MADE.lock().unwrap_or_else(PoisonError::into_inner);
    let entry = made.get_mut(uri)?;
    let vhost = entry.vhost.upgrade();
    entry.unclaimed = None;
    vhost
}

/// Delete the test virtual hosts (`mf-test-*`) made more than `max_age` ago on the RabbitMQ
/// of `TEST_AMQP_URI`: those a crashed or killed test run left. Returns how many were
/// deleted. [`test_config`](crate::testing::test_config) runs it once per process with one
/// hour; run it by hand with a shorter age when no tests are running.
pub fn remove_stale_vhosts(max_age: Duration) -> Result<usize> {
    let uri = std::env::var(super::broker_env::TEST_AMQP_URI_ENV).map_err(|_| {
        Error::Startup(format!("{} is not set", super::broker_env::TEST_AMQP_URI_ENV))
    })?;
    ManagementApi::for_broker(&uri)?.remove_stale(max_age)
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs())
}

/// When a test virtual host was made, from its name.
fn made_at(name: &str) -> Option<u64> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

fn bad_uri(uri: &str, error: impl std::fmt::Display) -> Error {
    Error::Startup(format!("{} is not a broker URI ({error})", mask(uri)))
}

/// `uri` with its password masked, also when it does not parse (a password with a `/`).
fn mask(uri: &str) -> String {
    crate::config::mask_uri(uri)
}

/// RabbitMQ's management HTTP API, with the credentials of a broker URI.
struct ManagementApi {
    base: Url,
    user: String,
    /// `Basic` and the base64 of `user:password`: never shown.
    authorization: String,
}

impl std::fmt::Debug for ManagementApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagementApi")
            .field("base", &mask(self.base.as_str()))
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl ManagementApi {
    fn for_broker(uri: &str) -> Result<Self> {
        let broker = Url::parse(uri).map_err(|error| bad_uri(uri, error))?;
        let host = broker.host_str().ok_or_else(|| bad_uri(uri, "no host"))?;
        let base = match std::env::var(TEST_RABBITMQ_API_ENV) {
            Ok(base) if !base.is_empty() => Url::parse(&base).map_err(|error| {
                Error::Startup(format!(
                    "{TEST_RABBITMQ_API_ENV}={} is not a URL ({error})",
                    mask(&base)
                ))
            })?,
            _ => Url::parse(&format!("http://{host}:{MANAGEMENT_PORT}"))
                .map_err(|error| bad_uri(uri, error))?,
        };
        let decode = |text: &str| {
            percent_encoding::percent_decode_str(text).decode_utf8_lossy().into_owned()
        };
        let user = match broker.username() {
            "" => "guest".to_owned(),
            user => decode(user),
        };
        let password = decode(broker.password().unwrap_or("guest"));
        let credentials =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        Ok(ManagementApi { base, user, authorization: format!("Basic {credentials}") })
    }

    /// The URL of `api/{segments...}`, each segment percent-encoded.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().push("api").extend(segments);
        }
        url
    }

    fn request(&self, method: &str, segments: &[&str], body: Option<&str>) -> Result<String> {
        let url = self.url(segments);
        let agent = ureq::AgentBuilder::new().timeout(API_TIMEOUT).build();
        let request = agent
            .request_url(method, &url)
            .set("Authorization", &self.authorization)
            .set("Content-Type", "application/json");
        let response = match body {
            Some(body) => request.send_string(body),
            None => request.call(),
        };
        let fail = |what: String| {
            Error::Startup(format!(
                "RabbitMQ management API at {}: {method} {}: {what}",
                self.base,
                url.path()
            ))
        };
        match response {
            Ok(response) => response.into_string().map_err(|error| fail(error.to_string())),
            Err(ureq::Error::Status(401, _)) => Err(fail(format!(
                "user '{}' refused (the credentials of {} must be an administrator's)",
                self.user,
                super::broker_env::TEST_AMQP_URI_ENV
            ))),
            Err(ureq::Error::Status(404, _)) if segments == ["overview"] => Err(fail(
                "not found: is this the management API? Enable the plugin \
                 (`rabbitmq-plugins enable rabbitmq_management`) or set TEST_RABBITMQ_API to \
                 its base URL"
                    .into(),
            )),
            Err(ureq::Error::Status(status, response)) => Err(fail(format!(
                "status {status}: {}",
                response.into_string().unwrap_or_default()
            ))),
            Err(ureq::Error::Transport(error)) => Err(fail(format!(
                "unreachable ({error}): enable the plugin \
                 (`rabbitmq-plugins enable rabbitmq_management`) or set {TEST_RABBITMQ_API_ENV} \
                 to the API's base URL"
            ))),
        }
    }

    fn create_vhost(&self, name: &str) -> Result<()> {
        // The overview first, so a missing plugin is told apart from a refused request.
        self.request("GET", &["overview"], None)?;
        self.request("PUT", &["vhosts", name], Some("{}"))?;
        let all = r#"{"configure":".*","write":".*","read":".*"}"#;
        let granted = self.request("PUT", &["permissions", name, &self.user], Some(all));
        if let Err(error) = granted {
            let _ = self.delete_vhost(name);
            return Err(error);
        }
        Ok(())
    }

    fn delete_vhost(&self, name: &str) -> Result<()> {
        self.request("DELETE", &["vhosts", name], None).map(drop)
    }

    fn remove_stale(&self, max_age: Duration) -> Result<usize> {
        #[derive(serde::Deserialize)]
        struct Vhost {
            name: String,
        }
        let listed: Vec<Vhost> = serde_json::from_str(&self.request("GET", &["vhosts"], None)?)?;
        let now = unix_seconds(SystemTime::now());
        let mut removed = 0;
        for vhost in listed {
            let stale = made_at(&vhost.name)
                .is_some_and(|made| now.saturating_sub(made) >= max_age.as_secs());
            if stale {
                self.delete_vhost(&vhost.name)?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_creation_time_is_read_from_the_name() {
        assert_eq!(made_at("mf-test-1700000000-0b7e6c1e-aaaa"), Some(1_700_000_000));
        assert_eq!(made_at("mf-test-soon"), None);
        assert_eq!(made_at("orders"), None);
    }

    #[test]
    fn credentials_come_from_the_broker_uri_and_paths_are_encoded() {
        let api = ManagementApi::for_broker("amqp://al%40ice:s%3Acret@broker.local:5672/").unwrap();
        assert_eq!(api.user, "al@ice");
        let expected = base64::engine::general_purpose::STANDARD.encode("al@ice:s:cret");
        assert_eq!(api.authorization, format!("Basic {expected}"));
        let url = api.url(&["permissions", "mf-test-1", "al@ice"]);
        assert_eq!(url.as_str(), "http://broker.local:15672/api/permissions/mf-test-1/al@ice");
    }

    #[test]
    fn the_credentials_are_never_shown() {
        let api = ManagementApi::for_broker("amqp://guest:hunter22@127.0.0.1:5672/").unwrap();
        let shown = format!("{api:?}");
        let basic = base64::engine::general_purpose::STANDARD.encode("guest:hunter22");
        assert!(!shown.contains(&basic) && !shown.contains("hunter22"), "{shown}");
        assert!(shown.contains("guest"), "{shown}");
        // a `/` left unencoded in the password: the URI does not parse, and is still masked
        let error = ManagementApi::for_broker("amqp://guest:gu/est-93xq@127.0.0.1:5672/")
            .unwrap_err()
            .to_string();
        assert!(error.contains("is not a broker URI") && !error.contains("93xq"), "{error}");
    }

    #[test]
    fn an_unreachable_api_says_how_to_enable_it() {
        // port 1 of loopback: nothing listens there
        let api = ManagementApi {
            base: Url::parse("http://127.0.0.1:1").unwrap(),
            user: "guest".into(),
            authorization: String::new(),
        };
        let error = api.create_vhost("mf-test-0-x").unwrap_err().to_string();
        assert!(error.contains("rabbitmq-plugins enable rabbitmq_management"), "{error}");
        assert!(error.contains("TEST_RABBITMQ_API"), "{error}");
    }
}
