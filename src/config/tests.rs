//! Tests of loading, validation and masking.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use super::error::mask_text;
use super::*;

/// No environment variables.
fn no_env(_: &str) -> Option<String> {
    None
}

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn ok(result: Result<Config, ConfigError>) -> Config {
    match result {
        Ok(config) => config,
        Err(err) => panic!("unexpected error: {err}"),
    }
}

fn err(result: Result<Config, ConfigError>) -> ConfigError {
    match result {
        Ok(config) => panic!("expected an error, got {config:?}"),
        Err(err) => err,
    }
}

fn env_err(pairs: &[(&str, &str)]) -> ConfigError {
    err(Config::from_vars(vars(pairs)))
}

fn yaml_err(text: &str) -> ConfigError {
    err(Config::from_yaml_str(text, &no_env))
}

/// The configuration with every key changed from its default, as the tests load it.
fn everything_changed() -> Config {
    Config {
        amqp_uri: "amqps://svc:pw@mq.example:5671/prod".to_string(),
        amqp_heartbeat: 15,
        service_name: "orders".to_string(),
        max_workers: 7,
        worker_mode: WorkerMode::GreedyProcess,
        max_tasks_per_child: Some(100),
        enable_metrics: true,
        status_show_failures: true,
        metrics: MetricsConfig { host: "127.0.0.1".to_string(), port: 9100 },
        websocket_ip: "127.0.0.2".to_string(),
        websocket_port: 9000,
        websocket_allowed_origins: vec![
            "https://app.example.com".to_string(),
            "http://localhost:3000".to_string(),
        ],
        web_server_address: "127.0.0.1:8080".to_string(),
        http_header_read_timeout: Duration::from_secs(10),
        http_keep_alive_timeout: Duration::from_millis(2500),
        http_max_connections: 64,
        http_require_json_content_type: true,
        websocket_idle_timeout: Duration::from_secs(90),
        websocket_max_connections: 32,
        max_message_size: 1048576,
        prefetch_count: Some(20),
        protocol: Protocol::MicroFramework,
        queue_type: QueueType::Quorum,
        auto_delete_event_exchanges: true,
        declare_event_exchanges: false,
        parent_calls_tracked: 25,
        rpc_exchange: "my-rpc".to_string(),
        rpc_timeout: Duration::from_millis(2500),
        rpc_persistent_requests: false,
        shutdown_timeout: Duration::from_secs(5),
        retry_delay: RetryDelay::DelayedMessagePlugin,
        log_format: LogFormat::Json,
        task_time_limit: Some(Duration::from_secs(12)),
        max_redeliveries: 9,
        amqp_ssl_ca_file: Some("/etc/ssl/ca.pem".to_string()),
        amqp_ssl_cert_file: Some("/etc/ssl/client.pem".to_string()),
        amqp_ssl_key_file: Some("/etc/ssl/client.key".to_string()),
        extra: BTreeMap::new(),
        misspelt_env: Misspelt::default(),
    }
}

const ALL_ENV: &[(&str, &str)] = &[
    ("AMQP_URI", "amqps://svc:pw@mq.example:5671/prod"),
    ("AMQP_HEARTBEAT", "15"),
    ("SERVICE_NAME", "orders"),
    ("MAX_WORKERS", "7"),
    ("WORKER_MODE", "greedy_process"),
    ("MAX_TASKS_PER_CHILD", "100"),
    ("ENABLE_METRICS", "yes"),
    ("STATUS_SHOW_FAILURES", "true"),
    ("METRICS_HOST", "127.0.0.1"),
    ("METRICS_PORT", "9100"),
    ("WEBSOCKET_IP", "127.0.0.2"),
    ("WEBSOCKET_PORT", "9000"),
    ("WEBSOCKET_ALLOWED_ORIGINS", "https://app.example.com, http://localhost:3000"),
    ("WEB_SERVER_ADDRESS", "127.0.0.1:8080"),
    ("HTTP_HEADER_READ_TIMEOUT", "10"),
    ("HTTP_KEEP_ALIVE_TIMEOUT", "2.5"),
    ("HTTP_MAX_CONNECTIONS", "64"),
    ("HTTP_REQUIRE_JSON_CONTENT_TYPE", "yes"),
    ("WEBSOCKET_IDLE_TIMEOUT", "90"),
    ("WEBSOCKET_MAX_CONNECTIONS", "32"),
    ("MAX_MESSAGE_SIZE", "1048576"),
    ("PREFETCH_COUNT", "20"),
    ("PROTOCOL", "micro_framework"),
    ("QUEUE_TYPE", "quorum"),
    ("AUTO_DELETE_EVENT_EXCHANGES", "TRUE"),
    ("DECLARE_EVENT_EXCHANGES", "no"),
    ("PARENT_CALLS_TRACKED", "25"),
    ("RPC_EXCHANGE", "my-rpc"),
    ("RPC_TIMEOUT", "2.5"),
    ("RPC_PERSISTENT_REQUESTS", "no"),
    ("SHUTDOWN_TIMEOUT", "5"),
    ("RETRY_DELAY", "delayed_message_plugin"),
    ("LOG_FORMAT", "json"),
    ("TASK_TIME_LIMIT", "12"),
    ("MAX_REDELIVERIES", "9"),
    ("AMQP_SSL_CA_FILE", "/etc/ssl/ca.pem"),
    ("AMQP_SSL_CERT_FILE", "/etc/ssl/client.pem"),
    ("AMQP_SSL_KEY_FILE", "/etc/ssl/client.key"),
];

const ALL_YAML: &str = r#"
AMQP_URI: amqps://svc:pw@mq.example:5671/prod
AMQP_HEARTBEAT: 15
SERVICE_NAME: orders
MAX_WORKERS: "7"
WORKER_MODE: greedy_process
MAX_TASKS_PER_CHILD: 100
ENABLE_METRICS: true
STATUS_SHOW_FAILURES: true
METRICS:
  HOST: 127.0.0.1
  PORT: "9100"
