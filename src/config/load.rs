//! Building a [`Config`] from raw sources: environment variables and parsed YAML/TOML.
//!
//! Every source is first turned into `serde_json::Value`s, then each known key is coerced
//! leniently (numbers may be strings, strings may be numbers) by [`apply`], so all sources
//! report errors the same way.

use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value};

use super::error::raw_text;
use super::misspelling::{self, ENV_SIMILARITY, FILE_SIMILARITY};
use super::substitute::substitute_values;
use super::{Config, ConfigError};

/// The section holding `HOST` and `PORT` of the metrics server in files.
const METRICS: &str = "METRICS";

const U16: &str = "expected an integer from 0 to 65535";
const U32: &str = "expected an integer from 0 to 4294967295";
// keys that must be at least 1 (`Config::validate`) say so in their range too
const POSITIVE_U16: &str = "expected an integer from 1 to 65535";
const POSITIVE_U32: &str = "expected an integer from 1 to 4294967295";
const USIZE: &str = "expected a non-negative integer";
const BOOL: &str = "expected one of true, false, 1, 0, yes, no, on, off";

/// A known configuration key.
#[derive(Debug, Clone, Copy)]
enum Field {
    AmqpUri,
    AmqpHeartbeat,
    ServiceName,
    MaxWorkers,
    WorkerMode,
    MaxTasksPerChild,
    EnableMetrics,
    StatusShowFailures,
    MetricsHost,
    MetricsPort,
    WebsocketIp,
    WebsocketPort,
    WebsocketAllowedOrigins,
    WebServerAddress,
    HttpHeaderReadTimeout,
    HttpKeepAliveTimeout,
    HttpMaxConnections,
    HttpRequireJsonContentType,
    WebsocketIdleTimeout,
    WebsocketMaxConnections,
    MaxMessageSize,
    PrefetchCount,
    Protocol,
    QueueType,
    AutoDeleteEventExchanges,
    DeclareEventExchanges,
    ParentCallsTracked,
    RpcExchange,
    RpcTimeout,
    RpcPersistentRequests,
    ShutdownTimeout,
    RetryDelay,
    LogFormat,
    TaskTimeLimit,
    MaxRedeliveries,
    AmqpSslCaFile,
    AmqpSslCertFile,
    AmqpSslKeyFile,
}

/// Every top-level key of a file (everything but the `METRICS` section) and its field.
const FIELDS: &[(&str, Field)] = &[
    ("AMQP_URI", Field::AmqpUri),
    ("AMQP_HEARTBEAT", Field::AmqpHeartbeat),
    ("SERVICE_NAME", Field::ServiceName),
    ("MAX_WORKERS", Field::MaxWorkers),
    ("WORKER_MODE", Field::WorkerMode),
    ("MAX_TASKS_PER_CHILD", Field::MaxTasksPerChild),
    ("ENABLE_METRICS", Field::EnableMetrics),
    ("STATUS_SHOW_FAILURES", Field::StatusShowFailures),
    ("WEBSOCKET_IP", Field::WebsocketIp),
    ("WEBSOCKET_PORT", Field::WebsocketPort),
    ("WEBSOCKET_ALLOWED_ORIGINS", Field::WebsocketAllowedOrigins),
    ("WEB_SERVER_ADDRESS", Field::WebServerAddress),
    ("HTTP_HEADER_READ_TIMEOUT", Field::HttpHeaderReadTimeout),
    ("HTTP_KEEP_ALIVE_TIMEOUT", Field::HttpKeepAliveTimeout),
    ("HTTP_MAX_CONNECTIONS", Field::HttpMaxConnections),
    ("HTTP_REQUIRE_JSON_CONTENT_TYPE", Field::HttpRequireJsonContentType),
    ("WEBSOCKET_IDLE_TIMEOUT", Field::WebsocketIdleTimeout),
    ("WEBSOCKET_MAX_CONNECTIONS", Field::WebsocketMaxConnections),
    ("MAX_MESSAGE_SIZE", Field::MaxMessageSize),
    ("PREFETCH_COUNT", Field::PrefetchCount),
    ("PROTOCOL", Field::Protocol),
    ("QUEUE_TYPE", Field::QueueType),
    ("AUTO_DELETE_EVENT_EXCHANGES", Field::AutoDeleteEventExchanges),
    ("DECLARE_EVENT_EXCHANGES", Field::DeclareEventExchanges),
    ("PARENT_CALLS_TRACKED", Field::ParentCallsTracked),
    ("RPC_EXCHANGE", Field::RpcExchange),
    ("RPC_TIMEOUT", Field::RpcTimeout),
    ("RPC_PERSISTENT_REQUESTS", Field::RpcPersistentRequests),
    ("SHUTDOWN_TIMEOUT", Field::ShutdownTimeout),
    ("RETRY_DELAY", Field::RetryDelay),
    ("LOG_FORMAT", Field::LogFormat),
    ("TASK_TIME_LIMIT", Field::TaskTimeLimit),
    ("MAX_REDELIVERIES", Field::MaxRedeliveries),
    ("AMQP_SSL_CA_FILE", Field::AmqpSslCaFile),
    ("AMQP_SSL_CERT_FILE", Field::AmqpSslCertFile),
    ("AMQP_SSL_KEY_FILE", Field::AmqpSslKeyFile),
];

