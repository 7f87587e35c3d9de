//! Typed errors at the service level: what stops start-up at once and what is tried again,
//! and that a route failing while the service runs is not a start-up error.

mod common;

use std::time::Duration;

use common::failing::Failing;
use common::journaled::{Fault, Journal, Journaled};
use common::{config, rabbitmq_uri, unique};
use micro_framework::amqp::dependencies::RpcProxy;
use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::amqp::rpc::RpcError;
use micro_framework::entrypoints::{Entrypoint, TimeEntrypoint};
use micro_framework::prelude::*;
use micro_framework::transport::{ClosedPart, TransportError};
use micro_framework::{Error, RouteHandle};

fn noop() {}

#[tokio::test]
async fn a_route_failing_at_run_time_is_not_a_start_up_error() {
    let routes = vec![Route::new(noop).entrypoint(Failing { panic: false })];
    let mut service =
        Runner::new(routes, config("memory://", "failing")).spawn().await.expect("it starts");
    let error = tokio::time::timeout(Duration::from_secs(10), service.wait_finished())
        .await
        .expect("the service stops by itself")
        .expect_err("with the route's error");
    let Error::RouteStopped { route, source } = &error else {
        panic!("expected RouteStopped, got {error:?}")
    };
    assert_eq!(route, "noop");
    assert!(
        matches!(
            **source,
            Error::Transport(TransportError::Closed { what: ClosedPart::Consumer, .. })
        ),
        "{source:?}"
    );
    // the cause is the error's source, shown by its `Debug` (tests/error_reports.rs)
    assert_eq!(format!("{error:?}"), "route 'noop' stopped: closed: the queue was deleted");

    let routes = vec![Route::new(noop).entrypoint(Failing { panic: true })];
    let mut service =
        Runner::new(routes, config("memory://", "panicking")).spawn().await.expect("it starts");
    let error = tokio::time::timeout(Duration::from_secs(10), service.wait_finished())
        .await
        .expect("the service stops by itself")
        .expect_err("with the panic");
    assert!(matches!(error, Error::EntrypointPanicked(_)), "{error:?}");
    assert!(error.to_string().starts_with("an entrypoint panicked: "), "{error}");
}

fn listener_routes() -> Vec<Route> {
    vec![Route::new(noop).entrypoint(EventListener::new(unique("src"), "e"))]
}

#[tokio::test]
async fn refused_credentials_stop_the_start_at_once() {
    let Some(uri) = rabbitmq_uri() else { return };
    let address = uri.split('@').nth(1).unwrap().to_owned();
    let refused = Config::new(unique("refused"))
        .with_amqp_uri(format!("amqp://guest:not-the-password@{address}"));
    let stop = tokio::time::sleep(Duration::from_secs(60));
    let outcome = tokio::time::timeout(
        Duration::from_secs(20),
        Runner::new(listener_routes(), refused).run_until(stop),
    )
    .await
    .expect("start-up must fail, not retry");
    let error = outcome.expect_err("refused");
    assert!(matches!(error, Error::Transport(TransportError::Authentication(_))), "{error:?}");
    assert!(!error.to_string().contains("not-the-password"), "{error}");
}

#[tokio::test]
async fn a_bad_uri_or_tls_file_stops_the_start_at_once() {
    // an option the transport cannot use: refused with the configuration, naming the key
    let bad_uri = Config::new(unique("bad_uri"))
        .with_amqp_uri("amqp://guest:guest@127.0.0.1:1/?heartbeat=often".into());
    let stop = tokio::time::sleep(Duration::from_secs(60));
    let outcome = tokio::time::timeout(
        Duration::from_secs(20),
        Runner::new(listener_routes(), bad_uri).run_until(stop),
    )
    .await
    .expect("start-up must fail, not retry");
    let error = outcome.expect_err("refused");
    assert!(matches!(&error, Error::Config(e) if e.key == "AMQP_URI"), "{error:?}");

    // nothing listens on that port: an unreadable CA file is refused before connecting
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let missing_ca = Config::new(unique("missing_ca"))
        .with_amqp_uri(format!("amqps://guest:guest@127.0.0.1:{port}/"))
        .with_amqp_ssl_ca_file(Some("/nonexistent/ca.pem".into()));
    let stop = tokio::time::sleep(Duration::from_secs(60));
    let outcome = tokio::time::timeout(
        Duration::from_secs(20),
        Runner::new(listener_routes(), missing_ca).run_until(stop),
    )
    .await
    .expect("start-up must fail, not retry");
    let error = outcome.expect_err("refused");
    assert!(matches!(error, Error::Transport(TransportError::Tls(_))), "{error:?}");
}

