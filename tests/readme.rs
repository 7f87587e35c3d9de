//! The README's Rust code compiles: each ```rust block of README.md stands, word for word,
//! in one of the modules below (with the context it leaves out), and this file is compiled by
//! `cargo test`. `every_readme_block_is_compiled_here` fails when a block changes without its
//! copy here.
#![cfg(all(feature = "http", feature = "websocket"))]
#![allow(dead_code, unused_variables, unused_imports, clippy::useless_vec)]

/// The README's first example: the seed's service.
#[rustfmt::skip]
mod seed {
    use micro_framework::prelude::*;
    use micro_framework::amqp::dependencies::Producer;
    use micro_framework::amqp::entrypoints::EventListener;
    use serde::Deserialize;
    use serde_json::{json, Value};

    #[derive(Deserialize)]
    struct Order { id: u64 }

    // async target: payload deserialized with serde, an event producer injected
    async fn test(Payload(order): Payload<Order>, producer: Producer) -> Result<(), micro_framework::Error> {
        producer.dispatch("event_name", &json!({ "id": order.id })).await
    }

    // sync target: runs on a worker thread
    fn test2(Payload(payload): Payload<Value>) {
        println!("Called after test function: {payload}");
    }

    // callback: same extractors, plus the failure
    fn test_failure(Payload(payload): Payload<Value>, failure: Failure) {
        eprintln!("{payload} failed: {failure}");
    }

    fn main() -> micro_framework::Result<()> {
        let config = Config::from_env()?;
        let routes = vec![
            CallbackRoute::new(test, test_failure)
                .entrypoint(EventListener::new("my_exchange", "my_routing_key")),
            Route::new(test2).entrypoint(EventListener::new("my_service", "event_name")),
        ];
        Runner::new(routes, config).start() // blocks until SIGINT/SIGTERM
    }
}

#[rustfmt::skip]
mod dependencies {
    use micro_framework::dependencies::{Dependency, Dep};
    use micro_framework::{async_trait, BoxError, Outcome, WorkerContext};

    #[derive(Clone)]
    struct Session { /* a database transaction, say */ }
    struct Database;

    #[async_trait]
    impl Dependency for Database {
        type Output = Session;
        async fn get(&self, _call: &WorkerContext) -> Result<Session, BoxError> { Ok(Session {}) }
        async fn after_call(&self, _session: &Session, outcome: &Outcome) {
            if outcome.is_ok() { /* commit */ } else { /* roll back */ }
        }
    }

    fn save(Dep(session): Dep<Session>) { /* ... */ }
}

#[rustfmt::skip]
mod translators {
    use micro_framework::prelude::*;
    use micro_framework::translators::JsonTranslator;
    use serde_json::Value;

    fn handle(Payload(payload): Payload<Value>) {}

    fn route() -> Route {
        Route::new(handle)
            .translator(JsonTranslator)
            .translator(|payload: Value| -> Result<Value, String> { Ok(payload["order"].clone()) })
    }
}

#[rustfmt::skip]
mod contexts {
    use micro_framework::prelude::*;

    fn start(quick_routes: Vec<Route>, slow_routes: Vec<Route>, config: Config) -> micro_framework::Result<()> {
        Runner::new(quick_routes, config)
            .context(RunnerContext::new(slow_routes).max_workers(2).worker_mode(WorkerMode::GreedyThread))
            .start()
    }
}

#[rustfmt::skip]
mod http {
    use micro_framework::prelude::*;
    use serde::Deserialize;
    use serde_json::{json, Value};

    fn routes() -> Vec<Route> {
        use micro_framework::http::{HttpEntrypoint, HttpRequest, Path, Query, Response};

        #[derive(Deserialize)]
        struct Terms { a: i64, b: i64 }

        fn hello(Path(name): Path<String>) -> Value { json!({ "hello": name }) }       // GET /hello/{name}
        fn sum(Payload(Terms { a, b }): Payload<Terms>) -> Value { json!({ "sum": a + b }) }  // POST /sum

        #[derive(Deserialize)]
        struct Page { page: Option<u32> }
        fn list(Query(Page { page }): Query<Page>, request: HttpRequest) -> Response {
            let agent = request.header("user-agent").unwrap_or("?").to_owned();
            Response::status(200).header("x-page", page.unwrap_or(1).to_string()).json(json!({ "agent": agent }))
        }

        let routes = vec![
            Route::new(hello).entrypoint(HttpEntrypoint::get("/hello/{name}")),
            Route::new(sum).entrypoint(HttpEntrypoint::post("/sum")),
            Route::new(list).entrypoint(HttpEntrypoint::get("/items")),
        ];
        routes
    }
}