impl Field {
    /// The field of a key as the environment spells it (the nested `METRICS` keys joined with
    /// `_`), which a file's top level takes too.
    fn from_flat_name(name: &str) -> Option<Field> {
        match name {
            "METRICS_HOST" => Some(Field::MetricsHost),
            "METRICS_PORT" => Some(Field::MetricsPort),
            _ => FIELDS.iter().find(|(key, _)| *key == name).map(|(_, field)| *field),
        }
    }
}

/// Sets `field` of `config` from `value`, found under `key` in its source.
fn apply(config: &mut Config, field: Field, key: &str, value: &Value) -> Result<(), ConfigError> {
    let result = match field {
        Field::AmqpUri => uri_list(value).map(|v| config.amqp_uri = v),
        Field::AmqpHeartbeat => uint(value, U16).map(|v| config.amqp_heartbeat = v),
        Field::ServiceName => text(value).map(|v| config.service_name = v),
        Field::MaxWorkers => uint(value, USIZE).map(|v| config.max_workers = v),
        Field::WorkerMode => choice(value).map(|v| config.worker_mode = v),
        Field::MaxTasksPerChild => {
            optional(value, |v| uint(v, POSITIVE_U32)).map(|v| config.max_tasks_per_child = v)
        }
        Field::EnableMetrics => boolean(value).map(|v| config.enable_metrics = v),
        Field::StatusShowFailures => boolean(value).map(|v| config.status_show_failures = v),
        Field::MetricsHost => text(value).map(|v| config.metrics.host = v),
        Field::MetricsPort => uint(value, U16).map(|v| config.metrics.port = v),
        Field::WebsocketIp => text(value).map(|v| config.websocket_ip = v),
        Field::WebsocketPort => uint(value, U16).map(|v| config.websocket_port = v),
        Field::WebsocketAllowedOrigins => {
            origin_list(value).map(|v| config.websocket_allowed_origins = v)
        }
        Field::WebServerAddress => address(value).map(|v| config.web_server_address = v),
        Field::HttpHeaderReadTimeout => seconds(value).map(|v| config.http_header_read_timeout = v),
        Field::HttpKeepAliveTimeout => seconds(value).map(|v| config.http_keep_alive_timeout = v),
        Field::HttpMaxConnections => uint(value, USIZE).map(|v| config.http_max_connections = v),
        Field::HttpRequireJsonContentType => {
            boolean(value).map(|v| config.http_require_json_content_type = v)
        }
        Field::WebsocketIdleTimeout => seconds(value).map(|v| config.websocket_idle_timeout = v),
        Field::WebsocketMaxConnections => {
            uint(value, USIZE).map(|v| config.websocket_max_connections = v)
        }
        Field::MaxMessageSize => uint(value, USIZE).map(|v| config.max_message_size = v),
        Field::PrefetchCount => {
            optional(value, |v| uint(v, POSITIVE_U16)).map(|v| config.prefetch_count = v)
        }
        Field::Protocol => choice(value).map(|v| config.protocol = v),
        Field::QueueType => choice(value).map(|v| config.queue_type = v),
        Field::AutoDeleteEventExchanges => {
            boolean(value).map(|v| config.auto_delete_event_exchanges = v)
        }
        Field::DeclareEventExchanges => boolean(value).map(|v| config.declare_event_exchanges = v),
        Field::ParentCallsTracked => uint(value, USIZE).map(|v| config.parent_calls_tracked = v),
        Field::RpcExchange => text(value).map(|v| config.rpc_exchange = v),
        Field::RpcTimeout => seconds(value).map(|v| config.rpc_timeout = v),
        Field::RpcPersistentRequests => boolean(value).map(|v| config.rpc_persistent_requests = v),
        Field::ShutdownTimeout => seconds(value).map(|v| config.shutdown_timeout = v),
        Field::RetryDelay => choice(value).map(|v| config.retry_delay = v),
        Field::LogFormat => choice(value).map(|v| config.log_format = v),
        Field::TaskTimeLimit => optional(value, seconds).map(|v| config.task_time_limit = v),
        Field::MaxRedeliveries => uint(value, U32).map(|v| config.max_redeliveries = v),
        Field::AmqpSslCaFile => optional(value, text).map(|v| config.amqp_ssl_ca_file = v),
        Field::AmqpSslCertFile => optional(value, text).map(|v| config.amqp_ssl_cert_file = v),
        Field::AmqpSslKeyFile => optional(value, text).map(|v| config.amqp_ssl_key_file = v),
    };
    result.map_err(|reason| ConfigError::new(key, raw_text(key, value), reason))
}