/// A CA file that holds no certificate (here a key, a swapped file) stops the start at once,
/// naming the key and the file: it was taken as no CA, and the handshake failed later with
/// `UnknownIssuer`, as if the broker's certificate were wrong.
#[cfg(feature = "tls")]
#[tokio::test]
async fn a_ca_file_without_a_certificate_stops_the_start_naming_it() {
    let path = std::env::temp_dir().join(format!("{}.pem", unique("ca_is_a_key")));
    std::fs::write(&path, rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = Config::new(unique("ca_is_a_key"))
        .with_amqp_uri(format!("amqps://guest:guest@127.0.0.1:{port}/"))
        .with_amqp_ssl_ca_file(Some(path.display().to_string()));
    let stop = tokio::time::sleep(Duration::from_secs(60));
    let outcome = tokio::time::timeout(
        Duration::from_secs(20),
        Runner::new(listener_routes(), config).run_until(stop),
    )
    .await
    .expect("start-up must fail, not retry");
    std::fs::remove_file(&path).ok();
    let error = outcome.expect_err("refused");
    let expected = format!("AMQP_SSL_CA_FILE {} holds no certificate (PEM)", path.display());
    assert!(error.to_string().contains(&expected), "{error}");
}

/// What validation (so the start and `show-config`) accepts, the connect takes: the
/// in-process broker's scheme in any case and after blanks; a URI the transport would refuse
/// (no host, a bad option, a frame_max below AMQP's minimum, port 0) is refused up front,
/// naming `AMQP_URI`.
#[tokio::test]
async fn amqp_uris_the_config_accepts_are_uris_the_transport_takes() {
    for uri in [" memory://validated-alike", "MEMORY://validated-alike"] {
        let config = Config::new("s").with_amqp_uri(uri.to_owned());
        assert_eq!(config.validate(), Ok(()), "{uri:?}");
        let transport = micro_framework::transport::connect(&config).await;
        transport.unwrap_or_else(|error| panic!("{uri:?}: {error}")).close().await;
    }
    for uri in [
        "amqp://",
        "amqp://guest:guest@127.0.0.1:5672/?heartbeat=abc",
        "amqp://guest:guest@127.0.0.1:5672/?frame_max=1",
        "amqp://guest:guest@127.0.0.1:0/",
    ] {
        let refused = Config::new("s").with_amqp_uri(uri.to_owned()).validate();
        assert_eq!(refused.map_err(|error| error.key), Err("AMQP_URI".to_owned()), "{uri:?}");
    }
}

#[tokio::test]
async fn a_server_that_does_not_speak_amqp_is_named_as_such() {
    use std::io::{Read, Write};
    // an HTTP server where the broker should be (a wrong port)
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in server.incoming().take(1) {
            let mut stream = stream.unwrap();
            let mut greeting = [0; 8];
            let _ = stream.read_exact(&mut greeting);
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
            std::thread::sleep(Duration::from_secs(2));
        }
    });
    let config = Config::new(unique("wrongport"))
        .with_amqp_uri(format!("amqp://guest:guest@127.0.0.1:{port}/"));
    let error = micro_framework::transport::connect(&config).await.unwrap_err();
    let text = error.to_string();
    assert!(text.contains("does not speak AMQP"), "{text}");
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
}

#[tokio::test]
async fn an_unreachable_broker_is_tried_again_until_stopped() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let down =
        Config::new(unique("down")).with_amqp_uri(format!("amqp://guest:guest@127.0.0.1:{port}/"));
    let direct = micro_framework::transport::connect(&down).await.expect_err("nothing listens");
    assert!(matches!(direct, TransportError::Unreachable(_)), "{direct:?}");
    assert!(!direct.is_permanent());
    // the runner keeps trying (1 s, 2 s, ...) until the stop signal, then returns cleanly
    let stop = tokio::time::sleep(Duration::from_millis(2500));
    let outcome = tokio::time::timeout(
        Duration::from_secs(20),
        Runner::new(listener_routes(), down).run_until(stop),
    )
    .await
    .expect("the stop ends the retries");
    outcome.expect("stopped before the broker answered: not an error");
}

/// An entrypoint whose set-up fails.
struct RefusesToSetUp;

#[micro_framework::async_trait]
impl Entrypoint for RefusesToSetUp {
    fn describe(&self) -> String {
        "RefusesToSetUp".into()
    }

    async fn setup(&mut self, _route: &RouteHandle) -> micro_framework::Result<()> {
        Err(Error::Startup("no queue for this entrypoint".into()))
    }

    async fn run(self: Box<Self>, _route: RouteHandle) -> micro_framework::Result<()> {
        Ok(())
    }
}

/// A route whose first dependency starts and whose second one fails when `second_fails`.
fn tracked_route(journal: &Journal, second_fails: bool, entrypoint: impl Entrypoint) -> Route {
    let fault = if second_fails { Fault::SetupFails } else { Fault::None };
    Route::new(noop)
        .entrypoint(entrypoint)
        .dependency(Journaled::new("first", journal, 1u8))
        .dependency(Journaled::new("second", journal, 2u16).failing(fault))
}

#[tokio::test]
async fn a_start_that_fails_tears_down_the_dependencies_it_set_up() {
    use micro_framework::testing::{memory_test_config, worker, TestService};
    let journal = Journal::default();
    let config = memory_test_config(&unique("halfstart"));

    // a dependency fails to set up: the one set up before it is torn down
    let route = tracked_route(&journal, true, EventListener::new("shop", "paid"));
    let error = TestService::start(vec![route], config.clone()).await.unwrap_err();
    assert!(format!("{error:?}").contains("second cannot start"), "{error:?}");
    let seen = std::mem::take(&mut *journal.lock().unwrap());
    assert_eq!(seen, ["setup first", "setup second", "teardown first"]);

    // an entrypoint fails to set up: every dependency is torn down, the last set up first
    let route = tracked_route(&journal, false, RefusesToSetUp);
    TestService::start(vec![route], config.clone()).await.unwrap_err();
    let seen = std::mem::take(&mut *journal.lock().unwrap());
    assert_eq!(seen, ["setup first", "setup second", "teardown second", "teardown first"]);

    // the metrics server cannot listen (its port is taken): found before anything is set up
    #[cfg(feature = "metrics")]
    {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let metrics = micro_framework::config::MetricsConfig { host: "127.0.0.1".into(), port };
        let config = config.clone().with_enable_metrics(true).with_metrics(metrics);
        let route = tracked_route(&journal, false, EventListener::new("shop", "paid"));
        let error = TestService::start(vec![route], config).await.unwrap_err();
        assert!(error.to_string().contains("cannot serve metrics"), "{error}");
        assert!(journal.lock().unwrap().is_empty(), "nothing was set up");
    }

    // the same for a call made with the testing toolkit's `worker`
    let route = tracked_route(&journal, true, EventListener::new("shop", "paid"));
    worker(route).event::<()>(&serde_json::json!({})).await.unwrap_err();
    let seen = std::mem::take(&mut *journal.lock().unwrap());
    assert_eq!(seen, ["setup first", "setup second", "teardown first"]);
}