WEBSOCKET_IP: 127.0.0.2
WEBSOCKET_PORT: 9000
WEBSOCKET_ALLOWED_ORIGINS: [https://app.example.com, "http://localhost:3000"]
WEB_SERVER_ADDRESS: 127.0.0.1:8080
HTTP_HEADER_READ_TIMEOUT: 10
HTTP_KEEP_ALIVE_TIMEOUT: "2.5"
HTTP_MAX_CONNECTIONS: 64
HTTP_REQUIRE_JSON_CONTENT_TYPE: true
WEBSOCKET_IDLE_TIMEOUT: 90
WEBSOCKET_MAX_CONNECTIONS: 32
MAX_MESSAGE_SIZE: 1048576
PREFETCH_COUNT: 20
PROTOCOL: micro_framework
QUEUE_TYPE: quorum
AUTO_DELETE_EVENT_EXCHANGES: "yes"
DECLARE_EVENT_EXCHANGES: false
PARENT_CALLS_TRACKED: 25
RPC_EXCHANGE: my-rpc
RPC_TIMEOUT: 2.5
RPC_PERSISTENT_REQUESTS: false
SHUTDOWN_TIMEOUT: "5"
RETRY_DELAY: delayed_message_plugin
LOG_FORMAT: json
TASK_TIME_LIMIT: 12
MAX_REDELIVERIES: 9
AMQP_SSL_CA_FILE: /etc/ssl/ca.pem
AMQP_SSL_CERT_FILE: /etc/ssl/client.pem
AMQP_SSL_KEY_FILE: /etc/ssl/client.key
"#;

const ALL_TOML: &str = r#"
AMQP_URI = "amqps://svc:pw@mq.example:5671/prod"
AMQP_HEARTBEAT = 15
SERVICE_NAME = "orders"
MAX_WORKERS = "7"
WORKER_MODE = "greedy_process"
MAX_TASKS_PER_CHILD = 100
ENABLE_METRICS = true
STATUS_SHOW_FAILURES = true
WEBSOCKET_IP = "127.0.0.2"
WEBSOCKET_PORT = 9000
WEBSOCKET_ALLOWED_ORIGINS = ["https://app.example.com", "http://localhost:3000"]
WEB_SERVER_ADDRESS = "127.0.0.1:8080"
HTTP_HEADER_READ_TIMEOUT = 10
HTTP_KEEP_ALIVE_TIMEOUT = 2.5
HTTP_MAX_CONNECTIONS = "64"
HTTP_REQUIRE_JSON_CONTENT_TYPE = true
WEBSOCKET_IDLE_TIMEOUT = 90
WEBSOCKET_MAX_CONNECTIONS = 32
MAX_MESSAGE_SIZE = 1048576
PREFETCH_COUNT = 20
PROTOCOL = "micro_framework"
QUEUE_TYPE = "quorum"
AUTO_DELETE_EVENT_EXCHANGES = "1"
DECLARE_EVENT_EXCHANGES = false
PARENT_CALLS_TRACKED = 25
RPC_EXCHANGE = "my-rpc"
RPC_TIMEOUT = 2.5
RPC_PERSISTENT_REQUESTS = "0"
SHUTDOWN_TIMEOUT = 5
RETRY_DELAY = "delayed_message_plugin"
LOG_FORMAT = "json"
TASK_TIME_LIMIT = 12
MAX_REDELIVERIES = 9
AMQP_SSL_CA_FILE = "/etc/ssl/ca.pem"
AMQP_SSL_CERT_FILE = "/etc/ssl/client.pem"
AMQP_SSL_KEY_FILE = "/etc/ssl/client.key"

[METRICS]
HOST = "127.0.0.1"
PORT = 9100
"#;

// ---------------------------------------------------------------- defaults

#[test]
fn defaults() {
    let config = Config::new("svc");
    assert_eq!(config.amqp_uri, "amqp://guest:guest@localhost:5672/");
    assert_eq!(config.amqp_heartbeat, 60);
    assert_eq!(config.service_name, "svc");
    assert_eq!(config.max_workers, 3);
    assert_eq!(config.worker_mode, WorkerMode::Thread);
    assert_eq!(config.max_tasks_per_child, None);
    assert!(!config.enable_metrics);
    assert_eq!(config.metrics, MetricsConfig { host: "0.0.0.0".to_string(), port: 8000 });
    assert_eq!(config.websocket_ip, "0.0.0.0");
    assert_eq!(config.websocket_port, 8765);
    assert!(config.websocket_allowed_origins.is_empty());
    assert_eq!(config.web_server_address, "0.0.0.0:8000");
    assert_eq!(config.http_header_read_timeout, Duration::from_secs(60));
    assert_eq!(config.http_keep_alive_timeout, Duration::from_secs(75));
    assert_eq!(config.http_max_connections, 1024);
    assert!(!config.http_require_json_content_type);
    assert_eq!(config.websocket_idle_timeout, Duration::from_secs(60));
    assert_eq!(config.websocket_max_connections, 1024);
    assert_eq!(config.max_message_size, 16 * 1024 * 1024);
    assert_eq!(config.prefetch_count, None);
    assert_eq!(config.effective_prefetch(), 3);
    assert_eq!(config.protocol, Protocol::Nameko);
    assert_eq!(config.queue_type, QueueType::Classic);
    assert!(!config.auto_delete_event_exchanges);
    assert!(config.declare_event_exchanges);
    assert_eq!(config.parent_calls_tracked, 10);
    assert_eq!(config.rpc_exchange, "nameko-rpc");
    assert_eq!(config.rpc_timeout, Duration::from_secs(30));
    assert!(config.rpc_persistent_requests);
    assert_eq!(config.shutdown_timeout, Duration::from_secs(30));
    assert!(config.extra.is_empty());
    assert_eq!(config.validate(), Ok(()));
    assert_eq!(Config::default(), config.with_service_name(String::new()));
}

#[test]
fn minimal_sources_give_the_defaults() {
    let expected = Config::new("svc");
    assert_eq!(ok(Config::from_vars(vars(&[("SERVICE_NAME", "svc")]))), expected);
    assert_eq!(ok(Config::from_yaml_str("SERVICE_NAME: svc", &no_env)), expected);
    assert_eq!(ok(Config::from_toml_str("SERVICE_NAME = 'svc'", &no_env)), expected);
}

#[test]
fn effective_prefetch() {
    let config = Config::new("svc").with_max_workers(8);
    assert_eq!(config.effective_prefetch(), 8);
    assert_eq!(config.clone().with_prefetch_count(Some(2)).effective_prefetch(), 2);
    assert_eq!(config.with_max_workers(100_000).effective_prefetch(), u16::MAX);
}

// ---------------------------------------------------------------- environment

#[test]
fn every_key_from_env() {
    assert_eq!(ok(Config::from_vars(vars(ALL_ENV))), everything_changed());
}

#[test]
fn unknown_env_vars_are_ignored() {
    let config = ok(Config::from_vars(vars(&[
        ("SERVICE_NAME", "svc"),
        ("PATH", "/usr/bin"),
        ("METRICS", "junk"),
        ("service_name", "lowercase is another variable"),
        ("SOME_TOKEN", "t0k3n"),
    ])));
    assert_eq!(config, Config::new("svc"));
    // ignored, but named at start-up: keys are matched exactly
    assert_eq!(config.misspelt_env_vars(), [("service_name", "SERVICE_NAME")]);
}

#[test]
fn env_vars_that_resemble_a_key_are_named_with_it() {
    let config = ok(Config::from_vars(vars(&[
        ("SERVICE_NAME", "s"),
        ("MAX_WORKER", "4"),
        ("AMQP_URL", "amqp://u:pw@mq/"),
        ("HOME", "/root"),
        // close, but names of other software: no warning on every start
        ("METRICS_PATH", "/metrics"),
        ("NIX_SSL_CERT_FILE", "/etc/ssl/certs/ca.pem"),
    ])));
    assert_eq!(
        config.misspelt_env_vars(),
        [("AMQP_URL", "AMQP_URI"), ("MAX_WORKER", "MAX_WORKERS")]
    );
    assert_eq!(config.max_workers, 3, "still ignored");
    assert!(config.extra.is_empty());
}

#[test]
fn last_env_var_wins() {
    let config = ok(Config::from_vars(vars(&[("SERVICE_NAME", "a"), ("SERVICE_NAME", "b")])));
    assert_eq!(config.service_name, "b");
}

#[test]
fn env_booleans_and_optionals() {
    for (text, expected) in
        [("1", true), ("Yes", true), ("TRUE", true), ("0", false), ("no", false)]
    {
        let config =
            ok(Config::from_vars(vars(&[("SERVICE_NAME", "s"), ("ENABLE_METRICS", text)])));
        assert_eq!(config.enable_metrics, expected, "{text}");
    }
    let config = ok(Config::from_vars(vars(&[
        ("SERVICE_NAME", "s"),
        ("PREFETCH_COUNT", ""),
        ("MAX_TASKS_PER_CHILD", " "),
    ])));
    assert_eq!((config.prefetch_count, config.max_tasks_per_child), (None, None));
}

#[test]
fn from_env_reads_the_process_environment() {
    // The tests do not change the environment; only check what it must give.
    match (std::env::var("SERVICE_NAME"), Config::from_env()) {
        (Err(_), Err(err)) => assert_eq!(err.key, "SERVICE_NAME"),
        (Ok(name), Ok(config)) => assert_eq!(config.service_name, name),
        (Ok(_), Err(err)) => assert_ne!(err.key, "SERVICE_NAME"),
        (Err(_), Ok(config)) => panic!("no SERVICE_NAME, yet {config:?}"),
    }
}

// ---------------------------------------------------------------- files

#[test]
fn every_key_from_yaml() {
    assert_eq!(ok(Config::from_yaml_str(ALL_YAML, &no_env)), everything_changed());
}

#[test]
fn every_key_from_toml() {
    assert_eq!(ok(Config::from_toml_str(ALL_TOML, &no_env)), everything_changed());
}

#[test]
fn numbers_and_strings_are_interchangeable() {
    let yaml = "SERVICE_NAME: 42\nWEBSOCKET_IP: '10'\nWEBSOCKET_PORT: '80'\nRPC_TIMEOUT: '0.5'";
    let config = ok(Config::from_yaml_str(yaml, &no_env));
    assert_eq!(config.service_name, "42");
    assert_eq!(config.websocket_port, 80);
    assert_eq!(config.rpc_timeout, Duration::from_millis(500));
}

#[test]
fn null_optionals_and_metrics_in_yaml() {
    let yaml = "SERVICE_NAME: s\nPREFETCH_COUNT: ~\nMAX_TASKS_PER_CHILD:\nMETRICS:\n";
    assert_eq!(ok(Config::from_yaml_str(yaml, &no_env)), Config::new("s"));
}

#[test]
fn extra_keys_from_files() {
    let yaml = r#"
SERVICE_NAME: s
DATABASE:
  URL: postgres://db/app
  POOL: 5
FEATURES: [a, b]
RETRIES: "${RETRIES:3}"
service_name: lowercase is an extra key
"#;
    let config = ok(Config::from_yaml_str(yaml, &no_env));
    assert_eq!(
        config.extra.keys().map(String::as_str).collect::<Vec<_>>(),
        ["DATABASE", "FEATURES", "RETRIES", "service_name"]
    );
    assert_eq!(config.extra["DATABASE"], json!({"URL": "postgres://db/app", "POOL": 5}));
    assert_eq!(config.get::<Vec<String>>("FEATURES"), Some(Ok(vec!["a".into(), "b".into()])));
    // A string from substitution still reads as a number.
    assert_eq!(config.get::<u32>("RETRIES"), Some(Ok(3)));
    assert_eq!(config.get::<String>("RETRIES"), Some(Ok("3".to_string())));
    assert_eq!(config.get::<u32>("MISSING"), None);
    let wrong = config.get::<u32>("FEATURES").map(|r| r.map_err(|e| (e.key, e.value)));
    assert_eq!(wrong, Some(Err(("FEATURES".to_string(), r#"["a","b"]"#.to_string()))));

    let toml = "SERVICE_NAME = 's'\nWHEN = 1979-05-27T07:32:00Z\n[DATABASE]\nPOOL = 5\n";
    let config = ok(Config::from_toml_str(toml, &no_env));
    assert_eq!(config.extra["DATABASE"], json!({"POOL": 5}));
    assert_eq!(config.get::<String>("WHEN"), Some(Ok("1979-05-27T07:32:00Z".to_string())));
}

#[test]
fn unknown_metrics_key_is_an_error() {
    let err = yaml_err("SERVICE_NAME: s\nMETRICS:\n  HOSTNAME: x\n");
    assert_eq!(
        err.to_string(),
        r#"invalid config METRICS.HOSTNAME="x": unknown key in METRICS: expected HOST or PORT"#
    );
    let err = yaml_err("SERVICE_NAME: s\nMETRICS: 9100\n");
    assert_eq!((err.key.as_str(), err.value.as_str()), ("METRICS", "9100"));
}

#[test]
fn a_file_takes_the_metrics_keys_spelt_as_in_the_environment_too() {
    let yaml = "SERVICE_NAME: s\nMETRICS_PORT: 9100\nMETRICS_HOST: 127.0.0.1\n";
    let config = ok(Config::from_yaml_str(yaml, &no_env));
    assert_eq!((config.metrics.host.as_str(), config.metrics.port), ("127.0.0.1", 9100));
    assert!(config.extra.is_empty(), "{:?}", config.extra);
    let toml = "SERVICE_NAME = 's'\nMETRICS_PORT = 9100\n";
    assert_eq!(ok(Config::from_toml_str(toml, &no_env)).metrics.port, 9100);
    // in both places, which one won would depend on the keys' order
    let err = yaml_err("SERVICE_NAME: s\nMETRICS_PORT: 9100\nMETRICS:\n  PORT: 9200\n");
    assert_eq!(
        err.to_string(),
        r#"invalid config METRICS_PORT="9100": given twice: also as PORT in the METRICS mapping"#
    );
    // each in one place is fine
    let yaml = "SERVICE_NAME: s\nMETRICS_PORT: 9100\nMETRICS:\n  HOST: 127.0.0.1\n";
    let config = ok(Config::from_yaml_str(yaml, &no_env));
    assert_eq!((config.metrics.host.as_str(), config.metrics.port), ("127.0.0.1", 9100));
    // a misspelling of the flat spelling is named
    let config = ok(Config::from_yaml_str("SERVICE_NAME: s\nMETRICS_PROT: 9100\n", &no_env));
    let warnings = config.warnings();
    assert!(warnings.iter().any(|w| w.contains("did you mean METRICS_PORT?")), "{warnings:?}");
}

#[test]
fn empty_or_non_mapping_documents() {
    assert_eq!(yaml_err("").key, "SERVICE_NAME");
    assert_eq!(err(Config::from_toml_str("", &no_env)).key, "SERVICE_NAME");
    let err = yaml_err("- a\n- b\n");
    assert_eq!(
        err.to_string(),
        r#"invalid config <yaml>="": expected a mapping of keys at the top level"#
    );
}

#[test]
fn syntax_errors_name_the_source() {
    let err = yaml_err("SERVICE_NAME: [unclosed\n");
    assert_eq!((err.key.as_str(), err.value.as_str()), ("<yaml>", ""));
    assert!(!err.reason.is_empty());

    let err = err_toml("SERVICE_NAME = 's'\nAMQP_URI = amqp://u:hunter2@h\n");
    assert_eq!((err.key.as_str(), err.value.as_str()), ("<toml>", ""));
    assert!(err.reason.contains("line 2"), "{}", err.reason);
    assert!(!err.reason.contains("hunter2"), "{}", err.reason);
}

fn err_toml(text: &str) -> ConfigError {
    err(Config::from_toml_str(text, &no_env))
}

// ---------------------------------------------------------------- substitution

fn env(name: &str) -> Option<String> {
    match name {
        "SVC" => Some("billing".to_string()),
        "WORKERS" => Some("6".to_string()),
        _ => None,
    }
}

#[test]
fn substitution_in_yaml_and_toml() {
    let yaml = "SERVICE_NAME: ${SVC}\nMAX_WORKERS: ${WORKERS:2}\nPREFETCH_COUNT: ${PREFETCH:9}\n\
                AMQP_URI: ${BROKER:amqp://guest:guest@rabbit:5672/}\nCOST: $5\n";
    let config = ok(Config::from_yaml_str(yaml, &env));
    assert_eq!(config.service_name, "billing");
    assert_eq!(config.max_workers, 6);
    assert_eq!(config.prefetch_count, Some(9));
    assert_eq!(config.amqp_uri, "amqp://guest:guest@rabbit:5672/");
    assert_eq!(config.extra["COST"], json!("$5"));

    let toml = "SERVICE_NAME = '${SVC}'\nMAX_WORKERS = '${WORKERS:2}'\n\
                AMQP_URI = '${BROKER:amqp://guest:guest@rabbit:5672/}'\n";
    let config = ok(Config::from_toml_str(toml, &env));
    assert_eq!(
        (config.service_name.as_str(), config.max_workers, config.amqp_uri.as_str()),
        ("billing", 6, "amqp://guest:guest@rabbit:5672/")
    );
}

/// Values that would change the document had they been pasted into its text.
fn hostile_env(name: &str) -> Option<String> {
    match name {
        "HASH_PW" => Some("pa #ss".to_string()),
        "QUOTE_PW" => Some("pa\"ss".to_string()),
        "STAR" => Some("*star".to_string()),
        _ => None,
    }
}

#[test]
fn substitution_skips_comments() {
    let yaml = "SERVICE_NAME: s\n# AMQP_URI: amqp://user:${RABBIT_PASSWORD}@host/\n";
    assert_eq!(ok(Config::from_yaml_str(yaml, &no_env)).amqp_uri, Config::new("s").amqp_uri);
    let toml = "SERVICE_NAME = 's'\n# AMQP_URI = 'amqp://user:${RABBIT_PASSWORD}@host/'\n";
    assert_eq!(ok(Config::from_toml_str(toml, &no_env)).amqp_uri, Config::new("s").amqp_uri);
}

#[test]
fn substituted_values_cannot_change_the_document() {
    let yaml = "SERVICE_NAME: s\nNOTE: x${HASH_PW}\nSHOP: ${STAR}\n";
    let config = ok(Config::from_yaml_str(yaml, &hostile_env));
    assert_eq!(config.extra["NOTE"], json!("xpa #ss"));
    assert_eq!(config.extra["SHOP"], json!("*star"));
    let toml = "SERVICE_NAME = 's'\nAMQP_URI = \"amqp://user:${QUOTE_PW}@host/\"\n";
    assert_eq!(ok(Config::from_toml_str(toml, &hostile_env)).amqp_uri, "amqp://user:pa\"ss@host/");
    // nested values are substituted too, keys are not
    let yaml = "SERVICE_NAME: s\nDB:\n  ${STAR}: [x, '${STAR}']\n";
    let config = ok(Config::from_yaml_str(yaml, &hostile_env));
    assert_eq!(config.extra["DB"], json!({"${STAR}": ["x", "*star"]}));
}

#[test]
fn a_substituted_password_is_masked_whole_in_errors() {
    // `#` must be written %23 in a URI: the whole value is refused, its password masked
    let yaml = "SERVICE_NAME: s\nAMQP_URI: amqp://user:${HASH_PW}@host/\n";
    let e = err(Config::from_yaml_str(yaml, &hostile_env));
    assert_eq!((e.key.as_str(), e.value.as_str()), ("AMQP_URI", "amqp://user:***@host/"));
}

#[test]
fn unset_variable_without_default() {
    for result in [
        Config::from_yaml_str("SERVICE_NAME: ${SERVICE}\n", &env),
        Config::from_toml_str("SERVICE_NAME = '${SERVICE}'\n", &env),
    ] {
        assert_eq!(
            err(result).to_string(),
            r#"invalid config SERVICE="": environment variable SERVICE is not set (used in config file)"#
        );
    }
}

#[test]
fn a_nested_reference_takes_its_inner_default_as_nameko_reads_it() {
    let yaml = "SERVICE_NAME: ${NAME:${DEFAULT_NAME:orders}}\n";
    assert_eq!(ok(Config::from_yaml_str(yaml, &no_env)).service_name, "orders");
    let yaml = "SERVICE_NAME: ${NAME:${SVC:orders}}\n";
    assert_eq!(ok(Config::from_yaml_str(yaml, &env)).service_name, "billing");
    // the default of a set variable is not read: its unset reference is no error
    let yaml = "SERVICE_NAME: ${SVC:${NOT_SET}}\n";
    assert_eq!(ok(Config::from_yaml_str(yaml, &env)).service_name, "billing");
    let toml = "SERVICE_NAME = 's'\nSHOP_URL = '${SHOP_URL:http://${SHOP_HOST:shop}:80/}'\n\
                SHOP_JSON = '${SHOP_JSON:{\"a\": {\"b\": 1}}}'\n";
    let config = ok(Config::from_toml_str(toml, &no_env));
    assert_eq!(config.extra["SHOP_URL"], json!("http://shop:80/"));
    // braces in a default are matched, as Nameko matches them
    assert_eq!(config.extra["SHOP_JSON"], json!("{\"a\": {\"b\": 1}}"));
}

/// A nesting without end would overflow the stack: refused past 16 levels, naming the key.
#[test]
fn references_nested_too_deep_are_refused_naming_the_key() {
    let nested = |levels: usize| {
        let value = format!("{}x{}", "${V:".repeat(levels), "}".repeat(levels));
        format!("SERVICE_NAME: s\nSHOP_URL: '{value}'\n")
    };
    let config = ok(Config::from_yaml_str(&nested(16), &no_env));
    assert_eq!(config.extra["SHOP_URL"], json!("x"));
    let e = yaml_err(&nested(100_000));
    assert_eq!(e.key, "SHOP_URL");
    assert!(e.reason.contains("more than 16 deep"), "{e}");
}

#[test]
fn an_unclosed_reference_is_refused_naming_its_key() {
    for yaml in [
        "SERVICE_NAME: s\nSHOP_URL: '${SHOP_URL:http://${SHOP_HOST:shop}:80/'\n",
        "SERVICE_NAME: s\nSHOP_URL: 'http://${SHOP_HOST'\n",
    ] {
        let e = yaml_err(yaml);
        assert_eq!(e.key, "SHOP_URL", "{yaml}");
        assert!(e.reason.contains("`${` without its closing `}`"), "{e}");
        // the text is not shown: it may hold a password (a URI's)
        assert!(!e.to_string().contains("http://"), "{e}");
    }
    let e = yaml_err("SERVICE_NAME: s\nDB:\n  HOSTS: ['${DB_HOST:{a}']\n");
    assert_eq!(e.key, "DB.HOSTS");
    // nor a password after a scheme that is none (a typo), where a number was expected
    for yaml in ["MAX_WORKERS: 0amqp://u:Secret-77@h/\n", "MAX_WORKERS: ~amqp://u:Secret-77@h/\n"] {
        let e = yaml_err(yaml);
        assert!(!e.to_string().contains("Secret-77"), "{e}");
    }
}

// ---------------------------------------------------------------- from_file

/// A file in the temporary directory, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> TempFile {
        let path =
            std::env::temp_dir().join(format!("config-scratch-{}-{name}", std::process::id()));
        if let Err(err) = std::fs::write(&path, text) {
            panic!("cannot write {}: {err}", path.display());
        }
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A variable no test environment sets.
const UNSET: &str = "CONFIG_SCRATCH_SURELY_UNSET_VARIABLE";

#[test]
fn from_file_by_extension() {
    let yaml = format!("SERVICE_NAME: svc\nMAX_WORKERS: ${{{UNSET}:5}}\n");
    for name in ["a.yaml", "b.yml", "c.YAML"] {
        let file = TempFile::new(name, &yaml);
        let config = ok(Config::from_file(&file.0));
        assert_eq!((config.service_name.as_str(), config.max_workers), ("svc", 5), "{name}");
    }
    let file =
        TempFile::new("d.toml", &format!("SERVICE_NAME = 'svc'\nMAX_WORKERS = '${{{UNSET}:5}}'\n"));
    assert_eq!(ok(Config::from_file(&file.0)).max_workers, 5);
}

#[test]
fn from_file_errors() {
    let file = TempFile::new("e.json", "{}");
    let e = err(Config::from_file(&file.0));
    assert_eq!(e.key, file.0.display().to_string());
    assert!(e.reason.contains(".yaml, .yml or .toml"), "{e}");

    let missing = std::env::temp_dir().join("config-scratch-missing.yaml");
    let e = err(Config::from_file(&missing));
    assert_eq!(e.key, missing.display().to_string());
    assert!(e.reason.starts_with("cannot read file"), "{e}");

    let file = TempFile::new("f.yaml", "SERVICE_NAME: [\n");
    assert_eq!(err(Config::from_file(&file.0)).key, file.0.display().to_string());

    let file = TempFile::new("g.toml", "SERVICE_NAME = \n");
    assert_eq!(err(Config::from_file(&file.0)).key, file.0.display().to_string());

    let file = TempFile::new("h.yaml", &format!("SERVICE_NAME: ${{{UNSET}}}\n"));
    let e = err(Config::from_file(&file.0));
    assert_eq!(e.key, UNSET);
    assert_eq!(e.reason, format!("environment variable {UNSET} is not set (used in config file)"));
}

/// A variable set but not UTF-8 is no unset variable: it is refused, as `Config::from_env`
/// refuses a configuration variable, and its value (maybe a password) is not shown.
#[cfg(unix)]
#[test]
fn a_substituted_variable_that_is_not_utf8_is_refused_naming_it() {
    use std::os::unix::ffi::OsStrExt;
    let name = format!("CONFIG_SCRATCH_NOT_UTF8_{}", std::process::id());
    std::env::set_var(&name, std::ffi::OsStr::from_bytes(b"s3cr\xffet"));
    let with_default =
        TempFile::new("i.yaml", &format!("SERVICE_NAME: s\nSHOP_PASSWORD: ${{{name}:guest}}\n"));
    let plain = TempFile::new("j.yaml", &format!("SERVICE_NAME: s\nSHOP_PASSWORD: ${{{name}}}\n"));
    let results = [Config::from_file(&with_default.0), Config::from_file(&plain.0)];
    std::env::remove_var(&name);
    for result in results {
        let e = err(result);
        assert_eq!((e.key.as_str(), e.value.as_str()), (name.as_str(), ""));
        assert_eq!(e.reason, "is not valid UTF-8 (used in config file)");
    }
}

// ---------------------------------------------------------------- parse errors

#[test]
fn enum_errors_list_the_accepted_values() {
    assert_eq!(
        env_err(&[("SERVICE_NAME", "s"), ("WORKER_MODE", "fibers")]).to_string(),
        r#"invalid config WORKER_MODE="fibers": expected one of thread, greedy_thread, process, greedy_process"#
    );
    assert_eq!(
        yaml_err("SERVICE_NAME: s\nPROTOCOL: amqp").to_string(),
        r#"invalid config PROTOCOL="amqp": expected one of nameko, micro_framework"#
    );
    assert_eq!(
        err_toml("SERVICE_NAME = 's'\nQUEUE_TYPE = 3").to_string(),
        r#"invalid config QUEUE_TYPE="3": expected one of classic, quorum"#
    );
}

#[test]
fn enums_parse_display_and_serde() {
    for mode in WorkerMode::ALL {
        assert_eq!(mode.as_str().parse::<WorkerMode>(), Ok(*mode));
        assert_eq!(mode.to_string(), mode.as_str());
        assert_eq!(serde_json::to_value(mode).ok(), Some(json!(mode.as_str())));
    }
    assert_eq!(" Greedy_Thread ".parse::<WorkerMode>(), Ok(WorkerMode::GreedyThread));
    assert_eq!("MICRO_FRAMEWORK".parse::<Protocol>(), Ok(Protocol::MicroFramework));
    assert_eq!(serde_json::from_value::<QueueType>(json!("quorum")).ok(), Some(QueueType::Quorum));
    let err = serde_json::from_value::<QueueType>(json!("lazy")).err().map(|e| e.to_string());
    assert_eq!(
        err.as_deref(),
        Some(r#"invalid value: string "lazy", expected one of classic, quorum"#)
    );
    assert_eq!("x".parse::<Protocol>().map_err(|e| e.key), Err("PROTOCOL".to_string()));
}

#[test]
fn value_errors_name_key_and_value() {
    let cases: &[(&str, &str, &str)] = &[
        ("MAX_WORKERS", "four", "expected a non-negative integer"),
        ("MAX_WORKERS", "-1", "expected a non-negative integer"),
        ("AMQP_HEARTBEAT", "70000", "expected an integer from 0 to 65535"),
        ("METRICS_PORT", "http", "expected an integer from 0 to 65535"),
        ("WEBSOCKET_PORT", "1.5", "expected an integer from 0 to 65535"),
        ("MAX_TASKS_PER_CHILD", "5000000000", "expected an integer from 1 to 4294967295"),
        ("PREFETCH_COUNT", "x", "expected an integer from 1 to 65535"),
        ("PARENT_CALLS_TRACKED", "ten", "expected a non-negative integer"),
        ("ENABLE_METRICS", "maybe", "expected one of true, false, 1, 0, yes, no, on, off"),
        ("AUTO_DELETE_EVENT_EXCHANGES", "2", "expected one of true, false, 1, 0, yes, no, on, off"),
        ("DECLARE_EVENT_EXCHANGES", "maybe", "expected one of true, false, 1, 0, yes, no, on, off"),
        ("RPC_TIMEOUT", "30s", "expected a number of seconds"),
        (
            "RPC_PERSISTENT_REQUESTS",
            "sometimes",
            "expected one of true, false, 1, 0, yes, no, on, off",
        ),
        ("RPC_TIMEOUT", "-1", "must be a positive, finite number of seconds"),
        ("SHUTDOWN_TIMEOUT", "inf", "must be a positive, finite number of seconds"),
        ("SHUTDOWN_TIMEOUT", "NaN", "must be a positive, finite number of seconds"),
        // positive and finite, but more seconds than a duration holds
        ("TASK_TIME_LIMIT", "1e30", "must be at most 18446744073709551615 seconds"),
        ("RPC_TIMEOUT", "1e20", "must be at most 18446744073709551615 seconds"),
        (
            "TASK_TIME_LIMIT",
            "0",
            "must be a positive, finite number of seconds (or unset: no limit)",
        ),
        // a duration would round it to 0: the value given is named, not "0"
        ("TASK_TIME_LIMIT", "1e-12", "must be at least 0.000000001 seconds (one nanosecond)"),
        ("RPC_TIMEOUT", "0.0000000001", "must be at least 0.000000001 seconds (one nanosecond)"),
        ("WEB_SERVER_ADDRESS", "80000", "expected host:port or a port, e.g. 0.0.0.0:8000"),
        ("WEB_SERVER_ADDRESS", "localhost:http", "expected host:port or a port, e.g. 0.0.0.0:8000"),
        ("MAX_MESSAGE_SIZE", "1e6", "expected a non-negative integer"),
        ("MAX_MESSAGE_SIZE", "0", "must be at least 1"),
        ("HTTP_HEADER_READ_TIMEOUT", "60s", "expected a number of seconds"),
        ("HTTP_KEEP_ALIVE_TIMEOUT", "-5", "must be a positive, finite number of seconds"),
        ("WEBSOCKET_IDLE_TIMEOUT", "inf", "must be a positive, finite number of seconds"),
        ("HTTP_MAX_CONNECTIONS", "-1", "expected a non-negative integer"),
        ("HTTP_MAX_CONNECTIONS", "many", "expected a non-negative integer"),
        ("WEBSOCKET_MAX_CONNECTIONS", "1.5", "expected a non-negative integer"),
        (
            "HTTP_REQUIRE_JSON_CONTENT_TYPE",
            "json",
            "expected one of true, false, 1, 0, yes, no, on, off",
        ),
    ];
    for (key, value, reason) in cases {
        let e = env_err(&[("SERVICE_NAME", "s"), (key, value)]);
        assert_eq!(e.to_string(), format!("invalid config {key}=\"{value}\": {reason}"));
    }
}

#[test]
fn a_bare_web_server_port_listens_on_every_interface_as_in_nameko() {
    let config =
        ok(Config::from_vars(vars(&[("SERVICE_NAME", "s"), ("WEB_SERVER_ADDRESS", "8080")])));
    assert_eq!(config.web_server_address, "0.0.0.0:8080");
    let config = ok(Config::from_yaml_str("SERVICE_NAME: s\nWEB_SERVER_ADDRESS: 8081\n", &no_env));
    assert_eq!(config.web_server_address, "0.0.0.0:8081");
}

#[test]
fn file_value_errors_use_the_file_key() {
    let e = yaml_err("SERVICE_NAME: s\nMETRICS:\n  PORT: 99999\n");
    assert_eq!(
        e.to_string(),
        r#"invalid config METRICS.PORT="99999": expected an integer from 0 to 65535"#
    );
    let e = yaml_err("SERVICE_NAME: s\nENABLE_METRICS: [1]\n");
    assert_eq!(
        e.to_string(),
        r#"invalid config ENABLE_METRICS="[1]": expected one of true, false, 1, 0, yes, no, on, off"#
    );
    let e = yaml_err("SERVICE_NAME: [s]\n");
    assert_eq!(e.to_string(), r#"invalid config SERVICE_NAME="["s"]": expected a string"#);
    let e = yaml_err("SERVICE_NAME: s\nMAX_WORKERS: 2.0\n");
    assert_eq!(
        e.to_string(),
        r#"invalid config MAX_WORKERS="2.0": expected a non-negative integer"#
    );
    let e = err_toml("SERVICE_NAME = 's'\nRPC_TIMEOUT = inf\n");
    assert_eq!(
        e.to_string(),
        r#"invalid config RPC_TIMEOUT="inf": must be a positive, finite number of seconds"#
    );
}

// ---------------------------------------------------------------- validation

#[test]
fn validation_errors() {
    let base = || vec![("SERVICE_NAME", "svc")];
    let cases: &[(&str, &str, &str)] = &[
        ("MAX_WORKERS", "0", r#"invalid config MAX_WORKERS="0": must be at least 1"#),
        (
            "MAX_TASKS_PER_CHILD",
            "0",
            r#"invalid config MAX_TASKS_PER_CHILD="0": must be at least 1 (or unset: no limit)"#,
        ),
        (
            "PREFETCH_COUNT",
            "0",
            r#"invalid config PREFETCH_COUNT="0": must be at least 1 (or unset: MAX_WORKERS)"#,
        ),
        (
            "RPC_TIMEOUT",
            "0",
            r#"invalid config RPC_TIMEOUT="0": must be a positive, finite number of seconds"#,
        ),
        (
            "SHUTDOWN_TIMEOUT",
            "0.0",
            r#"invalid config SHUTDOWN_TIMEOUT="0": must be a positive, finite number of seconds"#,
        ),
        (
            "HTTP_HEADER_READ_TIMEOUT",
            "0",
            r#"invalid config HTTP_HEADER_READ_TIMEOUT="0": must be a positive, finite number of seconds"#,
        ),
        (
            "HTTP_HEADER_READ_TIMEOUT",
            "86401",
            r#"invalid config HTTP_HEADER_READ_TIMEOUT="86401": must be at most 86400 seconds (one day)"#,
        ),
        (
            "HTTP_KEEP_ALIVE_TIMEOUT",
            "0.0",
            r#"invalid config HTTP_KEEP_ALIVE_TIMEOUT="0": must be a positive, finite number of seconds"#,
        ),
        (
            "HTTP_KEEP_ALIVE_TIMEOUT",
            "1e9",
            r#"invalid config HTTP_KEEP_ALIVE_TIMEOUT="1000000000": must be at most 86400 seconds (one day)"#,
        ),
        (
            "WEBSOCKET_IDLE_TIMEOUT",
            "0",
            r#"invalid config WEBSOCKET_IDLE_TIMEOUT="0": must be a positive, finite number of seconds"#,
        ),
        (
            "WEBSOCKET_IDLE_TIMEOUT",
            "100000",
            r#"invalid config WEBSOCKET_IDLE_TIMEOUT="100000": must be at most 86400 seconds (one day)"#,
        ),
        (
            "HTTP_MAX_CONNECTIONS",
            "0",
            r#"invalid config HTTP_MAX_CONNECTIONS="0": must be at least 1"#,
        ),
        (
            "HTTP_MAX_CONNECTIONS",
            "1048577",
            r#"invalid config HTTP_MAX_CONNECTIONS="1048577": must be at most 1048576"#,
        ),
        (
            "WEBSOCKET_MAX_CONNECTIONS",
            "0",
            r#"invalid config WEBSOCKET_MAX_CONNECTIONS="0": must be at least 1"#,
        ),
        (
            "WEBSOCKET_MAX_CONNECTIONS",
            "1048577",
            r#"invalid config WEBSOCKET_MAX_CONNECTIONS="1048577": must be at most 1048576"#,
        ),
        (
            "SERVICE_NAME",
            "my service",
            r#"invalid config SERVICE_NAME="my service": must not contain whitespace"#,
        ),
        ("SERVICE_NAME", "", r#"invalid config SERVICE_NAME="": is required"#),
        (
            "SERVICE_NAME",
            "amqp://u:hunter2@h/",
            r#"invalid config SERVICE_NAME="amqp://u:***@h/": looks like a URI: a service name is a plain name such as `orders`"#,
        ),
    ];
    for (key, value, message) in cases {
        let mut pairs = base();
        pairs.push((key, value));
        assert_eq!(env_err(&pairs).to_string(), *message);
    }
    assert_eq!(env_err(&[]).to_string(), r#"invalid config SERVICE_NAME="": is required"#);
    assert_eq!(Config::default().validate().map_err(|e| e.key), Err("SERVICE_NAME".to_string()));
    // Dots are allowed in service names.
    assert_eq!(Config::new("billing.v2").validate(), Ok(()));
}

/// Guards the edges of `MAX_WORKERS` and of the peer timeouts (was never checked: only values
/// far over them were refused): the limit itself is accepted, one more refused.
#[test]
fn max_workers_and_peer_timeouts_are_accepted_up_to_their_limit_and_not_beyond() {
    let at_most = Config::new("svc").with_max_workers(MAX_WORKERS_LIMIT);
    assert_eq!(at_most.validate(), Ok(()));
    let over = Config::new("svc").with_max_workers(MAX_WORKERS_LIMIT + 1);
    assert_eq!(over.validate().map_err(|e| e.key), Err("MAX_WORKERS".to_owned()));
    let one_nanosecond = Duration::from_nanos(1);
    type Setter = fn(&mut Config, Duration);
    let timeouts: [(&str, Setter); 3] = [
        ("HTTP_HEADER_READ_TIMEOUT", |config, d| config.http_header_read_timeout = d),
        ("HTTP_KEEP_ALIVE_TIMEOUT", |config, d| config.http_keep_alive_timeout = d),
        ("WEBSOCKET_IDLE_TIMEOUT", |config, d| config.websocket_idle_timeout = d),
    ];
    for (key, set) in timeouts {
        let mut config = Config::new("svc");
        set(&mut config, MAX_PEER_TIMEOUT);
        assert_eq!(config.validate(), Ok(()), "{key} at its limit");
        set(&mut config, MAX_PEER_TIMEOUT + one_nanosecond);
        assert_eq!(config.validate().map_err(|e| e.key), Err(key.to_owned()));
    }
}

#[test]
fn a_client_certificate_and_its_key_go_together() {
    let e = env_err(&[("SERVICE_NAME", "s"), ("AMQP_SSL_CERT_FILE", "/etc/ssl/client.pem")]);
    assert_eq!(
        e.to_string(),
        r#"invalid config AMQP_SSL_CERT_FILE="/etc/ssl/client.pem": is set without AMQP_SSL_KEY_FILE: a client certificate needs its key (set both or neither)"#
    );
    let e = env_err(&[("SERVICE_NAME", "s"), ("AMQP_SSL_KEY_FILE", "/etc/ssl/client.key")]);
    assert_eq!(
        e.to_string(),
        r#"invalid config AMQP_SSL_KEY_FILE="/etc/ssl/client.key": is set without AMQP_SSL_CERT_FILE: a client key needs its certificate (set both or neither)"#
    );
    let in_code = Config::new("s").with_amqp_ssl_cert_file(Some("/etc/ssl/client.pem".into()));
    assert_eq!(in_code.validate().map_err(|e| e.key), Err("AMQP_SSL_CERT_FILE".to_string()));
}

#[test]
fn service_names_with_topic_wildcards_are_refused() {
    // the RPC queue is bound with `{SERVICE_NAME}.*`: `*` or `#` in the name would bind it to
    // other services' requests (`*.*` takes every call on the exchange)
    for name in ["*", "#", "orders.*", "or#ders"] {
        let e = env_err(&[("SERVICE_NAME", name)]);
        assert_eq!((e.key.as_str(), e.value.as_str()), ("SERVICE_NAME", name));
        assert_eq!(
            e.reason,
            "must not contain `*` or `#`: the RPC queue is bound with `{SERVICE_NAME}.*`, so \
             the name would match other services' calls"
        );
    }
}

#[test]
fn an_empty_rpc_exchange_is_refused() {
    // "" is the default exchange: the RPC entrypoint could not declare it (ACCESS_REFUSED at
    // start-up, naming no key) and a caller's request published to it would route nowhere
    let expected =
        r#"invalid config RPC_EXCHANGE="": must not be empty (Nameko's is `nameko-rpc`)"#;
    assert_eq!(env_err(&[("SERVICE_NAME", "s"), ("RPC_EXCHANGE", "")]).to_string(), expected);
    assert_eq!(yaml_err("SERVICE_NAME: s\nRPC_EXCHANGE: ''").to_string(), expected);
    let blank = env_err(&[("SERVICE_NAME", "s"), ("RPC_EXCHANGE", "  ")]);
    assert_eq!((blank.key.as_str(), blank.value.as_str()), ("RPC_EXCHANGE", "  "));
    let in_code = Config::new("s").with_rpc_exchange(String::new()).validate();
    assert_eq!(in_code.map_err(|e| e.key), Err("RPC_EXCHANGE".to_string()));
    // a stray space (an env file's `RPC_EXCHANGE= nameko-rpc`) names another exchange than
    // the peers': every call would end in UnknownService
    let spaced = env_err(&[("SERVICE_NAME", "s"), ("RPC_EXCHANGE", "nameko-rpc ")]);
    assert_eq!(
        spaced.to_string(),
        r#"invalid config RPC_EXCHANGE="nameko-rpc ": must not start or end with whitespace"#
    );
}

#[test]
fn amqp_uri_validation() {
    for uri in ["amqp://localhost", "amqps://u:p@h:5671/v", "memory://", " MEMORY://x"] {
        assert_eq!(Config::new("s").with_amqp_uri(uri.to_string()).validate(), Ok(()));
    }
    let expected = "expected an amqp://, amqps:// or memory:// URI";
    let e = env_err(&[("SERVICE_NAME", "s"), ("AMQP_URI", "http://guest:guest@h/")]);
    assert_eq!(
        e.to_string(),
        format!(r#"invalid config AMQP_URI="http://guest:***@h/": {expected}"#)
    );
    let e = env_err(&[("SERVICE_NAME", "s"), ("AMQP_URI", "amqp:localhost")]);
    assert_eq!(e.to_string(), format!(r#"invalid config AMQP_URI="amqp:localhost": {expected}"#));
    let e = env_err(&[("SERVICE_NAME", "s"), ("AMQP_URI", "not a uri")]);
    assert_eq!(e.value, "not a uri");
    assert!(e.reason.starts_with("is not a valid URI ("), "{e}");
    let e = yaml_err("SERVICE_NAME: s\nAMQP_URI: amqp://u:hunter2@[bad/\n");
    assert_eq!(e.value, "amqp://u:***@[bad/");
    assert!(!e.to_string().contains("hunter2"));
}

#[test]
fn a_password_with_a_delimiter_is_told_to_be_percent_encoded() {
    // url reads `u:pa` of `amqp://u:pa#ss@h/` as host and port: "invalid port number" alone
    // sends the reader to the port
    for (uri, shown) in [
        ("amqp://u:hunter#2@h/", "amqp://u:***@h/"),
        ("amqp://u:hunter?2@h/", "amqp://u:***@h/"),
        ("amqp://u:hunter/2@h:5672/", "amqp://u:***@h:5672/"),
    ] {
        let e = env_err(&[("SERVICE_NAME", "s"), ("AMQP_URI", uri)]);
        assert_eq!(e.value, shown);
        assert!(
            e.reason.ends_with(
                "(a `/`, `?` or `#` in the user name or password is written %2F, %3F or %23)"
            ),
            "{e}"
        );
        assert!(!e.to_string().contains("hunter"), "{e}");
    }
    // other invalid URIs get no such hint
    let e = env_err(&[("SERVICE_NAME", "s"), ("AMQP_URI", "amqp://u:pw@h:99999/")]);
    assert!(!e.reason.contains("%2F"), "{e}");
}

#[test]
fn amqp_uri_options_that_nothing_reads_are_named() {
    // `?ssl=1` (kombu's) does not turn TLS on, and a misspelt `?heartbeet=5` sets nothing
    let uri = "amqp://u:pw@h/?heartbeat=5&ssl=1&heartbeet=5&frame_max=131072";
    let config = Config::new("s").with_amqp_uri(uri.into());
    assert_eq!(config.unused_amqp_uri_options(), ["ssl", "heartbeet"]);
    let list = "amqp://a/?connection_timeout=5000,amqp://b/?channel_max=9&auth_mechanism=x";
    let config = Config::new("s").with_amqp_uri(list.into());
    assert_eq!(config.unused_amqp_uri_options(), ["auth_mechanism"]);
    // the in-process broker refuses its unknown options itself
    let config = Config::new("s").with_amqp_uri("memory://x?max_bytes=9".into());
    assert!(config.unused_amqp_uri_options().is_empty());
}

// ---------------------------------------------------------------- AMQP_URI lists

/// The error of `AMQP_URI=uri` from the environment, checked to hold no password.
fn uri_list_err(uri: &str) -> ConfigError {
    let e = env_err(&[("SERVICE_NAME", "s"), ("AMQP_URI", uri)]);
    assert_eq!(e.key, "AMQP_URI");
    assert!(!e.to_string().contains("hunter2"), "{e}");
    e
}

#[test]
fn amqp_uri_lists_are_read_from_every_source() {
    let list = "amqp://u:hunter2@10.0.0.1:5672/, amqps://u:hunter2@10.0.0.2:5671/ ";
    let expected = ["amqp://u:hunter2@10.0.0.1:5672/", "amqps://u:hunter2@10.0.0.2:5671/"];
    let from_env = ok(Config::from_vars(vars(&[("SERVICE_NAME", "s"), ("AMQP_URI", list)])));
    assert_eq!(from_env.amqp_uris(), expected);
    let yaml = "SERVICE_NAME: s\nAMQP_URI:\n  - amqp://u:hunter2@10.0.0.1:5672/\n  - amqps://u:hunter2@10.0.0.2:5671/\n";
    let from_yaml = ok(Config::from_yaml_str(yaml, &no_env));
    assert_eq!(from_yaml.amqp_uri, expected.join(","));
    let toml = "SERVICE_NAME = 's'\nAMQP_URI = ['amqp://u:hunter2@10.0.0.1:5672/', 'amqps://u:hunter2@10.0.0.2:5671/']\n";
    assert_eq!(ok(Config::from_toml_str(toml, &no_env)).amqp_uris(), expected);
    let built = Config::new("s").with_amqp_uris(expected);
    assert_eq!(built.amqp_uri, expected.join(","));
    assert_eq!(built.validate(), Ok(()));
    assert_eq!(built.masked_amqp_uri(), "amqp://u:***@10.0.0.1:5672/,amqps://u:***@10.0.0.2:5671/");
    assert_eq!(built.to_masked_map()["AMQP_URI"], json!(built.masked_amqp_uri()));
    assert!(!format!("{built:?}").contains("hunter2"));
    let e = yaml_err("SERVICE_NAME: s\nAMQP_URI: [amqp://h/, [x]]\n");
    assert_eq!(e.reason, "expected a URI or a list of URIs (strings)");
}

#[test]
fn an_empty_amqp_uri_list_or_entry_is_refused() {
    assert!(uri_list_err(" ").reason.starts_with("is empty: expected an amqp://"));
    let e = yaml_err("SERVICE_NAME: s\nAMQP_URI: []\n");
    assert!(e.reason.starts_with("is empty"), "{e}");
    let e = uri_list_err("amqp://u:hunter2@a/,,amqp://u:hunter2@c/");
    assert_eq!(e.reason, "entry 2 of AMQP_URI is empty");
    assert_eq!(e.value, "amqp://u:***@a/,,amqp://u:***@c/");
    assert_eq!(uri_list_err("amqp://a/,").reason, "entry 2 of AMQP_URI is empty");
}

#[test]
fn a_malformed_amqp_uri_entry_is_named_and_masked() {
    let e = uri_list_err("amqp://u:hunter2@a/,amqp://u:hunter2@b:99999/");
    assert!(
        e.reason.starts_with("entry 2 of AMQP_URI (amqp://u:***@b:99999/) is not a valid URI ("),
        "{e}"
    );
    let e = uri_list_err("amqp://a/,http://b/");
    assert_eq!(
        e.reason,
        "entry 2 of AMQP_URI (http://b/) has another scheme: expected an amqp://, amqps:// or \
         memory:// URI"
    );
    let e = uri_list_err("amqp://a/,localhost:5672");
    assert!(e.reason.starts_with("entry 2 of AMQP_URI is not a URI ("), "{e}");
    // An unescaped comma in a password of a list: no piece of it is shown.
    let e = uri_list_err("amqp://u:hun,ter2@a/,amqp://u:hun,ter2@b/");
    assert!(e.reason.contains("write a comma in a user name or password as %2C"), "{e}");
    assert!(!e.to_string().contains("hun,") && !e.to_string().contains("ter2"), "{e}");
    // A piece that holds `://` but does not parse is not shown either.
    let e = uri_list_err("amqp://:hunter2,@[://");
    assert!(e.reason.starts_with("entry 1 of AMQP_URI is not a valid URI ("), "{e}");
    assert!(!e.to_string().contains("hunter2"), "{e}");
    let e = uri_list_err("amqp://a/,amqp://b:x/");
    assert!(e.reason.starts_with("entry 2 of AMQP_URI is not a valid URI ("), "{e}");
    let e = uri_list_err("amqp://a/,amqp://[b/");
    assert!(e.reason.starts_with("entry 2 of AMQP_URI (amqp://[b/) is not a valid URI"), "{e}");
    // One URI with such a comma is one broker, as before lists existed.
    let one = Config::new("s").with_amqp_uri("amqp://u:hun,ter2@a/".into());
    assert_eq!((one.validate(), one.amqp_uris()), (Ok(()), vec!["amqp://u:hun,ter2@a/"]));
    assert_eq!(one.masked_amqp_uri(), "amqp://u:***@a/");
}

#[test]
fn memory_cannot_be_listed_with_other_brokers() {
    let e = uri_list_err("amqp://a/,memory://x");
    assert!(e.reason.starts_with("AMQP_URI mixes memory:// with amqp:// or amqps:// nodes"), "{e}");
    let e = uri_list_err("memory://x,memory://y");
    assert!(e.reason.starts_with("AMQP_URI lists 2 memory:// brokers"), "{e}");
}

#[test]
fn listed_nodes_share_their_vhost_and_credentials() {
    let same = "amqp://u:hunter2@a/%2fprod,amqps://u:hunter2@b:5671/%2Fprod?heartbeat=5";
    assert_eq!(Config::new("s").with_amqp_uri(same.into()).validate(), Ok(()));
    let defaults = "amqp://a,amqp://guest:guest@b/";
    assert_eq!(Config::new("s").with_amqp_uri(defaults.into()).validate(), Ok(()));
    let e = uri_list_err("amqp://u:hunter2@a/prod,amqp://u:hunter2@b/");
    assert!(
        e.reason.starts_with(
            r#"entry 2 of AMQP_URI (amqp://u:***@b/) has vhost "/", entry 1 has "prod""#
        ),
        "{e}"
    );
    let e = uri_list_err("amqp://u:hunter2@a/,amqp://u:hunter3@b/,amqp://v:hunter2@c/");
    assert!(
        e.reason.starts_with("entry 2 of AMQP_URI (amqp://u:***@b/) has other credentials"),
        "{e}"
    );
    assert!(!e.to_string().contains("hunter3"), "{e}");
    let e = uri_list_err("amqp://u:hunter2@a/,amqp://u:hunter2@b/,amqp://v:hunter2@c/");
    assert!(e.reason.starts_with("entry 3 of AMQP_URI"), "{e}");
}

// ---------------------------------------------------------------- masking

#[test]
fn mask_uri_cases() {
    let cases = [
        ("amqp://guest:guest@localhost:5672/", "amqp://guest:***@localhost:5672/"),
        ("amqps://u:p%40ss@h/v?x=1", "amqps://u:***@h/v?x=1"),
        ("amqp://u:p@ss/w:rd@h:1/", "amqp://u:***@h:1/"),
        ("amqp://:secret@h", "amqp://:***@h"),
        ("//u:secret@h/", "//u:***@h/"),
        ("amqp://user@h", "amqp://user@h"),
        ("amqp://h:5672/vhost", "amqp://h:5672/vhost"),
        ("memory://", "memory://"),
        ("not a uri", "not a uri"),
        ("", ""),
    ];
    for (uri, masked) in cases {
        assert_eq!(mask_uri(uri), masked, "{uri}");
    }
    let config = Config::new("s").with_amqp_uri("amqp://a:b@c/".to_string());
    assert_eq!(config.masked_amqp_uri(), "amqp://a:***@c/");
    let lists = [
        ("amqp://a:b@c/,amqps://a:b@d/", "amqp://a:***@c/,amqps://a:***@d/"),
        ("amqp://c/, amqp://a:b@d/", "amqp://c/,amqp://a:***@d/"),
        // an entry that is not a URI may be a piece of a password: masked as one URI
        ("amqp://a:b,c@d/,e:f@g/", "amqp://a:***@g/"),
        // a piece that holds `://` but does not parse is not a URI either
        ("amqp://:Secret-77,@[://", "amqp://:***@[://"),
        ("amqp://u:pw,amqp://x@h/", "amqp://u:***@h/"),
    ];
    for (list, masked) in lists {
        assert_eq!(mask_uri(list), masked, "{list}");
    }
}

#[test]
fn secrets_are_masked_in_errors() {
    let e = env_err(&[("SERVICE_NAME", "s"), ("AMQP_URI", "ftp://me:hunter2@h")]);
    assert_eq!(e.value, "ftp://me:***@h");
    assert!(!e.to_string().contains("hunter2"));

    let yaml = "SERVICE_NAME: s\nAPI_TOKEN: abc\nDB_PASSWORD: [x]\nMY_SECRET: {a: 1}\n\
                BROKER: 'see amqp://u:hunter2@h'\n";
    let config = ok(Config::from_yaml_str(yaml, &no_env));
    for key in ["API_TOKEN", "DB_PASSWORD", "MY_SECRET"] {
        let e = config.get::<bool>(key).map(|r| r.map_err(|e| e.value));
        assert_eq!(e, Some(Err("***".to_string())), "{key}");
    }
    let e = config.get::<u8>("BROKER").map(|r| r.map_err(|e| e.to_string()));
    assert!(matches!(&e, Some(Err(m)) if !m.contains("hunter2")), "{e:?}");

    assert_eq!(ConfigError::new("db_password", "", "is required").value, "");
}

#[test]
fn a_secret_is_not_quoted_in_the_reason_of_its_error() {
    let yaml = "SERVICE_NAME: s\nAPI_TOKEN: tok-9f8e7d6c5b\nDB_PASSWORD: [hunter2-secret]\n\
                SHORT_SECRET: 'a\"b'\n";
    let config = ok(Config::from_yaml_str(yaml, &no_env));
    for (key, secret) in
        [("API_TOKEN", "9f8e7d6c5b"), ("DB_PASSWORD", "hunter2-secret"), ("SHORT_SECRET", "a\\\"b")]
    {
        let error = config.get::<u64>(key).and_then(Result::err);
        let shown =
            format!("{error:?} {}", error.as_ref().map(ToString::to_string).unwrap_or_default());
        assert!(error.is_some() && !shown.contains(secret), "{key}: {shown}");
        // what was wrong is still said
        assert!(shown.contains("expected u64"), "{key}: {shown}");
    }
    // a reason that names the secret bare, out of quotes
    let error = ConfigError::new("API_TOKEN", "tok-123456", "cannot use tok-123456 here");
    assert_eq!(error.reason, "cannot use *** here");
    // a short one only where quoted: masking every `ab` would garble the words
    let error = ConfigError::new("API_TOKEN", "ab", "invalid type: string \"ab\", about");
    assert_eq!(error.reason, "invalid type: string ***, about");
}

#[test]
fn uri_passwords_with_quotes_spaces_or_slashes_are_masked_in_free_text() {
    for password in
        ["Zq7'kP2x9w", "Zq7\"kP2x9w", "Zq7`kP2x9w", "Zq7 kP2x9w", "Zq7//kP2x9w", "Zq7 //kP2x9w"]
    {
        for key in ["DATABASE_URL", "AMPQ_URI"] {
            let text = format!("postgres://app:{password}@db:5432/app");
            let mut config = ok(Config::from_yaml_str("SERVICE_NAME: s\n", &no_env));
            config.extra.insert(key.to_string(), json!(text));
            let shown = format!("{config:?} {}", json!(config.to_masked_map()));
            assert!(!shown.contains("kP2x9w"), "{password:?} under {key}: {shown}");
            assert!(shown.contains("postgres://app:***@db:5432/app"), "{password:?}: {shown}");
        }
        let reason = format!("invalid type: string \"amqp://u:{password}@h/\", expected u64");
        let error = ConfigError::new("BROKER", "", &reason);
        assert!(!error.reason.contains("kP2x9w"), "{password:?}: {}", error.reason);
    }
    // two URIs in one text: both masked; a text with no password is left as it is
    let text = "from amqp://a:pw1@h1/ to amqp://b:pw2@h2/";
    assert_eq!(mask_text(text), "from amqp://a:***@h1/ to amqp://b:***@h2/");
    let plain = "see http://example.com/a//b and 'x@y'";
    assert_eq!(mask_text(plain), plain);
    // prose after a whole URI without a password is left alone (it was masked to the `@`)
    for prose in [
        "broker amqp://mq:5672/ is down; mail ops@corp.example",
        "see https://wiki.example:8443/runbook or page oncall@corp.example",
    ] {
        assert_eq!(mask_text(prose), prose);
    }
    // a scheme-relative URI after punctuation (its password showed)
    for text in
        ["dsn=//app:PW@db:5432/app", "primary (//app:PW@db/x)", "<//app:PW@db/>", "a,//app:PW@db/"]
    {
        assert!(!mask_text(text).contains("PW"), "{text}: {}", mask_text(text));
    }
    // an `@` then `//`, `://` or a quote in a password: masked whole (its tail showed)
    for password in ["p@ss //w0rdX", "p@ss://w0rdX", "p@ss\"//w0rdX", "p@ss '//w0rdX"] {
        let masked = mask_text(&format!("amqp://svc:{password}@mq:5672/"));
        assert_eq!(masked, "amqp://svc:***@mq:5672/", "{password:?}");
    }
}

#[test]
fn a_secret_nested_in_a_section_is_masked_in_the_error_of_get() {
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Database {
        host: String,
        port: u16,
    }
    let yaml = "SERVICE_NAME: s\nDATABASE: {host: db, password: hunter2-secret}\n";
    let config = ok(Config::from_yaml_str(yaml, &no_env));
    let error = config.get::<Database>("DATABASE").and_then(Result::err);
    let shown =
        format!("{error:?} {}", error.as_ref().map(ToString::to_string).unwrap_or_default());
    assert!(error.is_some() && !shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("missing field `port`") && shown.contains("\"host\":\"db\""), "{shown}");
}

#[test]
fn an_amqp_uri_given_as_a_mapping_is_not_shown() {
    let yaml = "SERVICE_NAME: s\nAMQP_URI:\n  host: mq\n  user: svc\n  pass: Zq7kP2x9w\n";
    let error = Config::from_yaml_str(yaml, &no_env).unwrap_err();
    assert!(!error.to_string().contains("Zq7kP2x9w"), "{error}");
    assert!(error.to_string().contains("expected"), "{error}");
    let yaml = "SERVICE_NAME: s\nAMQP_URI:\n  - {host: mq, pw: Zq7kP2x9w}\n";
    let error = Config::from_yaml_str(yaml, &no_env).unwrap_err();
    assert!(!error.to_string().contains("Zq7kP2x9w"), "{error}");
}

#[test]
fn masked_map_and_debug() {
    let mut config = everything_changed();
    config.extra.insert("DB_PASSWORD".to_string(), json!("hunter2"));
    config.extra.insert("DB".to_string(), json!({"URL": "pg://u:hunter2@h", "TOKEN": 1}));
    config.extra.insert("PLAIN".to_string(), json!(null));
    let map = config.to_masked_map();
    let expected: BTreeMap<String, Value> = [
        ("AMQP_URI", json!("amqps://svc:***@mq.example:5671/prod")),
        ("AMQP_HEARTBEAT", json!(15)),
        ("SERVICE_NAME", json!("orders")),
        ("MAX_WORKERS", json!(7)),
        ("WORKER_MODE", json!("greedy_process")),
        ("MAX_TASKS_PER_CHILD", json!(100)),
        ("ENABLE_METRICS", json!(true)),
        ("STATUS_SHOW_FAILURES", json!(true)),
        ("METRICS", json!({"HOST": "127.0.0.1", "PORT": 9100})),
        ("WEBSOCKET_IP", json!("127.0.0.2")),
        ("WEBSOCKET_PORT", json!(9000)),
        ("WEBSOCKET_ALLOWED_ORIGINS", json!(["https://app.example.com", "http://localhost:3000"])),
        ("WEB_SERVER_ADDRESS", json!("127.0.0.1:8080")),
        ("HTTP_HEADER_READ_TIMEOUT", json!(10.0)),
        ("HTTP_KEEP_ALIVE_TIMEOUT", json!(2.5)),
        ("HTTP_MAX_CONNECTIONS", json!(64)),
        ("HTTP_REQUIRE_JSON_CONTENT_TYPE", json!(true)),
        ("WEBSOCKET_IDLE_TIMEOUT", json!(90.0)),
        ("WEBSOCKET_MAX_CONNECTIONS", json!(32)),
        ("MAX_MESSAGE_SIZE", json!(1048576)),
        ("PREFETCH_COUNT", json!(20)),
        ("PROTOCOL", json!("micro_framework")),
        ("QUEUE_TYPE", json!("quorum")),
        ("AUTO_DELETE_EVENT_EXCHANGES", json!(true)),
        ("DECLARE_EVENT_EXCHANGES", json!(false)),
        ("PARENT_CALLS_TRACKED", json!(25)),
        ("RPC_EXCHANGE", json!("my-rpc")),
        ("RPC_TIMEOUT", json!(2.5)),
        ("RPC_PERSISTENT_REQUESTS", json!(false)),
        ("SHUTDOWN_TIMEOUT", json!(5.0)),
        ("RETRY_DELAY", json!("delayed_message_plugin")),
        ("LOG_FORMAT", json!("json")),
        ("TASK_TIME_LIMIT", json!(12.0)),
        ("MAX_REDELIVERIES", json!(9)),
        ("AMQP_SSL_CA_FILE", json!("/etc/ssl/ca.pem")),
        ("AMQP_SSL_CERT_FILE", json!("/etc/ssl/client.pem")),
        ("AMQP_SSL_KEY_FILE", json!("/etc/ssl/client.key")),
        ("DB_PASSWORD", json!("***")),
        ("DB", json!({"URL": "pg://u:***@h", "TOKEN": "***"})),
        ("PLAIN", json!(null)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(map, expected);

    let defaults = Config::new("s").to_masked_map();
    assert_eq!(defaults["MAX_TASKS_PER_CHILD"], Value::Null);
    assert_eq!(defaults["PREFETCH_COUNT"], json!(3));

    let debug = format!("{config:?}");
    assert!(!debug.contains("hunter2") && !debug.contains(":pw@"), "{debug}");
    assert!(debug.contains("amqps://svc:***@mq.example:5671/prod"), "{debug}");
}

#[test]
fn unknown_keys_are_named_with_the_key_they_resemble() {
    let yaml = "SERVICE_NAME: s\nAMQP_URL: amqp://h\nRPC_TIMOUT: 5\nmax_workers: 2\n\
                PROCESS_WORKER_TIMEOUT: 30\nMY_SETTING: 1\n";
    let config = Config::from_yaml_str(yaml, &|_| None).unwrap();
    assert_eq!(
        config.unknown_keys(),
        vec![
            ("AMQP_URL", UnknownKey::Resembles("AMQP_URI")),
            ("MY_SETTING", UnknownKey::Application),
            ("PROCESS_WORKER_TIMEOUT", UnknownKey::of("PROCESS_WORKER_TIMEOUT", |_| None)),
            ("RPC_TIMOUT", UnknownKey::Resembles("RPC_TIMEOUT")),
            ("max_workers", UnknownKey::Resembles("MAX_WORKERS")),
        ]
    );
    let python_only = UnknownKey::of("process_worker_timeout", |_| None);
    assert!(
        matches!(python_only, UnknownKey::PythonOnly(why) if why.contains("MAX_TASKS_PER_CHILD"))
    );
    assert!(python_only
        .to_string()
        .starts_with("a key of the Python originals with no meaning here"));
    for key in ["serializer", "AMPQ_URI", "AMQP_SSL", "LOGGING", "HEARTBEAT", "TRANSPORT_OPTIONS"] {
        assert!(matches!(UnknownKey::of(key, |_| None), UnknownKey::PythonOnly(_)), "{key}");
    }
    let typo = UnknownKey::Resembles("RPC_TIMEOUT").to_string();
    assert_eq!(
        typo,
        "not a micro-framework key (did you mean RPC_TIMEOUT?); it is kept for Config::get"
    );
}

#[test]
fn a_service_name_too_long_for_a_reply_queue_is_refused() {
    // `rpc.reply-{SERVICE_NAME}-{uuid}` must fit AMQP's 255 bytes
    assert!(Config::new("s".repeat(208)).validate().is_ok());
    let e = env_err(&[("SERVICE_NAME", &"s".repeat(209))]);
    assert_eq!(e.key, "SERVICE_NAME");
    assert!(e.reason.starts_with("is 209 bytes; must be at most 208 bytes"), "{}", e.reason);
}

#[test]
fn yaml_non_finite_numbers_are_refused_naming_key_and_value() {
    for (key, value, shown) in [
        ("TASK_TIME_LIMIT", "-.inf", "-inf"),
        ("TASK_TIME_LIMIT", ".nan", "NaN"),
        ("PREFETCH_COUNT", ".nan", "NaN"),
        ("MAX_TASKS_PER_CHILD", ".inf", "inf"),
        ("RPC_TIMEOUT", ".inf", "inf"),
    ] {
        let e = yaml_err(&format!("SERVICE_NAME: s\n{key}: {value}\n"));
        assert_eq!((e.key.as_str(), e.value.as_str()), (key, shown), "{e}");
    }
    // an application's key keeps it as text, as from TOML
    let config = ok(Config::from_yaml_str("SERVICE_NAME: s\nSHOP_RATIO: -.inf\n", &no_env));
    assert_eq!(config.extra["SHOP_RATIO"], json!("-inf"));
}

#[test]
fn nameko_env_var_tags_are_applied_as_nameko_applies_them() {
    let yaml = "SERVICE_NAME: s
AMQP_URI: !env_var \"amqp://${RABBIT_USER:guest}:guest@localhost:5672/\"
SHOP_WORKERS: !env_var \"${SHOP_WORKERS:4}\"
SHOP_FLAG: !env_var \"${SHOP_FLAG:true}\"
SHOP_RAW_FLAG: !raw_env_var \"${SHOP_FLAG:true}\"
SHOP_PLAIN: !env_var '4'
SHOP_LIST: [!env_var '${SVC}']
";
    let config = ok(Config::from_yaml_str(yaml, &env));
    assert_eq!(config.amqp_uri, "amqp://guest:guest@localhost:5672/");
    // `!env_var` parses what substitution gives as YAML; `!raw_env_var` keeps a string
    assert_eq!(config.extra["SHOP_WORKERS"], json!(4));
    assert_eq!(config.extra["SHOP_FLAG"], json!(true));
    assert_eq!(config.extra["SHOP_RAW_FLAG"], json!("true"));
    // no reference: Nameko keeps the text as it is
    assert_eq!(config.extra["SHOP_PLAIN"], json!("4"));
    assert_eq!(config.extra["SHOP_LIST"], json!(["billing"]));
}

#[test]
fn other_yaml_tags_are_refused_naming_key_and_tag() {
    let e = yaml_err("SERVICE_NAME: s\nSHOP_TOKEN: !vault secret/shop\n");
    assert_eq!(e.key, "SHOP_TOKEN");
    assert!(e.reason.contains("!vault") && e.reason.contains("!env_var"), "{e}");
    let e = yaml_err("SERVICE_NAME: s\nDB:\n  HOST: !host x\n");
    assert_eq!(e.key, "DB.HOST");
    let e = yaml_err("SERVICE_NAME: s\nSHOP: !env_var {a: 1}\n");
    assert_eq!(e.key, "SHOP");
    assert!(e.reason.contains("!env_var"), "{e}");
    // the non-specific tag is named as written (the parser prints it `!!`, a core tag's
    // prefix): YAML 1.2 reads `! 5` as text where PyYAML reads the number 5
    for value in ["! 5", "! '5'", "! [1]"] {
        let e = yaml_err(&format!("SERVICE_NAME: s\nSHOP_RATE: {value}\n"));
        assert_eq!(e.key, "SHOP_RATE");
        assert!(e.reason.starts_with("the non-specific YAML tag ! is not supported"), "{e}");
        assert!(!e.reason.contains("!!"), "{e}");
    }
    // YAML's core tags are read
    let yaml = "SERVICE_NAME: s\nSHOP_COUNT: !!int 5\nSHOP_CODE: !!str 5\n";
    let config = ok(Config::from_yaml_str(yaml, &no_env));
    assert_eq!((&config.extra["SHOP_COUNT"], &config.extra["SHOP_CODE"]), (&json!(5), &json!("5")));
}

#[test]
fn yaml_integers_wider_than_64_bits_are_refused_naming_key_and_line() {
    // PyYAML reads any integer (a Python int); a JSON value here holds 64 bits: the file is
    // refused naming the key and its place, never read as a rounded float
    let yaml = "SERVICE_NAME: s\nSHOP_SEED: 123456789012345678901234567890\n";
    let e = yaml_err(yaml);
    assert_eq!(e.key, "<yaml>");
    assert!(e.reason.contains("SHOP_SEED") && e.reason.contains("line 2 column 12"), "{e}");
    assert!(e.reason.contains("123456789012345678901234567890"), "{e}");
    // quoted, it is text, as under PyYAML
    let yaml = "SERVICE_NAME: s\nSHOP_SEED: '123456789012345678901234567890'\n";
    let config = ok(Config::from_yaml_str(yaml, &no_env));
    assert_eq!(config.extra["SHOP_SEED"], json!("123456789012345678901234567890"));
    // the widest integers that fit are kept exactly
    let yaml = "SERVICE_NAME: s\nSHOP_MAX: 18446744073709551615\nSHOP_MIN: -9223372036854775808\n";
    let config = ok(Config::from_yaml_str(yaml, &no_env));
    assert_eq!(config.extra["SHOP_MAX"], json!(u64::MAX));
    assert_eq!(config.extra["SHOP_MIN"], json!(i64::MIN));
}

#[test]
fn yaml_merge_keys_are_applied_as_pyyaml_applies_them() {
    // per-environment files shared with the Python peers: `<<: *base`, keys of the mapping
    // itself winning over the merged ones, at any depth
    let yaml = "
base: &base
  MAX_WORKERS: 8
  RPC_TIMEOUT: 5
  METRICS: &metrics {HOST: 127.0.0.1, PORT: 9100}
SERVICE_NAME: orders
<<: *base
RPC_TIMEOUT: 7
METRICS:
  <<: *metrics
  PORT: 9200
";
    let config = ok(Config::from_yaml_str(yaml, &no_env));
    assert_eq!((config.max_workers, config.rpc_timeout), (8, Duration::from_secs(7)));
    assert_eq!((config.metrics.host.as_str(), config.metrics.port), ("127.0.0.1", 9200));
    assert_eq!(config.unknown_keys().into_iter().map(|(key, _)| key).collect::<Vec<_>>(), ["base"]);
}

/// A chain of merges (`production` merges `base`, the file merges `production`) and a list of
/// sources apply as PyYAML applies them: the base's keys arrived, and no `<<` key was left.
#[test]
fn chained_yaml_merge_keys_apply_as_pyyaml_applies_them() {
    let yaml = "
base: &base {MAX_WORKERS: 8, RPC_TIMEOUT: 5}
production: &production
  <<: *base
  RPC_TIMEOUT: 9
debug: &debug {ENABLE_METRICS: true, MAX_WORKERS: 2}
SERVICE_NAME: orders
<<: [*production, *debug]
";
    let config = ok(Config::from_yaml_str(yaml, &no_env));
    let set = (config.max_workers, config.rpc_timeout, config.enable_metrics);
    assert_eq!(set, (8, Duration::from_secs(9), true));
    assert!(!config.extra.contains_key("<<"), "{:?}", config.extra);
    // PyYAML's booleans `on`/`off`, as Nameko's files hold them
    let yaml = "SERVICE_NAME: s\nENABLE_METRICS: on\nRPC_PERSISTENT_REQUESTS: 'Off'\n";
    let config = ok(Config::from_yaml_str(yaml, &no_env));
    assert!(config.enable_metrics && !config.rpc_persistent_requests);
    let e = yaml_err("SERVICE_NAME: s\n<<: 5\n");
    assert!(e.reason.contains("a merge key (<<) takes a mapping"), "{e}");
}

#[test]
fn settings_that_do_not_do_what_they_say_are_warned_about() {
    let warned = |config: Config| config.warnings().join("\n");
    let off = "does not turn heartbeats off here";
    assert!(warned(Config::new("s").with_amqp_heartbeat(0)).contains(off));
    let in_uri = Config::new("s").with_amqp_uri("amqp://h/?heartbeat=0".into());
    assert!(warned(in_uri).contains(off));
    // the URI's option wins over the key, and the in-process broker has no heartbeat
    let overridden =
        Config::new("s").with_amqp_heartbeat(0).with_amqp_uri("amqp://h/?heartbeat=5".into());
    assert!(!warned(overridden).contains(off));
    let memory = Config::new("s").with_amqp_heartbeat(0).with_amqp_uri("memory://".into());
    assert!(!warned(memory).contains(off));
    assert_eq!(Config::new("s").warnings(), Vec::<String>::new());
    // an application's own key, read with Config::get, is not warned about at every start
    let own = ok(Config::from_yaml_str("SERVICE_NAME: s\nINITIAL_STOCK: 5\n", &no_env));
    assert_eq!(own.get::<u32>("INITIAL_STOCK").map(Result::ok), Some(Some(5)));
    assert_eq!(own.warnings(), Vec::<String>::new());
    let typo = ok(Config::from_yaml_str("SERVICE_NAME: s\nRPC_TIMOUT: 5\n", &no_env));
    assert_eq!(typo.warnings().len(), 1);

    let unencrypted = "the amqp:// connection is not encrypted";
    let ca = || Some("/etc/mf/ca.pem".to_owned());
    let plain = Config::new("s").with_amqp_ssl_ca_file(ca());
    assert!(warned(plain).contains(unencrypted));
    let tls = Config::new("s").with_amqp_ssl_ca_file(ca()).with_amqp_uri("amqps://h/".into());
    assert!(!warned(tls).contains(unencrypted));
}

#[test]
fn a_zero_connection_timeout_is_refused() {
    // every attempt would time out at once, the broker up or not
    for uri in [
        "amqp://h/?connection_timeout=0",
        "amqp://a/?connection_timeout=5,amqp://b/?connection_timeout=0",
    ] {
        let refused = ok_or_refusal(Config::new("s").with_amqp_uri(uri.into()));
        assert_eq!(refused.key, "AMQP_URI", "{uri}");
        assert!(refused.reason.contains("connection_timeout=0"), "{refused}");
    }
    assert!(Config::new("s")
        .with_amqp_uri("amqp://h/?connection_timeout=1".into())
        .validate()
        .is_ok());
}

#[test]
fn amqp_uris_the_transport_would_refuse_are_refused_naming_the_key() {
    for (uri, reason) in [
        ("amqp://", "has no host: write the broker's, e.g. amqp://localhost/"),
        ("amqp://u:p@h/?heartbeat=abc", "bad heartbeat 'abc'"),
        ("amqp://u:p@h/?frame_max=1", "frame_max 1 is below AMQP's minimum of 4096"),
        ("amqp://u:p@h:0/", "port 0: expected a port from 1 to 65535"),
        ("amqp://a/,amqp://b/?heartbeat=x", "entry 2 of AMQP_URI: bad heartbeat 'x'"),
    ] {
        let refused = ok_or_refusal(Config::new("s").with_amqp_uri(uri.into()));
        assert_eq!((refused.key.as_str(), refused.reason.as_str()), ("AMQP_URI", reason));
    }
    let smallest = Config::new("s").with_amqp_uri("amqp://h/?frame_max=4096".into());
    assert_eq!(smallest.validate(), Ok(()));
}

fn ok_or_refusal(config: Config) -> ConfigError {
    config.validate().expect_err("refused")
}

#[test]
fn keys_of_ones_own_are_not_taken_for_misspellings() {
    let own = [
        "API_TIMEOUT",
        "MAX_CONNECTIONS",
        "METRICS_PATH",
        "WEBSOCKET_URL",
        "RPC_TIMEOUT_MS",
        "MAX_MESSAGES",
    ];
    let typos = [
        ("AMQP_URL", "AMQP_URI"),
        ("MAX_WORKER", "MAX_WORKERS"),
        ("MAXWORKERS", "MAX_WORKERS"),
        ("RPC_TIMOUT", "RPC_TIMEOUT"),
        ("QUEUE_TYPES", "QUEUE_TYPE"),
        ("LOG_FORMT", "LOG_FORMAT"),
        ("AMQPURI", "AMQP_URI"),
        ("AMQP-URI", "AMQP_URI"),
        // one word off, and that one close
        ("LOG_FRMT", "LOG_FORMAT"),
        ("MAX_WRKRS", "MAX_WORKERS"),
        // a letter off, the separators aside
        ("MAXWORKER", "MAX_WORKERS"),
        ("AMQPURL", "AMQP_URI"),
    ];
    let file: String = own
        .iter()
        .chain(typos.iter().map(|(typo, _)| typo))
        .map(|key| format!("{key}: 1\n"))
        .collect();
    let config = ok(Config::from_yaml_str(&format!("SERVICE_NAME: s\n{file}"), &no_env));
    for key in own {
        let kind =
            config.unknown_keys().into_iter().find(|(name, _)| *name == key).map(|(_, kind)| kind);
        assert_eq!(kind, Some(UnknownKey::Application), "{key}");
    }
    for (typo, key) in typos {
        let kind =
            config.unknown_keys().into_iter().find(|(name, _)| *name == typo).map(|(_, kind)| kind);
        assert_eq!(kind, Some(UnknownKey::Resembles(key)), "{typo}");
    }
    let env: Vec<(&str, &str)> =
        own.iter().map(|key| (*key, "1")).chain([("SERVICE_NAME", "s")]).collect();
    assert_eq!(ok(Config::from_vars(vars(&env))).misspelt_env_vars(), []);
}

#[test]
fn keys_that_must_be_at_least_one_say_so_in_their_range() {
    for (key, value, range) in [
        ("PREFETCH_COUNT", "65536", "from 1 to 65535"),
        ("MAX_TASKS_PER_CHILD", "-1", "from 1 to 4294967295"),
    ] {
        let refused = env_err(&[("SERVICE_NAME", "s"), (key, value)]);
        assert!(refused.reason.contains(range), "{refused}");
    }
}

#[test]
fn a_bare_web_server_port_set_in_code_is_on_every_interface() {
    let config = Config::new("s").with_web_server_address("8081".into());
    assert!(config.validate().is_ok());
    #[cfg(feature = "http")]
    assert_eq!(config.web_server_bind_address(), "0.0.0.0:8081");
    let refused = ok_or_refusal(Config::new("s").with_web_server_address("nowhere".into()));
    assert_eq!(refused.key, "WEB_SERVER_ADDRESS", "{refused}");
}