/// A string; numbers are taken as their decimal text.
fn text(value: &Value) -> Result<String, String> {
    match value {
        Value::String(text) => Ok(text.clone()),
        Value::Number(number) => Ok(number.to_string()),
        _ => Err("expected a string".to_string()),
    }
}

/// `AMQP_URI`: a string, or a list of strings (the nodes of a cluster) joined with `,`.
fn uri_list(value: &Value) -> Result<String, String> {
    match value {
        Value::Array(items) => {
            let expected = || "expected a URI or a list of URIs (strings)".to_string();
            let uris: Vec<String> = items
                .iter()
                .map(|item| text(item).map_err(|_| expected()))
                .collect::<Result<_, _>>()?;
            Ok(uris.join(","))
        }
        other => text(other),
    }
}

/// `WEBSOCKET_ALLOWED_ORIGINS`: a list of strings, or one string of comma-separated entries
/// (as the environment gives it); null or a blank string is the empty list (any origin).
/// [`Config::validate`] checks each entry.
fn origin_list(value: &Value) -> Result<Vec<String>, String> {
    let expected = || "expected a list of origins (strings)".to_string();
    match value {
        Value::Null => Ok(Vec::new()),
        Value::String(text) if text.trim().is_empty() => Ok(Vec::new()),
        Value::String(text) => Ok(text.split(',').map(|entry| entry.trim().to_owned()).collect()),
        Value::Array(items) => {
            items.iter().map(|item| item.as_str().map(str::to_owned).ok_or_else(expected)).collect()
        }
        _ => Err(expected()),
    }
}

/// A `host:port` listening address (the host may be a name, an IPv4 or a bracketed IPv6
/// address). A bare port means every IPv4 interface, as Nameko reads it.
fn address(value: &Value) -> Result<String, String> {
    bind_address(&text(value)?)
}

/// `address` (`WEB_SERVER_ADDRESS`) as `host:port`: a bare port, as Nameko takes it, is on
/// every interface.
pub(super) fn bind_address(address: &str) -> Result<String, String> {
    if let Ok(port) = address.trim().parse::<u16>() {
        return Ok(format!("0.0.0.0:{port}"));
    }
    let expected = || "expected host:port or a port, e.g. 0.0.0.0:8000".to_string();
    let (host, port) = address.rsplit_once(':').ok_or_else(expected)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(expected());
    }
    Ok(address.to_owned())
}