#[tokio::test]
async fn a_huge_max_workers_is_a_start_up_error_not_a_panic() {
    // past tokio's semaphore limit (usize::MAX >> 3) the worker pool could not be made
    let uri = format!("memory://{}", unique("huge_workers"));
    let vars = [("SERVICE_NAME", "huge"), ("MAX_WORKERS", "18446744073709551615")];
    let error = Config::from_vars(vars.map(|(key, value)| (key.into(), value.into()))).unwrap_err();
    assert_eq!(
        error.to_string(),
        r#"invalid config MAX_WORKERS="18446744073709551615": must be at most 1048576"#
    );
    let in_code = config(&uri, "huge").with_max_workers(usize::MAX);
    let error = Runner::new(listener_routes(), in_code).spawn().await.unwrap_err();
    assert!(error.to_string().contains("MAX_WORKERS"), "{error}");
    let context = RunnerContext::new(listener_routes()).max_workers(usize::MAX);
    let runner = Runner::new(Vec::new(), config(&uri, "huge")).context(context);
    let error = runner.spawn().await.unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "cannot start: a RunnerContext needs max_workers from 1 to 1048576, got {}",
            usize::MAX
        )
    );
}

#[tokio::test]
async fn a_zero_context_time_limit_is_a_start_up_error() {
    // as TASK_TIME_LIMIT=0 is refused: every async call would fail at once
    let uri = format!("memory://{}", unique("zero_limit"));
    let context = RunnerContext::new(listener_routes()).time_limit(Duration::ZERO);
    let runner = Runner::new(Vec::new(), config(&uri, "zero_limit")).context(context);
    let error = runner.spawn().await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "cannot start: a RunnerContext needs a time_limit above zero (leave it unset for \
         TASK_TIME_LIMIT)"
    );
}

#[tokio::test]
async fn an_event_listener_without_a_source_or_an_event_name_stops_the_start() {
    // `{source}.events` of an empty source is `.events`, and an empty event name binds the
    // routing key "": such a listener would start and never receive an event
    let uri = format!("memory://{}", unique("empty_names"));
    for (source, event) in [("", "paid"), ("shop", ""), (" ", "paid")] {
        let routes = vec![Route::new(noop).entrypoint(EventListener::new(source, event))];
        let error = Runner::new(routes, config(&uri, "names")).spawn().await.unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "cannot start: route 'noop': EventListener({source}.{event}) needs a source \
                 service and an event name"
            )
        );
    }
}

#[tokio::test]
async fn a_route_with_an_empty_name_stops_the_start_saying_so() {
    let uri = format!("memory://{}", unique("empty_name"));
    for name in ["", "  "] {
        let route = Route::new(noop).name(name).entrypoint(EventListener::new(unique("src"), "e"));
        let error = Runner::new(vec![route], config(&uri, "nameless")).spawn().await.unwrap_err();
        assert_eq!(
            error.to_string(),
            "cannot start: a route has an empty name: give it one with Route::name, or none for \
             its function's name"
        );
    }
}

/// A Nameko method can carry `@rpc` and `@event_handler` at once; a route has one entrypoint,
/// and a second one given kept only the last, silently: the first never triggered.
#[tokio::test]
async fn a_route_given_two_entrypoints_stops_the_start_saying_so() {
    let uri = format!("memory://{}", unique("two_entrypoints"));
    let route = Route::new(noop)
        .entrypoint(EventListener::new("shop", "paid"))
        .entrypoint(micro_framework::amqp::entrypoints::RPCListener::new());
    let error = Runner::new(vec![route], config(&uri, "twice")).spawn().await.unwrap_err();
    assert!(matches!(error, Error::Startup(_)), "{error:?}");
    assert_eq!(
        error.to_string(),
        "cannot start: route 'noop' was given 2 entrypoints (EventListener(shop.paid), then \
         RPCListener): a route has one; for a target triggered in several ways, add a route for \
         each, with a name of its own (Route::name)"
    );
}

