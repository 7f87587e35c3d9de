//! Service configuration, with the keys of the Python `micro-framework` package (and
//! Nameko): `AMQP_URI`, `SERVICE_NAME`, `MAX_WORKERS`, ...
//!
//! A [`Config`] is a struct with public fields, `#[non_exhaustive]` so that adding a key
//! breaks no one. Build it in code with [`Config::new`] and its `with_*` setters, from
//! environment variables with
//! [`Config::from_env`] / [`Config::from_vars`], or from a YAML or TOML file with
//! [`Config::from_file`] / [`Config::from_yaml_str`] / [`Config::from_toml_str`], whose text
//! may refer to environment variables as `${VAR}` or `${VAR:default}`.
//!
//! ```
//! use std::time::Duration;
//! use micro_framework::config::{Config, ConfigError, WorkerMode};
//!
//! // In code: defaults, overridden with setters.
//! let config = Config::new("orders").with_max_workers(8);
//! assert_eq!(config.effective_prefetch(), 8); // PREFETCH_COUNT defaults to MAX_WORKERS
//!
//! // From environment variables; `from_env` does the same with the process environment.
//! // Nested keys are joined with `_`, and unknown variables are ignored.
//! let vars = [
//!     ("SERVICE_NAME", "orders"),
//!     ("WORKER_MODE", "greedy_process"),
//!     ("METRICS_PORT", "9100"),
//!     ("HOME", "/root"),
//! ];
//! let config = Config::from_vars(vars.map(|(k, v)| (k.to_string(), v.to_string())))?;
//! assert_eq!(config.worker_mode, WorkerMode::GreedyProcess);
//! assert_eq!(config.metrics.port, 9100);
//! assert!(config.extra.is_empty());
//!
//! // From YAML (or TOML) text, with `${VAR}` / `${VAR:default}` substituted in its strings.
//! let yaml = "
//! SERVICE_NAME: orders
//! AMQP_URI: ${AMQP_URI:amqp://guest:guest@rabbitmq:5672/}
//! MAX_WORKERS: ${MAX_WORKERS:4}
//! RPC_TIMEOUT: 2.5
//! METRICS:
//!   HOST: 127.0.0.1
//!   PORT: 9100
//! FEATURES: [beta]
//! ";
//! let env = |name: &str| (name == "MAX_WORKERS").then(|| "6".to_string());
//! let config = Config::from_yaml_str(yaml, &env)?;
//! assert_eq!(config.max_workers, 6);
//! assert_eq!(config.masked_amqp_uri(), "amqp://guest:***@rabbitmq:5672/");
//! assert_eq!(config.rpc_timeout, Duration::from_millis(2500));
//! assert_eq!(config.metrics.host, "127.0.0.1");
//! assert_eq!(config.get::<Vec<String>>("FEATURES").transpose()?, Some(vec!["beta".into()]));
//!
//! // Errors name the key and the raw value.
//! let err = Config::from_yaml_str("SERVICE_NAME: orders\nWORKER_MODE: fibers", &env);
//! assert_eq!(
//!     err.map_err(|e| e.to_string()).err().as_deref(),
//!     Some(r#"invalid config WORKER_MODE="fibers": expected one of thread, greedy_thread, process, greedy_process"#),
//! );
//! # Ok::<(), ConfigError>(())
//! ```
//!
//! Keys are UPPERCASE and matched exactly. In environment variables the nested keys are
//! `METRICS_HOST` and `METRICS_PORT`; in files they sit in a `METRICS` mapping (`HOST`,
//! `PORT`), or at the top level spelt as in the environment (not both). Numbers may be given as strings and strings (ports, names) as numbers. Optional
//! numbers (`MAX_TASKS_PER_CHILD`, `PREFETCH_COUNT`) are unset when null or blank.
//!
//! Substitution (`${VAR}`, `${VAR:default}`) works after parsing, in string values only:
//! comments are not read, and a value cannot change the document's structure, whatever YAML
//! syntax (`: `, ` #`) it holds. In TOML, references must be quoted, as any string.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

pub(crate) mod amqp_uri;
mod error;
#[cfg(test)]
pub(crate) mod fuzz;
mod load;
mod misspelling;
mod modes;
pub(crate) mod origins;
mod substitute;
#[cfg(test)]
mod tests;
mod unknown_key;
pub(crate) mod uri_list;
mod validate;
mod yaml;

pub use error::{mask_uri, ConfigError};
pub(crate) use load::process_env;
pub use modes::{LogFormat, Protocol, QueueType, RetryDelay, WorkerMode};
pub use unknown_key::UnknownKey;

use error::{mask_json, raw_text};
use load::Format;

/// The largest `HTTP_MAX_CONNECTIONS` and `WEBSOCKET_MAX_CONNECTIONS`: Linux's default
/// `fs.nr_open`, the most file descriptors a process may ever hold, so no process could serve
/// more.
pub const MAX_HTTP_CONNECTIONS: usize = 1 << 20;

