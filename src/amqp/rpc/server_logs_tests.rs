//! The route an RPC server's failure is logged under: the route that took the request, or
//! none when no route took it. Such a request was logged under the service's first route,
//! whose operators would look for a fault in it.

use crate::amqp::entrypoints::RPCListener;
use crate::amqp::rpc::service_proxy::ServiceProxy;
use crate::amqp::rpc::{Args, Client, RpcError};
use crate::config::{Config, Protocol};
use crate::data::captured_logs::Captured;
use crate::{Route, Runner};

fn add(Args((a, b)): Args<(i64, i64)>) -> i64 {
    a + b
}

/// What a service of one RPC route, `add`, under `protocol` logs at `WARN` while `call`
/// makes its calls through a proxy of it.
async fn logged_while<F: std::future::Future<Output = ()>>(
    protocol: Protocol,
    call: impl FnOnce(ServiceProxy) -> F,
) -> String {
    let logs = Captured::start(tracing::Level::WARN);
    let uri = format!("memory://server-logs-{}", uuid::Uuid::new_v4());
    let config = Config::new("logged").with_amqp_uri(uri).with_protocol(protocol);
    let routes = vec![Route::new(add).entrypoint(RPCListener::new())];
    let service = Runner::new(routes, config.clone()).spawn().await.unwrap();
    let client = Client::connect(&config).await.unwrap();
    call(client.service("logged").protocol(protocol)).await;
    client.close().await;
    service.stop().await.unwrap();
    logs.logged()
}

/// The line of `logged` holding `text`.
fn line(logged: &str, text: &str) -> String {
    let found = logged.lines().find(|line| line.contains(text));
    found.unwrap_or_else(|| panic!("no {text:?} in:\n{logged}")).to_owned()
}

/// A Nameko-wire request for a method the service does not have is answered
/// `MethodNotFound` and logged under no route; a known method's failure keeps its route.
#[tokio::test]
async fn an_unknown_method_is_logged_under_no_route() {
    let logged = logged_while(Protocol::Nameko, |proxy| async move {
        let missing = proxy.call::<i64>("nope", (), ()).await;
        assert!(matches!(missing, Err(RpcError::MethodNotFound(_))), "{missing:?}");
        assert!(proxy.call::<i64>("add", ("one", 2), ()).await.is_err());
    })
    .await;
    let unknown = line(&logged, "RPC nope failed: MethodNotFound");
    assert!(unknown.contains(r#"route="""#) && !unknown.contains("add"), "{unknown}");
    assert!(line(&logged, "RPC add failed").contains(r#"route="add""#), "{logged}");
}

/// A failed built-in command of the micro-framework wire is logged under no route; a
/// target's failure keeps its route.
#[tokio::test]
async fn a_builtin_commands_failure_is_logged_under_no_route() {
    let logged = logged_while(Protocol::MicroFramework, |proxy| async move {
        let missing = proxy.call::<serde_json::Value>("__get_target__", ["nope"], ()).await;
        assert!(missing.is_err(), "{missing:?}");
        assert!(proxy.call::<i64>("add", ("one", 2), ()).await.is_err());
    })
    .await;
    let builtin = line(&logged, "nope");
    assert!(builtin.contains(r#"route="""#) && !builtin.contains("add"), "{builtin}");
    assert!(line(&logged, "RPC logged.add failed").contains(r#"route="add""#), "{logged}");
}