#[tokio::test]
async fn a_service_name_too_long_for_its_queue_names_is_named_with_the_route() {
    // validation takes up to 208 bytes; with a long event type, the queue
    // `evt-shop-{type}--{SERVICE_NAME}.noop` is over AMQP's 255 bytes, which only the route's
    // set-up finds
    let uri = format!("memory://{}", unique("long_name"));
    let long = unique(&"s".repeat(160));
    let event_type = "paid".repeat(20);
    let routes = vec![Route::new(noop).entrypoint(EventListener::new("shop", event_type))];
    let config = Config::new(long.as_str()).with_amqp_uri(uri);
    let error = Runner::new(routes, config).spawn().await.unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, Error::Startup(_)), "{error:?}");
    assert!(message.contains("route 'noop'"), "{message}");
    assert!(message.contains(&format!("SERVICE_NAME ({} bytes)", long.len())), "{message}");
}

#[tokio::test]
async fn a_service_name_too_long_for_its_reply_queue_is_refused_by_the_config() {
    // `rpc.reply-{SERVICE_NAME}-{uuid}` is 47 bytes longer than the name: a name of 209 bytes
    // or more would make every call of an RpcProxy fail, long after the start
    let uri = format!("memory://{}", unique("long_reply"));
    async fn calls(rpc: RpcProxy) -> Result<(), RpcError> {
        rpc.service("other").call::<()>("method", (), ()).await
    }
    let name = "s".repeat(209);
    let routes = vec![Route::new(calls).entrypoint(EventListener::new("shop", "paid"))];
    let config = Config::new(name.as_str()).with_amqp_uri(uri);
    let error = Runner::new(routes, config).spawn().await.unwrap_err();
    let message = error.to_string();
    assert!(message.contains("SERVICE_NAME"), "{message}");
    assert!(message.contains("at most 208 bytes"), "{message}");
}

/// A vhost of its own, deleted on drop.
struct Vhost(String);

impl Vhost {
    fn new(name: String) -> Vhost {
        for args in [
            vec!["add_vhost", &name],
            vec!["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"],
            vec!["set_vhost_limits", "-p", &name, r#"{"max-connections": 1}"#],
        ] {
            let out = std::process::Command::new("rabbitmqctl").args(&args).output().unwrap();
            assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
        }
        Vhost(name)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl").args(["delete_vhost", &self.0]).output();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vhost_connection_limit_reached_at_start_up_is_waited_for() {
    // RabbitMQ refuses a connection over a vhost's (or user's) `max-connections` with
    // `530 NOT_ALLOWED`, as it refuses a missing vhost, but the slot frees when another
    // instance stops (a rolling deploy): the start tries again
    let Some(uri) = rabbitmq_uri() else { return };
    let address = uri.split('@').nth(1).unwrap().trim_end_matches('/').to_owned();
    let vhost = Vhost::new(unique("limited"));
    let uri = format!("amqp://guest:guest@{address}/{}", vhost.0);
    let holder =
        micro_framework::transport::connect(&Config::new("holder").with_amqp_uri(uri.clone()))
            .await
            .expect("the first connection takes the only slot");
    let refused = micro_framework::transport::connect(&Config::new("s").with_amqp_uri(uri.clone()))
        .await
        .expect_err("no slot left");
    assert!(matches!(refused, TransportError::Broker { code: 530, .. }), "{refused:?}");
    assert!(!refused.is_permanent(), "{refused}");

    let (ticked, first_tick) = tokio::sync::oneshot::channel();
    let ticked = std::sync::Arc::new(std::sync::Mutex::new(Some(ticked)));
    let tick = move || {
        if let Some(ticked) = ticked.lock().unwrap().take() {
            let _ = ticked.send(());
        }
    };
    let routes = vec![Route::new(tick)
        .name("tick")
        .entrypoint(TimeEntrypoint::every(Duration::from_millis(100)))];
    let config = Config::new(unique("limited")).with_amqp_uri(uri);
    let run = tokio::spawn(Runner::new(routes, config).run_until(async {
        let _ = first_tick.await;
    }));
    tokio::time::sleep(Duration::from_secs(2)).await;
    if run.is_finished() {
        panic!("the start gave up: {:?}", run.await);
    }
    holder.close().await;
    let outcome = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("started once the slot freed, ticked and stopped");
    outcome.unwrap().expect("a clean stop");
}

/// A `main` returning `micro_framework::Result` prints a returned error as its message, as
/// the README shows it (was: the derived `Debug`, `Config(ConfigError { key: ... })`).
#[test]
fn a_program_whose_main_returns_an_error_prints_its_message() {
    let exe = std::env::current_exe().unwrap();
    let examples = exe.parent().and_then(std::path::Path::parent).unwrap().join("examples");
    let output = std::process::Command::new(examples.join("quickstart"))
        .env("WORKER_MODE", "fibers")
        .output()
        .expect("cargo build --examples first");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "Error: invalid config WORKER_MODE=\"fibers\": expected one of thread, \
             greedy_thread, process, greedy_process"
        ),
        "{stderr}"
    );
}

/// The configuration's reading, `AMQP_URI` checks and secret masking: cases the suite let
/// change unnoticed (each names the change it catches).
mod configuration {
    use micro_framework::config::{Config, ConfigError};
    use serde_json::json;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn yaml(text: &str) -> Config {
        Config::from_yaml_str(text, &no_env).unwrap_or_else(|error| panic!("{text}: {error}"))
    }

    // ------------------------------------------------------------------------------ YAML