/// The largest `MAX_WORKERS` (and `RunnerContext::max_workers`): far above any pool a
/// machine can run, and below the count where tokio's semaphore, which holds the worker
/// slots, panics (`usize::MAX >> 3`).
pub const MAX_WORKERS_LIMIT: usize = 1 << 20;

/// The longest `HTTP_HEADER_READ_TIMEOUT`, `HTTP_KEEP_ALIVE_TIMEOUT` and
/// `WEBSOCKET_IDLE_TIMEOUT`: one day. Waiting longer on a silent peer protects nothing.
pub const MAX_PEER_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

/// The configuration of a service. See the [module documentation](self) for how to load it.
///
/// Each field documents its key and default. [`Config::default`] has all defaults and an
/// empty (so invalid) `service_name`; [`Config::new`] sets it.
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub struct Config {
    /// `AMQP_URI`: the broker, `amqp://`, `amqps://` or `memory://`; or the nodes of one
    /// RabbitMQ cluster as a comma-separated list of `amqp://` / `amqps://` URIs with the
    /// same vhost and credentials (see [`Config::amqp_uris`]; files may give a list of
    /// strings). Default: `amqp://guest:guest@localhost:5672/`.
    pub amqp_uri: String,
    /// `AMQP_HEARTBEAT`: the AMQP heartbeat interval in seconds. Default: 60.
    pub amqp_heartbeat: u16,
    /// `SERVICE_NAME`: the name of the service, used in queue names. Required: not empty,
    /// no whitespace, no `*` or `#` (its RPC binding is `{SERVICE_NAME}.*`).
    pub service_name: String,
    /// `MAX_WORKERS`: how many workers run at once; from 1 to [`MAX_WORKERS_LIMIT`].
    /// Default: 3.
    pub max_workers: usize,
    /// `WORKER_MODE`: how workers run. Default: [`WorkerMode::Thread`].
    pub worker_mode: WorkerMode,
    /// `MAX_TASKS_PER_CHILD`: tasks a worker process runs before it is replaced; at least 1.
    /// Default: `None` (no limit).
    pub max_tasks_per_child: Option<u32>,
    /// `ENABLE_METRICS`: whether to serve metrics. Default: `false`.
    pub enable_metrics: bool,
    /// `STATUS_SHOW_FAILURES`: whether the status page (`/` of the metrics server) lists the
    /// last failures with their error texts, which can hold user data. Default: `false`.
    pub status_show_failures: bool,
    /// `METRICS`: where the metrics server listens.
    pub metrics: MetricsConfig,
    /// `WEBSOCKET_IP`: the address the websocket server listens on. Default: `0.0.0.0`.
    pub websocket_ip: String,
    /// `WEBSOCKET_PORT`: the port the websocket server listens on. Default: 8765.
    pub websocket_port: u16,
    /// `WEBSOCKET_ALLOWED_ORIGINS`: the origins (`https://app.example.com`,
    /// `scheme://host[:port]`) whose web pages may open a WebSocket connection; a handshake
    /// with another `Origin` header is refused with `403`, one without any (not a browser's) is
    /// taken (the Python client sends `http://{host}:{port}` of the URL it calls, `http`
    /// whatever its scheme and no port for 80 or 443: list it).
    /// Compared as browsers write the header: scheme and host in any case, the default port
    /// left out. Empty, or `*` alone: any origin, as the Python original takes. From the
    /// environment, a comma-separated list. Default: empty.
    pub websocket_allowed_origins: Vec<String>,
    /// `WEB_SERVER_ADDRESS`: where the HTTP entrypoints listen (`host:port`, Nameko's key; a
    /// bare port, as Nameko takes it, is read as `0.0.0.0:port`).
    /// Default: `0.0.0.0:8000`.
    pub web_server_address: String,
    /// `HTTP_HEADER_READ_TIMEOUT`: how long an HTTP client has to send a whole request head,
    /// counted from the connection's accept (first request) or from the first byte of the
    /// next request (keep-alive); past it the connection is closed. Also the longest a
    /// request body may pause between two reads (then 400 and the connection is closed).
    /// Positive, at most a day. Given in seconds (fractions allowed). Default: 60 s (nginx's
    /// `client_header_timeout` and `client_body_timeout`).
    pub http_header_read_timeout: Duration,
    /// `HTTP_KEEP_ALIVE_TIMEOUT`: how long an HTTP connection may stay open between requests
    /// without a byte of a new one; past it the connection is closed. Positive, at most a day.
    /// Given in seconds (fractions allowed). Default: 75 s (nginx's `keepalive_timeout`).
    pub http_keep_alive_timeout: Duration,
    /// `HTTP_MAX_CONNECTIONS`: how many HTTP connections are served at once; more wait,
    /// unaccepted, until one closes. From 1 to 1048576. Default: 1024.
    pub http_max_connections: usize,
    /// `HTTP_REQUIRE_JSON_CONTENT_TYPE`: whether an HTTP request with a body (a
    /// `content-length` above 0, or a `transfer-encoding`) must declare it JSON
    /// (`application/json` or `application/*+json`, parameters allowed); another
    /// `Content-Type`, or none, is answered `415` before the body is read. A web page of any
    /// site can send a body without a JSON content type with no CORS preflight, so `true`
    /// keeps browsers of other sites from calling JSON routes. Default: `false` (a body
    /// without a content type is read as JSON, as the Python peers read it).
    pub http_require_json_content_type: bool,
    /// `WEBSOCKET_IDLE_TIMEOUT`: how long a WebSocket connection may go without a byte from
    /// its client (and without a call running or a reply being sent) before it is closed, and
    /// a reply without a byte taken before its client is dropped; also bounds the handshake. Positive, at most a day. Given in seconds (fractions allowed). Default: 60 s
    /// (nginx's `proxy_read_timeout`).
    pub websocket_idle_timeout: Duration,
    /// `WEBSOCKET_MAX_CONNECTIONS`: how many WebSocket connections are open at once,
    /// handshakes included; the handshake of the next one is answered `503 Service
    /// Unavailable` until one closes. From 1 to 1048576. Default: 1024.
    pub websocket_max_connections: usize,
    /// `MAX_MESSAGE_SIZE`: the largest message body, in bytes, a service accepts (AMQP
    /// deliveries, HTTP bodies, WebSocket frames) or publishes; at least 1. Default: 16 MiB,
    /// RabbitMQ 4's own limit.
    pub max_message_size: usize,
    /// `PREFETCH_COUNT`: the AMQP prefetch count; at least 1. Default: `None`, meaning
    /// `MAX_WORKERS` (see [`Config::effective_prefetch`]).
    pub prefetch_count: Option<u16>,
    /// `PROTOCOL`: the message protocol. Default: [`Protocol::Nameko`].
    pub protocol: Protocol,
    /// `QUEUE_TYPE`: the type of queues declared. Default: [`QueueType::Classic`].
    pub queue_type: QueueType,
    /// `AUTO_DELETE_EVENT_EXCHANGES`: whether event exchanges are declared auto-delete.
    /// Default: `false`.
    pub auto_delete_event_exchanges: bool,
    /// `DECLARE_EVENT_EXCHANGES`: whether event exchanges are declared (Nameko's option);
    /// `false` leaves them as the broker holds them, made by whoever made them. Default:
    /// `true`.
    pub declare_event_exchanges: bool,
    /// `PARENT_CALLS_TRACKED`: how many parent call ids are kept in a call-id stack.
    /// Default: 10.
    pub parent_calls_tracked: usize,
    /// `RPC_EXCHANGE`: the exchange RPC requests are published to; not blank, no whitespace
    /// around it. Default: `nameko-rpc`.
    pub rpc_exchange: String,
    /// `RPC_TIMEOUT`: how long an RPC call waits for its reply; positive. Given in seconds
    /// (fractions allowed). Default: 30 s.
    pub rpc_timeout: Duration,
    /// `RPC_PERSISTENT_REQUESTS`: whether RPC requests are sent persistent (delivery mode 2,
    /// as Nameko sends them). A persistent request waiting in its durable queue survives a
    /// broker restart and its call completes once the broker is back, within its timeout;
    /// RabbitMQ writes it to disk first, which costs the broker more CPU than the rest of the
    /// call. Transient requests (`false`) are lost with a restart of the broker: their calls
    /// end in `Timeout`. Default: `true`.
    pub rpc_persistent_requests: bool,
    /// `SHUTDOWN_TIMEOUT`: how long a stopping service waits for running workers; positive.
    /// Given in seconds (fractions allowed). Default: 30 s.
    pub shutdown_timeout: Duration,
    /// `RETRY_DELAY`: how broker-side retries wait. Default: [`RetryDelay::DelayQueues`].
    pub retry_delay: RetryDelay,
    /// `LOG_FORMAT`: `text` or `json` logs from `Runner::start`. Default: `text`.
    pub log_format: LogFormat,
    /// `TASK_TIME_LIMIT`: seconds a call may run before it fails as timed out: its worker is
    /// killed in the process modes; in the thread modes an async call is cancelled, and a sync
    /// one (which a thread cannot stop) runs on. Default: unset (no limit).
    pub task_time_limit: Option<Duration>,
    /// `MAX_REDELIVERIES`: how many times a message may come back unsettled (its worker or
    /// the service died while handling it) before it is dead-lettered as a crash loop.
    /// Default: 5.
    pub max_redeliveries: u32,
    /// `AMQP_SSL_CA_FILE`: the CA certificate (PEM) that signs the broker's certificate, for `amqps://`. Default: unset.
    pub amqp_ssl_ca_file: Option<String>,
    /// `AMQP_SSL_CERT_FILE`: the client certificate (PEM) for `amqps://` with client authentication. Default: unset.
    pub amqp_ssl_cert_file: Option<String>,
    /// `AMQP_SSL_KEY_FILE`: the client private key (PEM, PKCS#8) matching `AMQP_SSL_CERT_FILE`. Default: unset.
    pub amqp_ssl_key_file: Option<String>,
    /// Every other top-level key of a configuration file, as is (see [`Config::get`]).
    /// Environment variables never land here. Default: empty.
    pub extra: BTreeMap<String, Value>,
    /// The variables given to [`Config::from_vars`] that are no key but look like a
    /// misspelling of one, each with that key (see [`Config::misspelt_env_vars`]).
    misspelt_env: Misspelt,
}