/// A non-negative integer fitting `T`, as a number or a string; `expected` is the reason
/// given otherwise.
fn uint<T: TryFrom<u64>>(value: &Value, expected: &str) -> Result<T, String> {
    let number = match value {
        Value::Number(number) => number.as_u64(),
        Value::String(text) => text.trim().parse::<u64>().ok(),
        _ => None,
    };
    number.and_then(|n| T::try_from(n).ok()).ok_or_else(|| expected.to_string())
}

/// `None` for null or a blank string, else what `parse` makes of `value`.
fn optional<T>(
    value: &Value,
    parse: impl FnOnce(&Value) -> Result<T, String>,
) -> Result<Option<T>, String> {
    match value {
        Value::Null => Ok(None),
        Value::String(text) if text.trim().is_empty() => Ok(None),
        other => parse(other).map(Some),
    }
}

/// A boolean: `true`/`false`, `1`/`0`, `yes`/`no` or `on`/`off` (strings case-insensitive;
/// PyYAML reads the last two pairs as booleans in files shared with the Python peers).
fn boolean(value: &Value) -> Result<bool, String> {
    let flag = match value {
        Value::Bool(flag) => Some(*flag),
        Value::Number(number) => match number.as_u64() {
            Some(1) => Some(true),
            Some(0) => Some(false),
            _ => None,
        },
        Value::String(text) => match text.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Some(true),
            "false" | "0" | "no" | "off" => Some(false),
            _ => None,
        },
        _ => None,
    };
    flag.ok_or_else(|| BOOL.to_string())
}

/// A duration given as a number of seconds (fractions allowed), as a number or a string.
/// Zero is accepted here and rejected by [`Config::validate`]; a positive value under a
/// nanosecond, which a duration would round to zero, is refused here.
fn seconds(value: &Value) -> Result<Duration, String> {
    let secs = match value {
        Value::Number(number) => number.as_f64(),
        Value::String(text) => text.trim().parse::<f64>().ok(),
        _ => None,
    }
    .ok_or_else(|| "expected a number of seconds".to_string())?;
    let duration = Duration::try_from_secs_f64(secs).map_err(|_| {
        // positive and finite, yet more seconds than a duration holds
        if secs.is_finite() && secs > 0.0 {
            format!("must be at most {} seconds", u64::MAX)
        } else {
            "must be a positive, finite number of seconds".to_string()
        }
    })?;
    // refused here, where the value given is known: validation would see a zero duration
    if duration.is_zero() && secs > 0.0 {
        return Err("must be at least 0.000000001 seconds (one nanosecond)".to_string());
    }
    Ok(duration)
}

/// One of an enum's words (see [`super::modes`]).
fn choice<T: std::str::FromStr<Err = ConfigError>>(value: &Value) -> Result<T, String> {
    text(value)?.parse().map_err(|err: ConfigError| err.reason)
}

/// [`Config::from_vars`]: known variables set their field, all others are ignored.
pub(super) fn from_vars(
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let mut config = Config::default();
    for (name, value) in vars {
        if let Some(field) = Field::from_flat_name(&name) {
            apply(&mut config, field, &name, &Value::String(value))?;
        } else if let Some(key) = closest_key_within(&name, ENV_SIMILARITY, ENV_METRICS) {
            config.misspelt_env.0.push((name, key));
        }
    }
    config.misspelt_env.0.sort();
    config.misspelt_env.0.dedup();
    config.validate()?;
    Ok(config)
}

/// The process environment as UTF-8 pairs. Variables that are not UTF-8 are skipped, unless
/// they are configuration keys, which is an error.
pub(crate) fn process_env() -> Result<Vec<(String, String)>, ConfigError> {
    let mut vars = Vec::new();
    for (name, value) in std::env::vars_os() {
        match (name.into_string(), value.into_string()) {
            (Ok(name), Ok(value)) => vars.push((name, value)),
            (Ok(name), Err(value)) if Field::from_flat_name(&name).is_some() => {
                return Err(ConfigError::new(name, value.to_string_lossy(), "is not valid UTF-8"));
            }
            _ => {}
        }
    }
    Ok(vars)
}