#[rustfmt::skip]
mod cross_site {
    use micro_framework::prelude::*;
    use serde_json::{json, Value};

    fn sum(Payload(terms): Payload<Value>) -> Value { json!({ "sum": terms }) }

    fn declare() {
        use micro_framework::http::HttpEntrypoint;
        use micro_framework::translators::MessageTranslator;
        use micro_framework::{BoxError, Message};

        /// Refuses (`400`) a body not declared JSON: a page of another site cannot declare it without
        /// a CORS preflight, which the service never grants.
        struct JsonOnly;

        impl MessageTranslator for JsonOnly {
            fn translate(&self, payload: Value, message: &Message) -> Result<Value, BoxError> {
                let declared = message.properties.content_type.as_deref().unwrap_or_default();
                let media = declared.split(';').next().unwrap_or_default().trim();
                if media.eq_ignore_ascii_case("application/json") {
                    Ok(payload)
                } else {
                    Err(format!("expected content-type: application/json, got {declared:?}").into())
                }
            }
        }

        let route = Route::new(sum).entrypoint(HttpEntrypoint::post("/sum")).translator(JsonOnly);
    }
}

#[rustfmt::skip]
mod rpc {
    use micro_framework::prelude::*;
    use serde_json::json;
    use std::time::Duration;

    async fn example(config: Config) -> Result<(), Box<dyn std::error::Error>> {
        use micro_framework::amqp::entrypoints::RPCListener;
        use micro_framework::amqp::dependencies::RpcProxy;
        use micro_framework::amqp::rpc::{Args, Client, RpcError};

        #[derive(serde::Deserialize)]
        struct AddArgs { a: i64, b: i64 }

        // add(2, 40), add(a=2, b=40) and add(2, b=40) all bind; missing or extra arguments get
        // Nameko's IncorrectSignature.
        fn add(Args(AddArgs { a, b }): Args<AddArgs>) -> i64 { a + b }

        // A target calling another service (call-id stack and context headers flow along).
        async fn total(rpc: RpcProxy) -> Result<i64, RpcError> {
            rpc.service("math").timeout(Duration::from_secs(2)).call("add", (2, 40), ()).await
        }

        let routes = vec![Route::new(add).entrypoint(RPCListener::new())];   // method "add"

        // Outside a service (Nameko's ClusterRpcProxy); Client::from_env() reads the environment
        // as Config::from_env does, without SERVICE_NAME:
        let client = Client::connect(&config).await?;
        let sum: i64 = client.call("math", "add", (), json!({"a": 2, "b": 40})).await?;
        Ok(())
    }
}

#[rustfmt::skip]
mod rpc_micro_framework {
    use micro_framework::prelude::*;
    use micro_framework::amqp::dependencies::RpcProxy;
    use micro_framework::amqp::entrypoints::RPCListener;
    use micro_framework::amqp::rpc::{Args, RpcError};

    #[derive(serde::Deserialize)]
    struct AddArgs { a: i64, b: i64 }

    fn add(Args(AddArgs { a, b }): Args<AddArgs>) -> i64 { a + b }

    async fn example(rpc: RpcProxy) -> Result<i64, RpcError> {
        use micro_framework::config::Protocol;

        // serve `add` to Nameko callers, and the same function as `add_ufw` to micro-framework ones
        let routes = vec![
            Route::new(add).entrypoint(RPCListener::new()),
            Route::new(add).name("add_ufw").entrypoint(RPCListener::new().protocol(Protocol::MicroFramework)),
        ];

        // call a Python micro-framework service
        let billing = rpc.service("billing").protocol(Protocol::MicroFramework);
        let targets = billing.list_targets().await?;          // __list_targets__
        let total: i64 = billing.call("total", (2, 40), ()).await?;
        Ok(total)
    }
}