/// Environment variables that look like misspelt keys, each with the key: a diagnostic of
/// where the configuration came from, not a setting, so it makes no two configs unequal.
#[derive(Clone, Debug, Default)]
struct Misspelt(Vec<(String, &'static str)>);

impl PartialEq for Misspelt {
    fn eq(&self, _: &Misspelt) -> bool {
        true
    }
}

/// Where the metrics server listens (`METRICS.HOST` / `METRICS.PORT` in files,
/// `METRICS_HOST` / `METRICS_PORT` in the environment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// `HOST`: the address to listen on. Default: `0.0.0.0`.
    pub host: String,
    /// `PORT`: the port to listen on. Default: 8000.
    pub port: u16,
}

/// Builder-style setters, one per field, so that code outside the crate can build a `Config`
/// (which is `#[non_exhaustive]`: a new key is not a breaking change).
macro_rules! setters {
    ($($setter:ident => $field:ident: $type:ty,)*) => {
        impl Config {
            $(
                #[doc = concat!("Set [`Config::", stringify!($field), "`].")]
                #[must_use]
                pub fn $setter(mut self, value: $type) -> Self {
                    self.$field = value;
                    self
                }
            )*
        }
    };
}

setters! {
    with_amqp_uri => amqp_uri: String,
    with_amqp_heartbeat => amqp_heartbeat: u16,
    with_service_name => service_name: String,
    with_max_workers => max_workers: usize,
    with_worker_mode => worker_mode: WorkerMode,
    with_max_tasks_per_child => max_tasks_per_child: Option<u32>,
    with_enable_metrics => enable_metrics: bool,
    with_status_show_failures => status_show_failures: bool,
    with_metrics => metrics: MetricsConfig,
    with_websocket_ip => websocket_ip: String,
    with_websocket_port => websocket_port: u16,
    with_websocket_allowed_origins => websocket_allowed_origins: Vec<String>,
    with_web_server_address => web_server_address: String,
    with_http_header_read_timeout => http_header_read_timeout: Duration,
    with_http_keep_alive_timeout => http_keep_alive_timeout: Duration,
    with_http_max_connections => http_max_connections: usize,
    with_http_require_json_content_type => http_require_json_content_type: bool,
    with_websocket_idle_timeout => websocket_idle_timeout: Duration,
    with_websocket_max_connections => websocket_max_connections: usize,
    with_max_message_size => max_message_size: usize,
    with_prefetch_count => prefetch_count: Option<u16>,
    with_protocol => protocol: Protocol,
    with_queue_type => queue_type: QueueType,
    with_auto_delete_event_exchanges => auto_delete_event_exchanges: bool,
    with_declare_event_exchanges => declare_event_exchanges: bool,
    with_parent_calls_tracked => parent_calls_tracked: usize,
    with_rpc_exchange => rpc_exchange: String,
    with_rpc_timeout => rpc_timeout: Duration,
    with_rpc_persistent_requests => rpc_persistent_requests: bool,
    with_shutdown_timeout => shutdown_timeout: Duration,
    with_retry_delay => retry_delay: RetryDelay,
    with_log_format => log_format: LogFormat,
    with_task_time_limit => task_time_limit: Option<Duration>,
    with_max_redeliveries => max_redeliveries: u32,
    with_amqp_ssl_ca_file => amqp_ssl_ca_file: Option<String>,
    with_amqp_ssl_cert_file => amqp_ssl_cert_file: Option<String>,
    with_amqp_ssl_key_file => amqp_ssl_key_file: Option<String>,
    with_extra => extra: BTreeMap<String, Value>,
}

impl Default for MetricsConfig {
    fn default() -> MetricsConfig {
        MetricsConfig { host: "0.0.0.0".to_string(), port: 8000 }
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            amqp_uri: "amqp://guest:guest@localhost:5672/".to_string(),
            amqp_heartbeat: 60,
            service_name: String::new(),
            max_workers: 3,
            worker_mode: WorkerMode::default(),
            max_tasks_per_child: None,
            enable_metrics: false,
            status_show_failures: false,
            metrics: MetricsConfig::default(),
            websocket_ip: "0.0.0.0".to_string(),
            websocket_port: 8765,
            websocket_allowed_origins: Vec::new(),
            web_server_address: "0.0.0.0:8000".to_string(),
            http_header_read_timeout: Duration::from_secs(60),
            http_keep_alive_timeout: Duration::from_secs(75),
            http_max_connections: 1024,
            http_require_json_content_type: false,
            websocket_idle_timeout: Duration::from_secs(60),
            websocket_max_connections: 1024,
            max_message_size: 16 * 1024 * 1024,
            prefetch_count: None,
            protocol: Protocol::default(),
            queue_type: QueueType::default(),
            auto_delete_event_exchanges: false,
            declare_event_exchanges: true,
            parent_calls_tracked: 10,
            rpc_exchange: "nameko-rpc".to_string(),
            rpc_timeout: Duration::from_secs(30),
            rpc_persistent_requests: true,
            shutdown_timeout: Duration::from_secs(30),
            retry_delay: RetryDelay::default(),
            log_format: LogFormat::default(),
            task_time_limit: None,
            max_redeliveries: 5,
            amqp_ssl_ca_file: None,
            amqp_ssl_cert_file: None,
            amqp_ssl_key_file: None,
            extra: BTreeMap::new(),
            misspelt_env: Misspelt::default(),
        }
    }
}