    /// PyYAML applies a merge key wherever a mapping is, a mapping in a list too (a list of
    /// per-node settings sharing a base). Mutant: the items of a sequence not walked.
    #[test]
    fn a_merge_key_in_a_mapping_inside_a_list_is_applied() {
        let config = yaml(
            "SERVICE_NAME: s\nbase: &base {port: 5432, user: app}\nSHOP_DBS:\n  - <<: *base\n    \
             host: a\n  - {<<: *base, host: b, port: 6432}\n",
        );
        assert_eq!(
            config.extra["SHOP_DBS"],
            json!([
                {"host": "a", "port": 5432, "user": "app"},
                {"host": "b", "port": 6432, "user": "app"},
            ])
        );
    }

    /// PyYAML refuses a merge list holding anything but mappings ("expected a mapping for
    /// merging"). Mutant: such an item skipped, the file accepted.
    #[test]
    fn a_merge_list_holding_a_scalar_is_refused() {
        let text = "SERVICE_NAME: s\nbase: &base {MAX_WORKERS: 3}\n<<: [*base, 5]\n";
        let error = Config::from_yaml_str(text, &no_env).unwrap_err();
        assert!(error.reason.contains("a merge key (<<) takes a mapping"), "{error}");
    }

    /// `!env_var` reads what substitution gives as YAML, and substitutes no further: a
    /// variable's value holding `${...}` is kept as it is (Nameko's `yaml.safe_load` of the
    /// substituted text knows no references). Mutant: the value substituted again.
    #[test]
    fn the_value_of_an_env_var_tag_is_not_substituted_again() {
        let vars = |name: &str| match name {
            "SHOP_TEMPLATE" => Some("x${OTHER:y}".to_owned()),
            _ => None,
        };
        let text = "SERVICE_NAME: s\nSHOP_TEMPLATE: !env_var \"${SHOP_TEMPLATE}\"\n";
        let config = Config::from_yaml_str(text, &vars).unwrap();
        assert_eq!(config.extra["SHOP_TEMPLATE"], json!("x${OTHER:y}"));
    }

    /// `!env_var` with no value is Nameko's empty string (its scalar is `''`, no reference in
    /// it). Mutant: read as the text `null`.
    #[test]
    fn an_empty_env_var_tag_is_the_empty_string() {
        let config = yaml("SERVICE_NAME: s\nSHOP_EMPTY: !env_var\nSHOP_RAW: !raw_env_var\n");
        assert_eq!(config.extra["SHOP_EMPTY"], json!(""));
        assert_eq!(config.extra["SHOP_RAW"], json!(""));
    }

    /// An integer above `i64::MAX` stays that integer. Mutant: read as a float (rounded).
    #[test]
    fn an_integer_above_i64_max_is_kept_exact() {
        let config = yaml("SERVICE_NAME: s\nSHOP_BIG: 18446744073709551615\n");
        assert_eq!(config.extra["SHOP_BIG"], json!(u64::MAX));
        assert_eq!(config.get::<u64>("SHOP_BIG").unwrap().unwrap(), u64::MAX);
    }

    /// A mapping key may be a number or a boolean (as documented), read as its text.
    /// Mutants: a number key, or a boolean key, refused.
    #[test]
    fn number_and_boolean_mapping_keys_read_as_their_text() {
        let config = yaml("SERVICE_NAME: s\nSHOP_CODES: {1: one, 2.5: half, true: yes_}\n");
        assert_eq!(config.extra["SHOP_CODES"], json!({"1": "one", "2.5": "half", "true": "yes_"}));
    }

    // ------------------------------------------------------------------------------ substitution

    /// In TOML, references in the strings of an array are substituted too. Mutant: arrays
    /// skipped.
    #[test]
    fn references_in_a_toml_array_are_substituted() {
        let vars = |name: &str| (name == "SHOP_HOST").then(|| "h1".to_owned());
        let toml = "SERVICE_NAME = 's'\nSHOP_HOSTS = ['${SHOP_HOST}', '${SHOP_OTHER:h2}']\n";
        let config = Config::from_toml_str(toml, &vars).unwrap();
        assert_eq!(config.extra["SHOP_HOSTS"], json!(["h1", "h2"]));
    }

    /// An unclosed reference in a TOML table's entry names the entry `TABLE.KEY`, as from YAML.
    /// Mutant: named after the table only.
    #[test]
    fn an_unclosed_reference_in_a_toml_table_names_the_entry() {
        let toml = "SERVICE_NAME = 's'\n[DB]\nURL = '${DB_URL'\n";
        let error = Config::from_toml_str(toml, &no_env).unwrap_err();
        assert_eq!(error.key, "DB.URL", "{error}");
        let yaml = "SERVICE_NAME: s\nDB:\n  URL: '${DB_URL'\n";
        assert_eq!(Config::from_yaml_str(yaml, &no_env).unwrap_err().key, "DB.URL");
    }

    // ------------------------------------------------------------------------------ AMQP_URI

    fn with_uri(uri: &str) -> Result<(), ConfigError> {
        Config::new("s").with_amqp_uri(uri.to_owned()).validate()
    }

    /// AMQP's short string holds a 255-byte vhost. Mutant: `>=` for `>`, refused.
    #[test]
    fn a_vhost_of_255_bytes_is_accepted_and_256_refused() {
        let at_limit = format!("amqp://u:p@h/{}", "v".repeat(255));
        with_uri(&at_limit).unwrap();
        let over = format!("amqp://u:p@h/{}", "v".repeat(256));
        assert!(with_uri(&over).unwrap_err().reason.contains("vhost of 256 bytes"));
    }