#[rustfmt::skip]
mod websocket {
    use micro_framework::prelude::*;
    use serde_json::json;
    use std::time::Duration;

    #[derive(serde::Deserialize)]
    struct AddArgs { a: i64, b: i64 }

    async fn example() -> Result<(), Box<dyn std::error::Error>> {
        use micro_framework::amqp::rpc::Args;
        use micro_framework::websocket::{WebSocketEntrypoint, WebSocketRpcClient, WebSocketRpcError};

        fn add(Args(AddArgs { a, b }): Args<AddArgs>) -> i64 { a + b }

        // A target calling another WebSocket service: the client is a dependency.
        async fn total(Dep(math): Dep<WebSocketRpcClient>) -> Result<i64, WebSocketRpcError> {
            math.call("add", (2, 40), ()).await
        }

        let routes = vec![
            Route::new(add).entrypoint(WebSocketEntrypoint::new()),       // command "add"
            Route::new(total).entrypoint(WebSocketEntrypoint::new())
                .dependency(WebSocketRpcClient::new("math.internal", 8765)),
        ];

        // Standalone:
        let client = WebSocketRpcClient::new("127.0.0.1", 8765).timeout(Duration::from_secs(5));
        let sum: i64 = client.call("add", [2], json!({"b": 40})).await?;
        Ok(())
    }
}

#[rustfmt::skip]
mod retries {
    use micro_framework::amqp::entrypoints::EventListener;
    use micro_framework::prelude::*;
    use std::time::Duration;

    mod tasks {
        use micro_framework::prelude::*;
        use serde_json::Value;
        pub fn test(Payload(payload): Payload<Value>) {}
        pub fn test_failure(Payload(payload): Payload<Value>, failure: Failure) {}
    }

    fn charge() -> Result<(), std::io::Error> {
        Ok(())
    }

    fn routes() -> Vec<Route> {
        use micro_framework::retry::{AsyncBackOff, BackOff, BackOffData, Interval};

        let seed = CallbackRoute::new(tasks::test, tasks::test_failure)
            .entrypoint(EventListener::new("my_exchange", "my_routing_key"))
            .backoff(AsyncBackOff::new(5, Duration::from_millis(10_000)));  // the seed's example

        let io_only = Route::new(charge).backoff(
            AsyncBackOff::new(8, Duration::from_millis(100))
                .interval(Interval::exponential(Duration::from_millis(100), 2.0, Duration::from_secs(60)))
                .jitter(0.2)
                .retry_on::<std::io::Error>(),     // only I/O errors, anywhere in the source chain
        );
        vec![seed, io_only]
    }
}

#[rustfmt::skip]
mod testing {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use micro_framework::dependencies::Shared;
    use micro_framework::retry::AsyncBackOff;

    use micro_framework::prelude::*;
    use micro_framework::amqp::dependencies::{Producer, RpcProxy};
    use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
    use micro_framework::amqp::rpc::Args;
    use micro_framework::testing::*;
    use serde_json::{json, Value};

    async fn on_paid(Payload(order): Payload<Value>, rpc: RpcProxy, events: Producer) -> Result<i64, micro_framework::BoxError> {
        let total: i64 = rpc.service("prices").call("quote", [order["id"].clone()], ()).await?;
        events.dispatch("order_priced", &json!({"id": order["id"], "total": total})).await?;
        Ok(total)
    }

    fn double(Args((n,)): Args<(i64,)>) -> i64 { n * 2 }

    fn routes() -> Vec<Route> {
        vec![
            Route::new(on_paid).entrypoint(EventListener::new("shop", "paid")),
            Route::new(double).entrypoint(RPCListener::new()),
        ]
    }