/// The process environment's variable `name`, for a `${NAME}` of a file. One set but not
/// UTF-8 is refused, not taken as unset (which would take its default silently); its value,
/// often a password, is not shown.
pub(super) fn process_var(name: &str) -> Result<Option<String>, ConfigError> {
    match std::env::var(name) {
        Ok(value) => Ok(Some(value)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(ConfigError::new(name, "", "is not valid UTF-8 (used in config file)"))
        }
    }
}

/// The format of a configuration file.
#[derive(Debug, Clone, Copy)]
pub(super) enum Format {
    Yaml,
    Toml,
}

impl Format {
    /// The format named by the extension of `path` (case-insensitive).
    pub(super) fn of(path: &Path) -> Result<Format, ConfigError> {
        let extension = path.extension().and_then(|ext| ext.to_str()).map(str::to_ascii_lowercase);
        match extension.as_deref() {
            Some("yaml" | "yml") => Ok(Format::Yaml),
            Some("toml") => Ok(Format::Toml),
            _ => Err(ConfigError::new(
                path.display().to_string(),
                "",
                "unsupported config file extension: expected .yaml, .yml or .toml",
            )),
        }
    }
}

/// Parses `text` as `format`, substitutes `${VAR}` references in its string values and
/// builds the configuration. Syntax errors name `origin` (a path, `<yaml>` or `<toml>`) as
/// their key.
pub(super) fn from_text(
    text: &str,
    format: Format,
    origin: &str,
    vars: &impl Fn(&str) -> Result<Option<String>, ConfigError>,
) -> Result<Config, ConfigError> {
    from_text_replacing(text, format, origin, vars, None)
}

/// [`from_text`], with `replaced`, a top-level key and its value, in place of the text's: the
/// text's value of that key is neither substituted nor checked.
pub(super) fn from_text_replacing(
    text: &str,
    format: Format,
    origin: &str,
    vars: &impl Fn(&str) -> Result<Option<String>, ConfigError>,
    replaced: Option<(&str, &str)>,
) -> Result<Config, ConfigError> {
    let left_out = replaced.map(|(key, _)| key);
    let mut map = match format {
        Format::Yaml => top_level(super::yaml::parse(text, origin, vars, left_out)?, origin)?,
        Format::Toml => {
            let mut map = top_level(parse_toml(text, origin)?, origin)?;
            if let Some(key) = left_out {
                map.remove(key);
            }
            for (key, value) in map.iter_mut() {
                substitute_values(value, key, vars)?;
            }
            map
        }
    };
    if let Some((key, value)) = replaced {
        map.insert(key.to_owned(), Value::String(value.to_owned()));
    }
    from_map(map)
}

/// The mapping at the top level of a document (an empty document is an empty mapping).
fn top_level(document: Value, origin: &str) -> Result<Map<String, Value>, ConfigError> {
    match document {
        Value::Object(map) => Ok(map),
        Value::Null => Ok(Map::new()),
        _ => Err(ConfigError::new(origin, "", "expected a mapping of keys at the top level")),
    }
}

/// Parses TOML text into a JSON value. The error gives the parser's message and position,
/// never the offending line (it may hold a secret).
fn parse_toml(text: &str, origin: &str) -> Result<Value, ConfigError> {
    match toml::from_str::<toml::Table>(text) {
        Ok(table) => Ok(toml_to_json(toml::Value::Table(table))),
        Err(err) => {
            let message = err.message().trim_end();
            let reason = match err.span() {
                Some(span) => {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let column = before.rsplit('\n').next().map_or(0, |s| s.chars().count()) + 1;
                    format!("{message} at line {line} column {column}")
                }
                None => message.to_string(),
            };
            Err(ConfigError::new(origin, "", reason))
        }
    }
}