    /// `frame_max=0` is AMQP's "no limit" (the code says so); 4096 is the minimum, allowed.
    /// Mutants: the range of refused values starting at 0, or ending at 4096 included.
    #[test]
    fn frame_max_zero_and_4096_are_accepted() {
        with_uri("amqp://u:p@h/?frame_max=0").unwrap();
        with_uri("amqp://u:p@h/?frame_max=4096").unwrap();
        let error = with_uri("amqp://u:p@h/?frame_max=4095").unwrap_err();
        assert!(error.reason.contains("below AMQP's minimum"), "{error}");
    }

    /// A number too large for its AMQP field says so (not "bad heartbeat"). Mutant: the
    /// overflow case dropped.
    #[test]
    fn an_option_too_large_for_amqp_says_so() {
        let error = with_uri("amqp://u:p@h/?heartbeat=70000").unwrap_err();
        assert!(error.reason.contains("heartbeat 70000 is too large for AMQP"), "{error}");
    }

    /// An unknown option named in two entries is warned about once. Mutant: named twice.
    #[test]
    fn an_unused_option_is_named_once() {
        let config = Config::new("s")
            .with_amqp_uri("amqp://u:p@a/?ssl=1,amqp://u:p@b/?ssl=1&x=2".to_owned());
        assert_eq!(config.unused_amqp_uri_options(), ["ssl", "x"]);
    }

    /// The hint about an unencoded delimiter in the password is given when one comes before the
    /// last `@`, whatever `@` comes before it. Mutant: the first `@` looked at.
    #[test]
    fn an_unencoded_slash_after_an_at_in_the_password_gets_the_hint() {
        let error = with_uri("amqp://u:p@[ss/w@h/").unwrap_err();
        assert!(error.reason.contains("written %2F"), "{error}");
    }

    // ------------------------------------------------------------------------------ masking

    /// A URI after `=`, `(`, `[`, `<`, `,`, `;`, or a quote begins a word: its password is
    /// masked even when it holds a space (which ends the `user:password@` word).
    /// Mutants: each of these characters dropped from those that begin a word.
    #[test]
    fn a_uri_after_punctuation_with_a_space_in_its_password_is_masked() {
        for before in ["=", "(", "[", "<", ",", ";", "\"", "'", "`", " "] {
            let reason = format!("cannot read url{before}amqp://svc:Zq7 kP2x9w@mq:5672/ here");
            let error = ConfigError::new("BROKER", "", &reason);
            assert!(!error.reason.contains("Zq7"), "after {before:?}: {}", error.reason);
            assert!(!error.reason.contains("kP2x9w"), "after {before:?}: {}", error.reason);
        }
    }

    /// A scheme with `+`, `.` or `-` (`amqp+ssl`, `x.y`) is a scheme. Mutant: `+` ends it.
    #[test]
    fn a_uri_with_a_plus_in_its_scheme_and_a_space_in_its_password_is_masked() {
        let error = ConfigError::new("BROKER", "", "see amqp+ssl://svc:Zq7 kP2x9w@mq/ now");
        assert!(!error.reason.contains("kP2x9w"), "{}", error.reason);
    }

    /// A secret of four characters named bare in a reason is masked (the code masks from 4 on).
    /// Mutant: `<=` for `<`, shown.
    #[test]
    fn a_four_character_secret_named_bare_is_masked() {
        let error = ConfigError::new("API_TOKEN", "k9Zq", "cannot use k9Zq here");
        assert_eq!(error.reason, "cannot use *** here");
    }

    /// A quoted secret ending in a backslash (escaped as `\\`) is masked, and what the reason
    /// says after it is kept. Mutant: an escaped backslash taken to escape the closing quote.
    #[test]
    fn a_quoted_secret_ending_in_a_backslash_keeps_the_rest_of_the_reason() {
        let text = "SERVICE_NAME: s\nAPI_TOKEN: 'ab\\'\n";
        let config = yaml(text);
        let error = config.get::<u64>("API_TOKEN").unwrap().unwrap_err();
        assert!(error.reason.contains("expected u64"), "{error}");
        assert!(!error.reason.contains("ab\\"), "{error}");
    }

    // ------------------------------------------------------------------------------ connecting

    /// `amqp://` without a port is 5672, and without a password logs in as `guest` (the
    /// transport reads the URI through the same code as validation). Mutants: the default ports
    /// of `amqp` and `amqps` swapped; an absent password read as empty.
    #[tokio::test]
    async fn an_amqp_uri_without_port_or_password_connects_to_5672_as_guest() {
        let Some(uri) = super::rabbitmq_uri() else { return };
        // the URIs below name the default port and user, so only the suite's default broker
        // answers them
        if uri != "amqp://guest:guest@127.0.0.1:5672/" {
            eprintln!("SKIPPED: needs RabbitMQ at 127.0.0.1:5672 with guest, the suite's is {uri}");
            return;
        }
        for uri in ["amqp://guest:guest@127.0.0.1/", "amqp://guest@127.0.0.1:5672/"] {
            let config = Config::new("s").with_amqp_uri(uri.to_owned());
            let connecting = micro_framework::transport::connect(&config);
            let connected =
                tokio::time::timeout(std::time::Duration::from_secs(10), connecting).await;
            match connected {
                Ok(Ok(transport)) => transport.close().await,
                Ok(Err(error)) => panic!("{uri}: {error}"),
                Err(_) => panic!("{uri}: not connected within 10 s"),
            }
        }
    }