    #[tokio::test]
    async fn a_paid_order_is_priced_and_announced() {
        let (events, rpc) = (FakeProducer::new(), FakeRpc::new());
        rpc.returns("prices", "quote", 42);
        let runner = Runner::new(routes(), test_config("orders"))
            .dependency(events.clone())
            .dependency(rpc.clone());
        let service = TestService::start_runner(runner).await.unwrap();

        let total: i64 = service.hook("on_paid").unwrap().event(&json!({"id": 7})).await.unwrap();
        assert_eq!(total, 42);
        rpc.assert_called("prices", "quote");
        events.assert_dispatched("order_priced", &json!({"id": 7, "total": 42}));

        let doubled: i64 = service.hook("double").unwrap().rpc([21], ()).await.unwrap();
        assert_eq!(doubled, 42);
        let wrong = service.hook("double").unwrap().event::<Value>(&json!(1)).await.unwrap_err();
        assert!(wrong.to_string().contains("RPCListener"), "{wrong}");
        service.stop().await.unwrap();
    }

    #[tokio::test]
    async fn an_event_from_the_shop_is_handled() {
        let rpc = FakeRpc::new();
        rpc.returns("prices", "quote", 5);
        let runner = Runner::new(routes(), test_config("orders")).dependency(rpc.clone());
        let service = TestService::start_runner(runner).await.unwrap();

        let second = service.waiter("on_paid").unwrap().matching(|order| order["id"] == 2);
        service.dispatch("shop", "paid", &json!({"id": 1})).await.unwrap();   // as service "shop"
        service.dispatch("shop", "paid", &json!({"id": 2})).await.unwrap();
        let call = second.wait().await.unwrap();
        assert_eq!(call.result::<i64>().unwrap(), 5);

        // the producer was not faked: the events went to the broker
        service.wait_for_route("on_paid", 2).await.unwrap();   // settled count
        assert_eq!(service.queue_len("evt-shop-paid--orders.on_paid.dlq").await.unwrap(), 0);
        service.stop().await.unwrap();
    }

    #[tokio::test]
    async fn only_the_rpc_method_listens() {
        let service = TestService::start_only(routes(), test_config("orders"), &["double"]).await.unwrap();
        service.dispatch("shop", "paid", &json!({"id": 1})).await.unwrap();
        // nothing consumes for on_paid: the event went nowhere, and its queue does not exist
        assert!(service.queue_len("evt-shop-paid--orders.on_paid").await.is_err());
        service.stop().await.unwrap();

        let rpc = FakeRpc::new();
        rpc.returns("prices", "quote", 9);
        let route = Route::new(on_paid).entrypoint(EventListener::new("shop", "paid"));
        let total: i64 = worker(route)
            .dependency(rpc.clone())
            .dependency(FakeProducer::new())
            .event(&json!({"id": 3}))
            .await
            .unwrap();
        assert_eq!(total, 9);
    }

    type Attempts = Arc<Mutex<Vec<tokio::time::Instant>>>;

    fn charge(Dep(attempts): Dep<Attempts>) -> Result<(), String> {
        attempts.lock().unwrap().push(tokio::time::Instant::now());
        Err("the bank is down".into())
    }

    #[tokio::test(start_paused = true)]
    async fn charges_are_retried_five_times_ten_seconds_apart() {
        let attempts = Attempts::default();
        let route = Route::new(charge)
            .entrypoint(EventListener::new("shop", "paid"))
            .backoff(AsyncBackOff::new(5, Duration::from_secs(10)))
            .dependency(Shared(attempts.clone()));
        let service = TestService::start(vec![route], memory_test_config("billing")).await.unwrap();
        service.dispatch("shop", "paid", "order 1").await.unwrap();
        // six attempts: fifty seconds of the test clock, milliseconds of real time
        service.wait_for_route_within("charge", 6, Duration::from_secs(60)).await.unwrap();
        let attempts = attempts.lock().unwrap().clone();
        for pair in attempts.windows(2) {
            assert_eq!((pair[1] - pair[0]).as_secs(), 10);
        }
        service.stop().await.unwrap();
    }

    fn worker_pid() -> u32 { std::process::id() }