impl Config {
    /// All defaults, with `SERVICE_NAME` set. Not validated: see [`Config::validate`].
    pub fn new(service_name: impl Into<String>) -> Config {
        Config::default().with_service_name(service_name.into())
    }

    /// Reads the process environment: see [`Config::from_vars`].
    ///
    /// # Errors
    /// As [`Config::from_vars`]; also a configuration variable whose value is not UTF-8.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_vars(load::process_env()?)
    }

    /// Reads configuration from `(name, value)` pairs such as environment variables, with the
    /// key names (`METRICS_HOST` and `METRICS_PORT` for the nested ones), then validates it.
    /// Other variables are ignored; a variable given twice takes its last value.
    ///
    /// # Errors
    /// A value that does not parse, or a configuration that fails [`Config::validate`].
    pub fn from_vars<I: IntoIterator<Item = (String, String)>>(
        vars: I,
    ) -> Result<Config, ConfigError> {
        load::from_vars(vars)
    }

    /// Reads a `.yaml` / `.yml` or `.toml` file (chosen by extension), substituting
    /// `${VAR}` and `${VAR:default}` from the process environment in its string values (at
    /// any depth, after parsing: comments are not read, and in TOML a reference is quoted,
    /// `MAX_WORKERS = "${WORKERS:4}"`), then validates it.
    ///
    /// # Errors
    /// Another extension or an unreadable file (key: the path), a syntax error (key: the
    /// path), an unset variable without default or a variable that is not UTF-8 (key: the
    /// variable), a value that does not parse, or a configuration that fails
    /// [`Config::validate`].
    pub fn from_file(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        Config::from_file_replacing(path.as_ref(), None)
    }

    /// [`Config::from_file`] with `uri` as its `AMQP_URI`: the file's is not read (it may
    /// name a variable set only where the service runs), as `show-config --uri` does not
    /// read the environment's.
    ///
    /// # Errors
    /// As [`Config::from_file`], with `uri` checked in place of the file's.
    #[doc(hidden)] // for the workspace's CLI, not an API of its own
    pub fn from_file_with_amqp_uri(
        path: impl AsRef<Path>,
        uri: &str,
    ) -> Result<Config, ConfigError> {
        Config::from_file_replacing(path.as_ref(), Some(("AMQP_URI", uri)))
    }

    /// Reads the file `path`, with `replaced` (a key and its value) in place of its own.
    fn from_file_replacing(
        path: &Path,
        replaced: Option<(&str, &str)>,
    ) -> Result<Config, ConfigError> {
        let format = Format::of(path)?;
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|err| ConfigError::new(&origin, "", format!("cannot read file: {err}")))?;
        load::from_text_replacing(&text, format, &origin, &load::process_var, replaced)
    }

    /// Reads YAML text, substituting `${VAR}` and `${VAR:default}` with `vars` in its string
    /// values as [`Config::from_file`] does, then validates it. Known keys set their field (nested `METRICS: {HOST, PORT}`, or
    /// `METRICS_HOST` and `METRICS_PORT`); other top-level keys go to [`Config::extra`].
    ///
    /// # Errors
    /// As [`Config::from_file`]; syntax errors have the key `<yaml>`.
    pub fn from_yaml_str(
        text: &str,
        vars: &impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        load::from_text(text, Format::Yaml, "<yaml>", &|name: &str| Ok(vars(name)))
    }

    /// Reads TOML text like [`Config::from_yaml_str`] (`METRICS` is a table).
    ///
    /// # Errors
    /// As [`Config::from_file`]; syntax errors have the key `<toml>`.
    pub fn from_toml_str(
        text: &str,
        vars: &impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        load::from_text(text, Format::Toml, "<toml>", &|name: &str| Ok(vars(name)))
    }

    /// The AMQP prefetch count to use: `PREFETCH_COUNT`, or `MAX_WORKERS` (capped at 65535)
    /// when unset.
    pub fn effective_prefetch(&self) -> u16 {
        self.prefetch_count.unwrap_or_else(|| u16::try_from(self.max_workers).unwrap_or(u16::MAX))
    }

    /// `WEB_SERVER_ADDRESS` as the `host:port` to bind: a bare port on every interface, as
    /// from the environment (a config set in code may hold one too); as it is if
    /// [`Config::validate`] would refuse it.
    #[cfg(feature = "http")]
    pub(crate) fn web_server_bind_address(&self) -> String {
        load::bind_address(&self.web_server_address)
            .unwrap_or_else(|_| self.web_server_address.clone())
    }

    /// `AMQP_URI` with its password (of each entry) replaced by `***` (see [`mask_uri`]),
    /// for logs.
    pub fn masked_amqp_uri(&self) -> String {
        mask_uri(&self.amqp_uri)
    }

    /// The entries of `AMQP_URI`, in order, without surrounding whitespace: one URI, or the
    /// nodes of a cluster. A comma in a user name or password of a list is written `%2C`.
    ///
    /// ```
    /// use micro_framework::Config;
    /// let config = Config::new("orders")
    ///     .with_amqp_uri("amqp://u:p@10.0.0.1:5672/, amqp://u:p@10.0.0.2:5672/".into());
    /// assert_eq!(config.amqp_uris(), ["amqp://u:p@10.0.0.1:5672/", "amqp://u:p@10.0.0.2:5672/"]);
    /// assert_eq!(config.masked_amqp_uri(), "amqp://u:***@10.0.0.1:5672/,amqp://u:***@10.0.0.2:5672/");
    /// let rebuilt = Config::new("orders").with_amqp_uris(config.amqp_uris());
    /// assert_eq!(rebuilt.amqp_uri, "amqp://u:p@10.0.0.1:5672/,amqp://u:p@10.0.0.2:5672/");
    /// ```
    pub fn amqp_uris(&self) -> Vec<&str> {
        uri_list::entries(&self.amqp_uri)
    }

    /// Set [`Config::amqp_uri`] to the list of `uris` (the nodes of one cluster), joined
    /// with `,`.
    #[must_use]
    pub fn with_amqp_uris<I: IntoIterator<Item = impl Into<String>>>(mut self, uris: I) -> Self {
        self.amqp_uri = uris.into_iter().map(Into::into).collect::<Vec<String>>().join(",");
        self
    }

    /// The keys of [`Config::extra`], each with what it may be: a key of the Python originals
    /// that means nothing here, a misspelling of a framework key, or an application key. The
    /// runner warns about each at start-up.
    ///
    /// ```
    /// use micro_framework::config::UnknownKey;
    /// use micro_framework::Config;
    /// let yaml = "SERVICE_NAME: s\nMAX_WORKER: 4\nSHOP_URL: x\nserializer: pickle\n";
    /// let config = Config::from_yaml_str(yaml, &|_| None)?;
    /// let keys = config.unknown_keys();
    /// assert_eq!(keys[0], ("MAX_WORKER", UnknownKey::Resembles("MAX_WORKERS")));
    /// assert_eq!(keys[1], ("SHOP_URL", UnknownKey::Application));
    /// assert!(matches!(keys[2], ("serializer", UnknownKey::PythonOnly(_))));
    /// # Ok::<(), micro_framework::config::ConfigError>(())
    /// ```
    pub fn unknown_keys(&self) -> Vec<(&str, UnknownKey)> {
        self.extra
            .keys()
            .map(|key| (key.as_str(), UnknownKey::of(key, load::closest_key)))
            .collect()
    }

    /// The environment variables read by [`Config::from_vars`] (or [`Config::from_env`])
    /// that are no key of the framework but look like a misspelling of one (`AMQP_URL`,
    /// `MAX_WORKER`, `max_workers`), each with that key, by name. They are ignored, as every
    /// other variable; the runner warns about each at start-up.
    ///
    /// ```
    /// use micro_framework::Config;
    /// let vars = [("SERVICE_NAME", "s"), ("AMQP_URL", "amqp://mq/"), ("HOME", "/root")];
    /// let config = Config::from_vars(vars.map(|(k, v)| (k.to_string(), v.to_string())))?;
    /// assert_eq!(config.misspelt_env_vars(), [("AMQP_URL", "AMQP_URI")]);
    /// # Ok::<(), micro_framework::config::ConfigError>(())
    /// ```
    pub fn misspelt_env_vars(&self) -> Vec<(&str, &'static str)> {
        self.misspelt_env.0.iter().map(|(name, key)| (name.as_str(), *key)).collect()
    }

    /// The query options of `AMQP_URI` that nothing reads: the RabbitMQ transport reads
    /// `heartbeat`, `frame_max`, `channel_max` and `connection_timeout` only, so kombu's
    /// `?ssl=1` turns no TLS on and a misspelt `?heartbeet=5` sets nothing. The runner warns
    /// about each at start-up.
    ///
    /// ```
    /// use micro_framework::Config;
    /// let config = Config::new("s").with_amqp_uri("amqp://mq/?heartbeat=5&ssl=1".into());
    /// assert_eq!(config.unused_amqp_uri_options(), ["ssl"]);
    /// ```
    pub fn unused_amqp_uri_options(&self) -> Vec<String> {
        amqp_uri::unused_options(&self.amqp_uri)
    }

    /// What this configuration holds that nothing uses, one sentence each: the
    /// [unknown keys](Config::unknown_keys) of a file that look misspelt or are the Python
    /// originals' (not an application's own keys, which [`Config::get`] reads), the
    /// [`AMQP_URI` options nothing reads](Config::unused_amqp_uri_options), the
    /// [environment variables that look misspelt](Config::misspelt_env_vars), a heartbeat of
    /// 0 (which does not turn heartbeats off here) and TLS files beside an `amqp://` URI. The runner logs
    /// each at start-up; `micro-framework show-config` prints them.
    ///
    /// ```
    /// use micro_framework::Config;
    /// let config = Config::new("s").with_amqp_uri("amqp://mq/?ssl=1".into());
    /// assert_eq!(config.warnings().len(), 1);
    /// ```
    pub fn warnings(&self) -> Vec<String> {
        // an application's own key is what Config::get is for: no warning at every start
        let keys = self
            .unknown_keys()
            .into_iter()
            .filter(|(_, what)| *what != UnknownKey::Application)
            .map(|(key, what)| format!("config key {key} is {what}"));
        let options = self.unused_amqp_uri_options().into_iter().map(|option| {
            format!(
                "AMQP_URI option {option} is not used: micro-framework reads heartbeat, \
                 frame_max, channel_max and connection_timeout (TLS is amqps://)"
            )
        });
        let variables = self.misspelt_env_vars().into_iter().map(|(name, key)| {
            format!(
                "environment variable {name} is not a micro-framework key (did you mean \
                 {key}?); it is ignored"
            )
        });
        // lapin follows the broker's heartbeat when asked for none (py-amqp, under the
        // Python peers, sends 0 and turns them off)
        let heartbeat =
            amqp_uri::asks_heartbeats_off(&self.amqp_uri, self.amqp_heartbeat).then(|| {
                "AMQP_HEARTBEAT=0 (or ?heartbeat=0) does not turn heartbeats off here: the \
                 broker's heartbeat is used instead (RabbitMQ's default is 60 s)"
                    .to_owned()
            });
        let tls_files = [&self.amqp_ssl_ca_file, &self.amqp_ssl_cert_file, &self.amqp_ssl_key_file];
        let unencrypted = (tls_files.iter().any(|file| file.is_some())
            && amqp_uri::has_plain_entries(&self.amqp_uri))
        .then(|| {
            "AMQP_SSL_CA_FILE, AMQP_SSL_CERT_FILE and AMQP_SSL_KEY_FILE are used with amqps:// \
             only: the amqp:// connection is not encrypted (TLS is amqps://)"
                .to_owned()
        });
        keys.chain(options).chain(variables).chain(heartbeat).chain(unencrypted).collect()
    }

    /// Reads the extra key `key` (see [`Config::extra`]) as a `T`; `None` when absent.
    ///
    /// A string that does not deserialize as `T` is also tried as JSON text, so values that
    /// substitution turned into strings (`"4"`, `"true"`) still read as numbers or booleans.
    ///
    /// # Errors
    /// The value (secrets masked) and the deserializer's message.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Option<Result<T, ConfigError>> {
        let value = self.extra.get(key)?;
        let parsed = T::deserialize(value).or_else(|err| match value {
            Value::String(text) => serde_json::from_str(text).map_err(|_| err),
            _ => Err(err),
        });
        Some(parsed.map_err(|err| ConfigError::new(key, raw_text(key, value), err.to_string())))
    }

    /// The effective configuration with UPPERCASE keys as files spell them (`METRICS` a
    /// nested mapping, durations in seconds, `PREFETCH_COUNT` as [`effective_prefetch`],
    /// unset `MAX_TASKS_PER_CHILD` as null) plus the extra keys, with secrets masked: the
    /// password of every URI, and whole values under keys containing `PASSWORD`, `SECRET` or
    /// `TOKEN`.
    ///
    /// [`effective_prefetch`]: Config::effective_prefetch
    pub fn to_masked_map(&self) -> BTreeMap<String, Value> {
        let mut map: BTreeMap<String, Value> =
            self.extra.iter().map(|(key, value)| (key.clone(), mask_json(key, value))).collect();
        let metrics = serde_json::json!({ "HOST": self.metrics.host, "PORT": self.metrics.port });
        let known = [
            ("AMQP_URI", Value::from(self.masked_amqp_uri())),
            ("AMQP_HEARTBEAT", Value::from(self.amqp_heartbeat)),
            ("SERVICE_NAME", Value::from(self.service_name.as_str())),
            ("MAX_WORKERS", Value::from(self.max_workers)),
            ("WORKER_MODE", Value::from(self.worker_mode.as_str())),
            ("MAX_TASKS_PER_CHILD", Value::from(self.max_tasks_per_child)),
            ("ENABLE_METRICS", Value::from(self.enable_metrics)),
            ("STATUS_SHOW_FAILURES", Value::from(self.status_show_failures)),
            ("METRICS", metrics),
            ("WEBSOCKET_IP", Value::from(self.websocket_ip.as_str())),
            ("WEBSOCKET_PORT", Value::from(self.websocket_port)),
            ("WEBSOCKET_ALLOWED_ORIGINS", Value::from(self.websocket_allowed_origins.clone())),
            ("WEB_SERVER_ADDRESS", Value::from(self.web_server_address.as_str())),
            ("HTTP_HEADER_READ_TIMEOUT", Value::from(self.http_header_read_timeout.as_secs_f64())),
            ("HTTP_KEEP_ALIVE_TIMEOUT", Value::from(self.http_keep_alive_timeout.as_secs_f64())),
            ("HTTP_MAX_CONNECTIONS", Value::from(self.http_max_connections)),
            ("HTTP_REQUIRE_JSON_CONTENT_TYPE", Value::from(self.http_require_json_content_type)),
            ("WEBSOCKET_IDLE_TIMEOUT", Value::from(self.websocket_idle_timeout.as_secs_f64())),
            ("WEBSOCKET_MAX_CONNECTIONS", Value::from(self.websocket_max_connections)),
            ("MAX_MESSAGE_SIZE", Value::from(self.max_message_size)),
            ("PREFETCH_COUNT", Value::from(self.effective_prefetch())),
            ("PROTOCOL", Value::from(self.protocol.as_str())),
            ("QUEUE_TYPE", Value::from(self.queue_type.as_str())),
            ("AUTO_DELETE_EVENT_EXCHANGES", Value::from(self.auto_delete_event_exchanges)),
            ("DECLARE_EVENT_EXCHANGES", Value::from(self.declare_event_exchanges)),
            ("PARENT_CALLS_TRACKED", Value::from(self.parent_calls_tracked)),
            ("RPC_EXCHANGE", Value::from(self.rpc_exchange.as_str())),
            ("RPC_TIMEOUT", Value::from(self.rpc_timeout.as_secs_f64())),
            ("RPC_PERSISTENT_REQUESTS", Value::from(self.rpc_persistent_requests)),
            ("SHUTDOWN_TIMEOUT", Value::from(self.shutdown_timeout.as_secs_f64())),
            ("RETRY_DELAY", Value::from(self.retry_delay.as_str())),
            ("LOG_FORMAT", Value::from(self.log_format.as_str())),
            ("TASK_TIME_LIMIT", Value::from(self.task_time_limit.map(|d| d.as_secs_f64()))),
            ("MAX_REDELIVERIES", Value::from(self.max_redeliveries)),
            ("AMQP_SSL_CA_FILE", Value::from(self.amqp_ssl_ca_file.clone())),
            ("AMQP_SSL_CERT_FILE", Value::from(self.amqp_ssl_cert_file.clone())),
            ("AMQP_SSL_KEY_FILE", Value::from(self.amqp_ssl_key_file.clone())),
        ];
        map.extend(known.into_iter().map(|(key, value)| (key.to_string(), value)));
        map
    }
}