    /// An IPv6 host is connected to without the brackets of the URI. Mutant: the brackets kept,
    /// `[::1]` never resolved.
    #[tokio::test]
    async fn an_ipv6_broker_address_in_brackets_is_connected_to() {
        let listener = match tokio::net::TcpListener::bind("[::1]:0").await {
            Ok(listener) => listener,
            Err(error) => {
                // skipped even under CI: a container may have no IPv6 loopback at all, which no
                // setting of the suite's can give it
                eprintln!("SKIPPED: no IPv6 loopback: {error}");
                return;
            }
        };
        let port = listener.local_addr().unwrap().port();
        let uri = format!("amqp://guest:guest@[::1]:{port}/?connection_timeout=3000");
        let config = Config::new("s").with_amqp_uri(uri);
        config.validate().unwrap();
        let connecting =
            tokio::spawn(
                async move { micro_framework::transport::connect(&config).await.map(drop) },
            );
        let accepted =
            tokio::time::timeout(std::time::Duration::from_secs(5), listener.accept()).await;
        connecting.abort();
        assert!(matches!(accepted, Ok(Ok(_))), "no connection came to [::1]:{port}: {accepted:?}");
    }

    /// A scheme-relative URI at the very start of a text (`//user:password@host`, as a value
    /// cut before its `:`) is a URI even when its password holds a space. Mutant: the start of
    /// the text not taken for a URI's start.
    #[test]
    fn a_scheme_relative_uri_at_the_start_with_a_space_in_its_password_is_masked() {
        let error = ConfigError::new("DATABASE_URL", "//app:Zq7 kP2x9w@db:5432/app", "is refused");
        assert!(!error.value.contains("Zq7") && !error.value.contains("kP2x9w"), "{}", error.value);
    }

    /// A password holding a space and then a scheme (`Zq7 amqp://kP2x9w`) is masked whole: the
    /// piece before the inner scheme has no `@`, so it runs on to the next. Mutant: each piece
    /// ended at the next scheme, both halves of the password shown.
    #[test]
    fn a_password_holding_a_space_and_a_scheme_is_masked_whole() {
        let error = ConfigError::new("BROKER", "", "cannot reach amqp://svc:Zq7 amqp://kP2x9w@mq/");
        assert_eq!(error.reason, "cannot reach amqp://svc:***@mq/");
    }

    /// A first word `//user:xyz/...` whose "port" is not digits holds a password: the text is
    /// masked. Mutant: any `host:anything/` taken for a whole URI without a password, the rest
    /// of the text left as it is.
    #[test]
    fn a_password_with_a_slash_and_a_space_is_masked() {
        let error = ConfigError::new("BROKER", "", "cannot reach amqp://svc:Zq7/kP2 x9w@mq/ now");
        assert!(!error.reason.contains("Zq7") && !error.reason.contains("x9w"), "{}", error.reason);
    }

    /// Nor is a first word taken for a whole URI without a password when it holds an `@` after
    /// a `/` (a password of digits, a `/`, an `@`, then a space). Mutant: the `@` of the word
    /// not looked at.
    #[test]
    fn a_password_of_digits_slash_at_and_space_is_masked() {
        let error = ConfigError::new("BROKER", "", "cannot reach amqp://svc:5678/Zq7@kP2 x9w@mq/");
        assert!(!error.reason.contains("Zq7") && !error.reason.contains("x9w"), "{}", error.reason);
    }

    /// A `//user:password@` is masked whatever precedes it (a typo before a scheme, `~amqp://`,
    /// `0postgres://`), a password holding a blank too: the scheme that begins with a digit or
    /// `~` was no scheme, the `user:pass` word had no `@`, and the whole password was shown.
    #[test]
    fn a_typo_before_the_scheme_does_not_show_a_password_with_a_space() {
        for value in ["~amqp://svc:Zq7 kP2x9w@mq/", "0postgres://app:Zq7 kP2x9w@db/app"] {
            let error = ConfigError::new("DATABASE_URL", value, "is refused");
            assert!(!error.value.contains("Zq7"), "{value}: {}", error.value);
            assert!(!error.value.contains("kP2x9w"), "{value}: {}", error.value);
            // and as the configuration shows it (`Debug`, `to_masked_map`, `show-config`)
            let mut config = Config::new("s");
            config.extra.insert("DATABASE_URL".to_owned(), json!(value));
            let shown = format!("{config:?} {}", json!(config.to_masked_map()));
            assert!(!shown.contains("kP2x9w"), "{value}: {shown}");
        }
    }
}