    #[tokio::test]
    async fn calls_run_in_worker_processes() {
        // everything up to `start` also runs in each worker process: build the same routes
        let routes = vec![Route::new(worker_pid).entrypoint(RPCListener::new())];
        let config = test_config("pids").with_worker_mode(WorkerMode::Process).with_max_workers(2);
        let service = TestService::start(routes, config).await.unwrap();
        let pid: u32 = service.hook("worker_pid").unwrap().rpc((), ()).await.unwrap();
        assert_ne!(pid, std::process::id());
        service.stop().await.unwrap();
    }

}

/// Lines with their indentation and trailing blanks removed, blank lines dropped.
fn normalized(text: &str) -> String {
    text.lines().map(str::trim).filter(|line| !line.is_empty()).collect::<Vec<_>>().join("\n")
}

#[test]
fn every_readme_block_is_compiled_here() {
    let readme = include_str!("../README.md");
    let here = normalized(include_str!("readme.rs"));
    let mut blocks = 0;
    let mut rest = readme;
    while let Some(start) = rest.find("```rust\n") {
        let body = &rest[start + "```rust\n".len()..];
        let end = body.find("```").expect("every ```rust block is closed");
        let block = normalized(&body[..end]);
        assert!(
            here.contains(&block),
            "this README block has no compiled copy in tests/readme.rs:\n{block}"
        );
        blocks += 1;
        rest = &body[end..];
    }
    assert_eq!(blocks, 16, "the README's ```rust blocks, all compiled above");
}

#[test]
fn the_cargo_features_table_lists_every_default_feature() {
    let manifest = include_str!("../Cargo.toml");
    let default = manifest
        .lines()
        .find_map(|line| line.strip_prefix("default = ["))
        .expect("Cargo.toml has a default feature list");
    let features: Vec<&str> =
        default.trim_end_matches(']').split(',').map(|f| f.trim().trim_matches('"')).collect();
    let readme = include_str!("../README.md");
    let table = readme.split("### Cargo features").nth(1).expect("the README's features section");
    let table = &table[..table.find("\n## ").unwrap_or(table.len())];
    for feature in features {
        let row = format!("| `{feature}` |");
        assert!(table.contains(&row), "the README's Cargo features table lacks {row}");
    }
}

/// A version as three numbers, so that 1.89 sorts after 1.9 and equals 1.89.0.
fn version_of(text: &str) -> [u64; 3] {
    let mut numbers = [0; 3];
    for (number, part) in numbers.iter_mut().zip(text.split('.')) {
        *number = part.parse().expect("a version of numbers");
    }
    numbers
}

/// The `rust-version` every manifest of the workspace declares is one that each locked
/// dependency (built for this host, dev-dependencies included) accepts, and the one the
/// README names: a dependency updated to need a newer compiler fails here, not on a user's
/// older toolchain.
#[test]
fn the_declared_rust_version_covers_every_locked_dependency() {
    let rustc = std::process::Command::new("rustc").arg("-vV").output().expect("rustc runs");
    let host = String::from_utf8_lossy(&rustc.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("host: ").map(str::to_owned))
        .expect("rustc -vV names its host");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--offline", "--filter-platform"])
        .arg(&host)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let members: Vec<&str> = metadata["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap())
        .collect();
    let resolved: Vec<&str> = metadata["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|node| node["id"].as_str().unwrap())
        .collect();
    let packages = metadata["packages"].as_array().unwrap();
    let declared: Vec<&str> = packages
        .iter()
        .filter(|package| members.contains(&package["id"].as_str().unwrap()))
        .map(|package| package["rust_version"].as_str().expect("each member declares one"))
        .collect();
    assert_eq!(declared.len(), members.len());
    assert!(declared.windows(2).all(|pair| pair[0] == pair[1]), "one version: {declared:?}");
    let declared = declared[0];
    for package in packages.iter().filter(|p| resolved.contains(&p["id"].as_str().unwrap())) {
        if let Some(needed) = package["rust_version"].as_str() {
            assert!(
                version_of(needed) <= version_of(declared),
                "{} {} needs Rust {needed}, over the declared {declared}",
                package["name"],
                package["version"]
            );
        }
    }
    let named = format!("Rust {} or newer", declared.trim_end_matches(".0"));
    assert!(include_str!("../README.md").contains(&named), "the README says {named:?}");
}
