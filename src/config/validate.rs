//! [`Config::validate`]: the checks every `Config::from_*` makes, each naming its key and
//! value.

use super::{
    amqp_uri, load, origins, Config, ConfigError, MAX_HTTP_CONNECTIONS, MAX_PEER_TIMEOUT,
    MAX_WORKERS_LIMIT,
};

/// The longest `SERVICE_NAME`: 255 bytes less the 47 its reply queue name adds.
const MAX_SERVICE_NAME_BYTES: usize = 255 - "rpc.reply--".len() - 36;

impl Config {
    /// Checks what the types cannot: `SERVICE_NAME` is set, has no whitespace, no `://`, no
    /// topic wildcard (`*`, `#`) and at most 208 bytes, `AMQP_URI` is an `amqp://`,
    /// `amqps://` or `memory://` URI or a list of `amqp(s)://` URIs (none empty, same vhost,
    /// same credentials), each `amqp(s)://` one read as the transport reads it (a host, a
    /// port other than 0, numeric options, `frame_max` at least 4096), `RPC_EXCHANGE` is neither blank nor padded with whitespace,
    /// `MAX_WORKERS`, `MAX_TASKS_PER_CHILD`, `PREFETCH_COUNT`, `HTTP_MAX_CONNECTIONS` and
    /// `WEBSOCKET_MAX_CONNECTIONS` are not 0 (and `MAX_WORKERS` at most
    /// [`MAX_WORKERS_LIMIT`], the two connection caps at most [`MAX_HTTP_CONNECTIONS`]), `MAX_MESSAGE_SIZE` is at least 1, `RPC_TIMEOUT` and
    /// `SHUTDOWN_TIMEOUT` are not zero, `TASK_TIME_LIMIT` is unset or a positive, finite
    /// number of seconds, `WEB_SERVER_ADDRESS` is `host:port` or a port, the HTTP and
    /// WebSocket timeouts are neither zero nor longer than [`MAX_PEER_TIMEOUT`],
    /// `WEBSOCKET_ALLOWED_ORIGINS` holds `http(s)://host[:port]` origins (no path, query,
    /// wildcard or empty entry) or `*` alone, and
    /// `AMQP_SSL_CERT_FILE` and `AMQP_SSL_KEY_FILE` are set together.
    /// Every `from_*` calls it; [`Config::new`] does not.
    ///
    /// # Errors
    /// The first failing check, naming its key and value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.service_name.is_empty() {
            return Err(ConfigError::new("SERVICE_NAME", "", "is required"));
        }
        if self.service_name.chars().any(char::is_whitespace) {
            return Err(ConfigError::new(
                "SERVICE_NAME",
                &self.service_name,
                "must not contain whitespace",
            ));
        }
        // A URI here is a mistake (most likely AMQP_URI's value) that would put its password
        // in queue names, logs and every view of the config.
        if self.service_name.contains("://") {
            return Err(ConfigError::new(
                "SERVICE_NAME",
                &self.service_name,
                "looks like a URI: a service name is a plain name such as `orders`",
            ));
        }
        // The RPC queue is bound with `{SERVICE_NAME}.*`: a topic wildcard in the name would
        // bind it to other services' requests (`*.*` takes every call on the exchange).
        if self.service_name.contains(['*', '#']) {
            return Err(ConfigError::new(
                "SERVICE_NAME",
                &self.service_name,
                "must not contain `*` or `#`: the RPC queue is bound with `{SERVICE_NAME}.*`, so \
                 the name would match other services' calls",
            ));
        }
        // An RpcProxy's reply queue `rpc.reply-{SERVICE_NAME}-{uuid}` is 47 bytes longer than
        // the name: past this, the service starts and every call it makes fails.
        if self.service_name.len() > MAX_SERVICE_NAME_BYTES {
            return Err(ConfigError::new(
                "SERVICE_NAME",
                &self.service_name,
                format!(
                    "is {} bytes; must be at most {MAX_SERVICE_NAME_BYTES} bytes: the reply queue \
                     `rpc.reply-{{SERVICE_NAME}}-{{uuid}}` must fit AMQP's 255-byte names",
                    self.service_name.len()
                ),
            ));
        }
        amqp_uri::validate(&self.amqp_uri)?;
        if let Err(reason) = load::bind_address(&self.web_server_address) {
            return Err(ConfigError::new("WEB_SERVER_ADDRESS", &self.web_server_address, reason));
        }
        // "" names the default exchange, which cannot be declared (ACCESS_REFUSED at
        // start-up, naming no key) and routes a request by queue name, so to no RPC queue.
        if self.rpc_exchange.trim().is_empty() {
            return Err(ConfigError::new(
                "RPC_EXCHANGE",
                &self.rpc_exchange,
                "must not be empty (Nameko's is `nameko-rpc`)",
            ));
        }
        // a stray space names another exchange than the peers': every call would end in
        // UnknownService, with nothing to say why
        if self.rpc_exchange.trim() != self.rpc_exchange {
            return Err(ConfigError::new(
                "RPC_EXCHANGE",
                &self.rpc_exchange,
                "must not start or end with whitespace",
            ));
        }
        let at_least_one = [
            ("MAX_WORKERS", self.max_workers == 0, ""),
            ("MAX_MESSAGE_SIZE", self.max_message_size == 0, ""),
            ("HTTP_MAX_CONNECTIONS", self.http_max_connections == 0, ""),
            ("WEBSOCKET_MAX_CONNECTIONS", self.websocket_max_connections == 0, ""),
            ("MAX_TASKS_PER_CHILD", self.max_tasks_per_child == Some(0), " (or unset: no limit)"),
            ("PREFETCH_COUNT", self.prefetch_count == Some(0), " (or unset: MAX_WORKERS)"),
        ];
        for (key, is_zero, hint) in at_least_one {
            if is_zero {
                return Err(ConfigError::new(key, "0", format!("must be at least 1{hint}")));
            }
        }
        let positive = [
            ("RPC_TIMEOUT", Some(self.rpc_timeout), ""),
            ("SHUTDOWN_TIMEOUT", Some(self.shutdown_timeout), ""),
            ("TASK_TIME_LIMIT", self.task_time_limit, " (or unset: no limit)"),
        ];
        for (key, duration, hint) in positive {
            if duration.is_some_and(|duration| duration.is_zero()) {
                return Err(ConfigError::new(
                    key,
                    "0",
                    format!("must be a positive, finite number of seconds{hint}"),
                ));
            }
        }
        if self.max_workers > MAX_WORKERS_LIMIT {
            return Err(ConfigError::new(
                "MAX_WORKERS",
                self.max_workers.to_string(),
                format!("must be at most {MAX_WORKERS_LIMIT}"),
            ));
        }
        let connections = [
            ("HTTP_MAX_CONNECTIONS", self.http_max_connections),
            ("WEBSOCKET_MAX_CONNECTIONS", self.websocket_max_connections),
        ];
        for (key, connections) in connections {
            if connections > MAX_HTTP_CONNECTIONS {
                return Err(ConfigError::new(
                    key,
                    connections.to_string(),
                    format!("must be at most {MAX_HTTP_CONNECTIONS}"),
                ));
            }
        }
        origins::validate(&self.websocket_allowed_origins)?;
        self.validate_client_certificate()?;
        self.validate_peer_timeouts()
    }

    /// Checks that `AMQP_SSL_CERT_FILE` and `AMQP_SSL_KEY_FILE` are set together: a client
    /// certificate is of no use without its key, nor a key without its certificate.
    fn validate_client_certificate(&self) -> Result<(), ConfigError> {
        match (&self.amqp_ssl_cert_file, &self.amqp_ssl_key_file) {
            (Some(cert), None) => Err(ConfigError::new(
                "AMQP_SSL_CERT_FILE",
                cert,
                "is set without AMQP_SSL_KEY_FILE: a client certificate needs its key (set both \
                 or neither)",
            )),
            (None, Some(key)) => Err(ConfigError::new(
                "AMQP_SSL_KEY_FILE",
                key,
                "is set without AMQP_SSL_CERT_FILE: a client key needs its certificate (set \
                 both or neither)",
            )),
            _ => Ok(()),
        }
    }

    /// Checks that the timeouts that close a silent peer's connection are positive and at
    /// most [`MAX_PEER_TIMEOUT`]: a longer one protects nothing.
    fn validate_peer_timeouts(&self) -> Result<(), ConfigError> {
        let timeouts = [
            ("HTTP_HEADER_READ_TIMEOUT", self.http_header_read_timeout),
            ("HTTP_KEEP_ALIVE_TIMEOUT", self.http_keep_alive_timeout),
            ("WEBSOCKET_IDLE_TIMEOUT", self.websocket_idle_timeout),
        ];
        for (key, duration) in timeouts {
            let value = duration.as_secs_f64().to_string();
            if duration.is_zero() {
                return Err(ConfigError::new(
                    key,
                    value,
                    "must be a positive, finite number of seconds",
                ));
            }
            if duration > MAX_PEER_TIMEOUT {
                let most = MAX_PEER_TIMEOUT.as_secs();
                return Err(ConfigError::new(
                    key,
                    value,
                    format!("must be at most {most} seconds (one day)"),
                ));
            }
        }
        Ok(())
    }
}