/// Two routes the naming rules give one queue are refused at start, naming both, before the
/// second declares or binds anything: a route named `on_paid.dlq` would consume route
/// `on_paid`'s dead letters, and its binding would send its events into them for good; two
/// singleton handlers of `c` from `a-b` and of `b-c` from `a` would share `evt-a-b-c`, each
/// taking the other's events. A `QueueListener` reading another route's dead letters on
/// purpose starts.
#[tokio::test]
async fn routes_the_naming_rules_give_one_queue_stop_the_start_naming_both() {
    use micro_framework::amqp::dependencies::Producer;
    use micro_framework::amqp::entrypoints::QueueListener;
    use micro_framework::amqp::naming::HandlerType;
    for uri in common::broker_uris() {
        let shop = unique("shop");
        let service = config(&uri, "claims");
        let queue = format!("evt-{shop}-paid--{}.on_paid", service.service_name);
        let routes = vec![
            Route::new(noop).name("on_paid").entrypoint(EventListener::new(&shop, "paid")),
            Route::new(noop).name("on_paid.dlq").entrypoint(EventListener::new(&shop, "paid")),
        ];
        let error = Runner::new(routes, service.clone()).spawn().await.unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "cannot start: route 'on_paid.dlq' and route 'on_paid' name the same queue \
                 \"{queue}.dlq\": one would consume the dead letters of the other as its own \
                 messages; rename one of them (Route::name)"
            ),
            "{uri}"
        );
        // the refused route bound nothing: an event goes to the first route's queue only
        let transport = micro_framework::transport::connect(&service).await.unwrap();
        let source = Config::new(shop.clone()).with_amqp_uri(uri.clone());
        Producer::new(transport.clone(), &source).dispatch("paid", &1).await.unwrap();
        assert_eq!(transport.queue_info(&queue).await.unwrap().message_count, 1, "{uri}");
        let dead_letters = transport.queue_info(&format!("{queue}.dlq")).await.unwrap();
        assert_eq!(dead_letters.message_count, 0, "{uri}");

        let (a_b, a) = (format!("{shop}-b"), shop.clone());
        let routes = vec![
            Route::new(noop)
                .name("first")
                .entrypoint(EventListener::new(&a_b, "c").handler_type(HandlerType::Singleton)),
            Route::new(noop)
                .name("second")
                .entrypoint(EventListener::new(&a, "b-c").handler_type(HandlerType::Singleton)),
        ];
        let error = Runner::new(routes, service.clone()).spawn().await.unwrap_err().to_string();
        let shared = format!("\"evt-{shop}-b-c\": both would consume it");
        assert!(error.contains("route 'second' and route 'first'"), "{error}");
        assert!(error.contains(&shared), "{error}");

        // a broadcast handler with an identifier, and a handler of the service's pool: both
        // are to get every event, in one queue each would get some
        let broadcast = HandlerType::Broadcast(Some("log".into()));
        let routes = vec![
            Route::new(noop)
                .name("audit")
                .entrypoint(EventListener::new(&shop, "paid").handler_type(broadcast)),
            Route::new(noop).name("audit-log").entrypoint(EventListener::new(&shop, "paid")),
        ];
        let error = Runner::new(routes, service.clone()).spawn().await.unwrap_err().to_string();
        let shared = format!("\"evt-{shop}-paid--{}.audit-log\"", service.service_name);
        assert!(error.contains("route 'audit-log' and route 'audit'"), "{error}");
        assert!(error.contains(&shared) && error.contains("route audit's paid events"), "{error}");

        // singleton handlers of one event share its queue only as declared alike
        let unreliable = EventListener::new(&shop, "paid")
            .handler_type(HandlerType::Singleton)
            .reliable_delivery(false);
        let routes = vec![
            Route::new(noop)
                .name("one")
                .entrypoint(EventListener::new(&shop, "paid").handler_type(HandlerType::Singleton)),
            Route::new(noop).name("two").entrypoint(unreliable),
        ];
        let error = Runner::new(routes, service.clone()).spawn().await.unwrap_err().to_string();
        assert!(error.contains("route 'two' and route 'one'"), "{error}");
        assert!(error.contains("without reliable delivery"), "{error}");

        let routes = vec![
            Route::new(noop).name("on_paid").entrypoint(EventListener::new(&shop, "paid")),
            Route::new(noop).name("replay").entrypoint(QueueListener::new(format!("{queue}.dlq"))),
        ];
        let started = Runner::new(routes, service.clone()).spawn().await.expect("it starts");
        started.stop().await.unwrap();
        transport.close().await;
        common::cleanup(&uri, &[shop]).await;
    }
}

/// A consumer refused while the service starts (its queue in exclusive use by another
/// connection) fails the start with the route's error: the start returned a service that
/// never consumed and was already stopping, logged `started` and answered ready.
#[tokio::test]
async fn a_consumer_refused_during_the_start_fails_the_start() {
    use micro_framework::amqp::entrypoints::QueueListener;
    use micro_framework::transport::{ConsumeOptions, QueueSpec};
    for uri in common::broker_uris() {
        let service = config(&uri, "exclusive");
        let jobs = unique("jobs");
        let other = micro_framework::transport::connect(&service).await.unwrap();
        other.declare_queue(&QueueSpec::durable(jobs.clone())).await.unwrap();
        let options = ConsumeOptions { exclusive: true, ..ConsumeOptions::default() };
        let exclusive = other.consume(&jobs, options).await.unwrap();
        let routes =
            vec![Route::new(noop).name("work").entrypoint(QueueListener::new(jobs.clone()))];
        let started = Runner::new(routes, service.clone()).spawn().await;
        let error = match started {
            Err(error) => error,
            Ok(running) => {
                let ready = running.is_ready();
                let _ = running.stop().await;
                panic!("{uri}: the start returned a service (ready: {ready})");
            }
        };
        let mut message = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            message += &format!(": {cause}");
            source = cause.source();
        }
        assert!(message.contains("route 'work' stopped"), "{uri}: {message}");
        assert!(message.contains("exclusive"), "{uri}: {message}");
        drop(exclusive);
        for queue in [jobs.clone(), format!("{jobs}.dlq")] {
            other.delete_queue(&queue).await.unwrap();
        }
        other.close().await;
    }
}