/// Like a derived `Debug`, but with the AMQP password and secret extra values masked.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let extra: BTreeMap<&str, Value> =
            self.extra.iter().map(|(key, value)| (key.as_str(), mask_json(key, value))).collect();
        f.debug_struct("Config")
            .field("amqp_uri", &self.masked_amqp_uri())
            .field("amqp_heartbeat", &self.amqp_heartbeat)
            .field("service_name", &self.service_name)
            .field("max_workers", &self.max_workers)
            .field("worker_mode", &self.worker_mode)
            .field("max_tasks_per_child", &self.max_tasks_per_child)
            .field("enable_metrics", &self.enable_metrics)
            .field("status_show_failures", &self.status_show_failures)
            .field("metrics", &self.metrics)
            .field("websocket_ip", &self.websocket_ip)
            .field("websocket_port", &self.websocket_port)
            .field("websocket_allowed_origins", &self.websocket_allowed_origins)
            .field("web_server_address", &self.web_server_address)
            .field("http_header_read_timeout", &self.http_header_read_timeout)
            .field("http_keep_alive_timeout", &self.http_keep_alive_timeout)
            .field("http_max_connections", &self.http_max_connections)
            .field("http_require_json_content_type", &self.http_require_json_content_type)
            .field("websocket_idle_timeout", &self.websocket_idle_timeout)
            .field("websocket_max_connections", &self.websocket_max_connections)
            .field("max_message_size", &self.max_message_size)
            .field("prefetch_count", &self.prefetch_count)
            .field("protocol", &self.protocol)
            .field("queue_type", &self.queue_type)
            .field("auto_delete_event_exchanges", &self.auto_delete_event_exchanges)
            .field("declare_event_exchanges", &self.declare_event_exchanges)
            .field("parent_calls_tracked", &self.parent_calls_tracked)
            .field("rpc_exchange", &self.rpc_exchange)
            .field("rpc_timeout", &self.rpc_timeout)
            .field("rpc_persistent_requests", &self.rpc_persistent_requests)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("retry_delay", &self.retry_delay)
            .field("log_format", &self.log_format)
            .field("task_time_limit", &self.task_time_limit)
            .field("max_redeliveries", &self.max_redeliveries)
            .field("amqp_ssl_ca_file", &self.amqp_ssl_ca_file)
            .field("amqp_ssl_cert_file", &self.amqp_ssl_cert_file)
            .field("amqp_ssl_key_file", &self.amqp_ssl_key_file)
            .field("extra", &extra)
            .finish()
    }
}