/// Converts TOML to JSON: date-times and non-finite floats become strings.
fn toml_to_json(value: toml::Value) -> Value {
    match value {
        toml::Value::String(text) => Value::String(text),
        toml::Value::Integer(number) => Value::from(number),
        toml::Value::Float(number) => serde_json::Number::from_f64(number)
            .map_or_else(|| Value::String(number.to_string()), Value::Number),
        toml::Value::Boolean(flag) => Value::Bool(flag),
        toml::Value::Datetime(datetime) => Value::String(datetime.to_string()),
        toml::Value::Array(items) => Value::Array(items.into_iter().map(toml_to_json).collect()),
        toml::Value::Table(table) => Value::Object(
            table.into_iter().map(|(key, value)| (key, toml_to_json(value))).collect(),
        ),
    }
}

/// Builds the configuration from a file's top-level mapping: known keys set their field,
/// `METRICS` holds `HOST` and `PORT` (also taken spelt as in the environment,
/// `METRICS_HOST` and `METRICS_PORT`, as the README's table gives both), unknown keys go to
/// [`Config::extra`].
fn from_map(map: Map<String, Value>) -> Result<Config, ConfigError> {
    refuse_metrics_given_twice(&map)?;
    let mut config = Config::default();
    for (key, value) in map {
        if key == METRICS {
            apply_metrics(&mut config, &value)?;
        } else if let Some(field) = Field::from_flat_name(&key) {
            apply(&mut config, field, &key, &value)?;
        } else {
            config.extra.insert(key, value);
        }
    }
    config.validate()?;
    Ok(config)
}

/// Refuse a file that gives a `METRICS` key both in the section and spelt as in the
/// environment: which one wins would depend on the keys' order.
fn refuse_metrics_given_twice(map: &Map<String, Value>) -> Result<(), ConfigError> {
    let section = map.get(METRICS).and_then(Value::as_object);
    for flat in ENV_METRICS {
        let nested = flat.trim_start_matches("METRICS_");
        if let (Some(value), Some(_)) = (map.get(*flat), section.and_then(|s| s.get(nested))) {
            let reason = format!("given twice: also as {nested} in the {METRICS} mapping");
            return Err(ConfigError::new(*flat, raw_text(flat, value), reason));
        }
    }
    Ok(())
}

/// Applies the `METRICS` section (`HOST`, `PORT`; null leaves the defaults).
fn apply_metrics(config: &mut Config, section: &Value) -> Result<(), ConfigError> {
    let entries = match section {
        Value::Null => return Ok(()),
        Value::Object(entries) => entries,
        other => {
            return Err(ConfigError::new(
                METRICS,
                raw_text(METRICS, other),
                "expected a mapping with HOST and PORT",
            ))
        }
    };
    for (name, value) in entries {
        let key = format!("{METRICS}.{name}");
        let field = match name.as_str() {
            "HOST" => Field::MetricsHost,
            "PORT" => Field::MetricsPort,
            _ => {
                let shown = raw_text(&key, value);
                return Err(ConfigError::new(
                    key,
                    shown,
                    "unknown key in METRICS: expected HOST or PORT",
                ));
            }
        };
        apply(config, field, &key, value)?;
    }
    Ok(())
}

/// The `METRICS` keys as environment variables spell them.
const ENV_METRICS: &[&str] = &["METRICS_HOST", "METRICS_PORT"];

/// The framework's key closest to `key`, when `key` looks like a misspelling of it.
pub(super) fn closest_key(key: &str) -> Option<&'static str> {
    closest_key_within(key, FILE_SIMILARITY, &[METRICS, ENV_METRICS[0], ENV_METRICS[1]])
}

/// The framework's key closest to `key` ([`misspelling::closest`]) among the top-level keys
/// and `nested` (how the source spells the `METRICS` keys).
fn closest_key_within(key: &str, similarity: f64, nested: &[&'static str]) -> Option<&'static str> {
    let known = FIELDS.iter().map(|(name, _)| *name).chain(nested.iter().copied());
    misspelling::closest(key, similarity, known)
}
