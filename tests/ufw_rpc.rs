//! RPC in the Python micro-framework's wire format (`PROTOCOL=micro_framework`, or per
//! listener and proxy) on every broker of `common::broker_uris()`.

mod common;

use common::targets::{add, echo};

use std::time::Duration;

use bytes::Bytes;
use common::ufw_caller::UfwCaller;
use common::{broker_uris, config};
use micro_framework::amqp::entrypoints::RPCListener;
use micro_framework::amqp::rpc::{Args, Client, RpcError};
use micro_framework::config::Protocol;
use micro_framework::prelude::*;
use micro_framework::testing::TestService;
use serde_json::{json, Value};

fn fail(Args(()): Args<()>) -> Result<(), std::io::Error> {
    Err(std::io::Error::other("boom"))
}

async fn slow(Args((millis,)): Args<(u64,)>) -> u64 {
    tokio::time::sleep(Duration::from_millis(millis)).await;
    millis
}

fn routes(listener: impl Fn() -> RPCListener) -> Vec<Route> {
    vec![
        Route::new(add).entrypoint(listener()),
        Route::new(echo).entrypoint(listener()),
        Route::new(fail).entrypoint(listener()),
        Route::new(slow).entrypoint(listener()),
    ]
}

async fn start(uri: &str) -> (TestService, String) {
    let config = config(uri, "ufw_math")
        .with_protocol(Protocol::MicroFramework)
        .with_max_message_size(1024 * 1024);
    let name = config.service_name.clone();
    (TestService::start(routes(RPCListener::new), config).await.unwrap(), name)
}

fn ufw_client_config(uri: &str) -> micro_framework::Config {
    config(uri, "caller").with_protocol(Protocol::MicroFramework)
}

#[tokio::test]
async fn targets_answer_micro_framework_callers() {
    for uri in broker_uris() {
        let (service, math) = start(&uri).await;
        let client = Client::connect(&ufw_client_config(&uri)).await.unwrap();

        assert_eq!(client.call::<i64>(&math, "add", [1, 2], ()).await.unwrap(), 3);
        assert_eq!(client.call::<i64>(&math, "add", [1], json!({"b": 4})).await.unwrap(), 5);
        let echoed: Value = client.call(&math, "echo", [json!({"k": [1, "é"]})], ()).await.unwrap();
        assert_eq!(echoed, json!({"k": [1, "é"]}));

        let failed = client.call::<Value>(&math, "fail", (), ()).await.unwrap_err();
        assert!(
            matches!(&failed, RpcError::RemoteError { exc_type, value, exc_path, .. }
                if exc_type == "Error" && value == "boom" && exc_path == "std.io.error.Error"),
            "{failed:?}"
        );
        // arguments that do not fit: Python's TypeError
        let misfit = client.call::<Value>(&math, "add", json!(["x", 1]), ()).await.unwrap_err();
        assert!(
            matches!(&misfit, RpcError::RemoteError { exc_type, exc_path, .. }
                if exc_type == "TypeError" && exc_path == "builtins.TypeError"),
            "{misfit:?}"
        );
        // one queue per target: an unknown target is unroutable
        let unknown = client.call::<Value>(&math, "nope", (), ()).await.unwrap_err();
        assert!(matches!(&unknown, RpcError::MethodNotFound(_)), "{unknown:?}");

        // the built-in commands
        let proxy = client.service(&math);
        let mut targets: Vec<String> = proxy
            .list_targets()
            .await
            .unwrap()
            .iter()
            .map(|detail| detail["target"].as_str().unwrap().to_owned())
            .collect();
        targets.sort();
        assert_eq!(targets, ["add", "echo", "fail", "slow"]);
        let detail: Value = proxy.call("__get_target__", ["echo"], ()).await.unwrap();
        assert_eq!(detail["target"], "echo");
        let missing = proxy.call::<Value>("__get_target__", ["nope"], ()).await.unwrap_err();
        assert!(
            matches!(&missing, RpcError::RemoteError { exc_type, .. } if exc_type == "KeyError"),
            "{missing:?}"
        );

        // timeouts
        let quick = proxy.clone().timeout(Duration::from_millis(100));
        let timed_out = quick.call::<u64>("slow", [600], ()).await.unwrap_err();
        assert!(matches!(timed_out, RpcError::Timeout { .. }), "{timed_out:?}");
        assert_eq!(proxy.call::<u64>("slow", [10], ()).await.unwrap(), 10);

        // the topology is the Python original's: one queue per target and the built-ins' queue
        for target in ["add", "echo", "fail", "slow", "broadcast"] {
            assert_eq!(service.queue_len(&format!("rpc-{math}-{target}")).await.unwrap(), 0);
        }
        client.close().await;
        service.stop().await.unwrap();
        common::cleanup(&uri, &[math]).await;
    }
}

/// `list_targets` is a micro-framework command: under the Nameko protocol it fails at once
/// with `MethodNotFound` naming the protocol to use, sending no request.
#[tokio::test]
async fn list_targets_under_the_nameko_protocol_says_to_switch_protocol() {
    for uri in broker_uris() {
        let client = Client::connect(&config(&uri, "lister")).await.unwrap();
        let listed = client.service(common::unique("nobody")).list_targets().await;
        assert!(
            matches!(&listed, Err(RpcError::MethodNotFound(reason))
                if reason.contains("Protocol::MicroFramework")),
            "{uri}: {listed:?}"
        );
        client.close().await;
    }
}

#[tokio::test]
async fn one_service_answers_both_protocols() {
    for uri in broker_uris() {
        let config = config(&uri, "both");
        let both = config.service_name.clone();
        let routes = vec![
            Route::new(add).entrypoint(RPCListener::new()),
            Route::new(add)
                .name("add_ufw")
                .entrypoint(RPCListener::new().protocol(Protocol::MicroFramework)),
        ];
        let service = TestService::start(routes, config).await.unwrap();
        let client = Client::connect(&common::config(&uri, "caller")).await.unwrap();
        assert_eq!(client.call::<i64>(&both, "add", [1, 2], ()).await.unwrap(), 3);
        let ufw = client.service(&both).protocol(Protocol::MicroFramework);
        assert_eq!(ufw.call::<i64>("add_ufw", [3, 4], ()).await.unwrap(), 7);
        // each protocol serves only its own routes
        let across = ufw.call::<i64>("add", [1, 2], ()).await.unwrap_err();
        assert!(matches!(across, RpcError::MethodNotFound(_)), "{across:?}");
        let across = client.call::<i64>(&both, "add_ufw", [1, 2], ()).await.unwrap_err();
        assert!(matches!(across, RpcError::MethodNotFound(_)), "{across:?}");
        client.close().await;
        service.stop().await.unwrap();
        common::cleanup(&uri, &[both]).await;
    }
}

#[tokio::test]
async fn bad_requests_get_python_errors_and_are_acked() {
    for uri in broker_uris() {
        let (service, math) = start(&uri).await;
        let raw = UfwCaller::new(service.transport(), &math).await;
        let python_request = |body: Value| Bytes::from(body.to_string());

        // what the Python original's client sends, and the same JSON-encoded twice
        let request = json!({"command": "add", "command_args": [1], "command_kwargs": {"b": 2}});
        let reply = raw.request("add", python_request(request.clone())).await;
        assert_eq!(reply, json!({"data": 3, "exception": null}));
        let twice = Value::String(request.to_string());
        assert_eq!(raw.request("add", python_request(twice)).await["data"], 3);

        let malformed: [&[u8]; 5] = [
            b"{oops",
            b"[1]",
            br#"{"command": 1}"#,
            br#"{"command": "add", "command_args": "ab"}"#,
            br#""{not json""#,
        ];
        for body in malformed {
            let reply = raw.request("add", Bytes::copy_from_slice(body)).await;
            assert_eq!(reply["data"], Value::Null);
            assert_eq!(reply["exception"]["exception"], "RPCMalformedMessage", "{reply}");
            assert_eq!(reply["exception"]["module"], "micro_framework.exceptions");
        }
        let oversized = Bytes::from(vec![b' '; 2 * 1024 * 1024]);
        let reply = raw.request("add", oversized).await;
        assert_eq!(reply["exception"]["exception"], "RPCMalformedMessage", "{reply}");
        let reason = reply["exception"]["message"].as_str().unwrap();
        assert!(reason.contains("MAX_MESSAGE_SIZE"), "{reason}");
        // received, so not read: "not sent" would send the caller looking at its own side
        assert!(reason.ends_with("not read"), "{reason}");

        // a result whose reply (encoded twice) would exceed MAX_MESSAGE_SIZE: an error instead
        let empties = vec![""; 250_000];
        let big = json!({"command": "echo", "command_args": [empties], "command_kwargs": {}});
        let reply = raw.request("echo", python_request(big)).await;
        assert_eq!(reply["exception"]["exception"], "TypeError", "{}", reply["exception"]);
        let reason = reply["exception"]["message"].as_str().unwrap();
        assert!(reason.contains("exceeds MAX_MESSAGE_SIZE"), "{reason}");

        let unknown = json!({"command": "nope", "command_args": [], "command_kwargs": {}});
        let reply = raw.request("add", python_request(unknown)).await;
        assert_eq!(reply["exception"]["exception"], "RPCTargetDoesNotExist", "{reply}");
        let misfit = json!({"command": "add", "command_args": ["x"], "command_kwargs": {}});
        let reply = raw.request("add", python_request(misfit)).await;
        assert_eq!(reply["exception"]["exception"], "TypeError", "{reply}");

        // nothing dead-lettered, nothing left in the queues
        for target in ["add", "echo", "broadcast"] {
            assert_eq!(service.queue_len(&format!("rpc-{math}-{target}")).await.unwrap(), 0);
        }
        raw.close().await;
        service.stop().await.unwrap();
        common::cleanup(&uri, &[math]).await;
    }
}

/// As the Python original's server, a request without a `correlation_id` (or an empty one)
/// is run and acked with no reply: its caller could not tell whose reply it is.
#[tokio::test]
async fn a_request_without_a_correlation_id_runs_and_is_acked_without_a_reply() {
    for uri in broker_uris() {
        let (service, math) = start(&uri).await;
        let raw = UfwCaller::new(service.transport(), &math).await;
        let request = json!({"command": "echo", "command_args": [1], "command_kwargs": {}});
        // none, or an empty one, which the Python server takes for none
        for (sent, correlation_id) in [(1, None), (2, Some(String::new()))] {
            let body = Bytes::from(request.to_string());
            let id = correlation_id.clone();
            raw.send_with("echo", body, |properties| properties.correlation_id = id).await;
            // a route counts a request settled once its reply, if any, is confirmed
            service.wait_for_route("echo", sent).await.unwrap();
            let replies = service.queue_len(raw.reply_queue()).await.unwrap();
            assert_eq!(replies, 0, "no reply to {correlation_id:?} on {uri}");
        }
        assert_eq!(service.queue_len(&format!("rpc-{math}-echo")).await.unwrap(), 0, "acked");
        // the same caller, with a correlation id, is answered
        let reply = raw.request("echo", Bytes::from(request.to_string())).await;
        assert_eq!(reply["data"], json!(1), "{reply}");
        raw.close().await;
        service.stop().await.unwrap();
        common::cleanup(&uri, &[math]).await;
    }
}

#[tokio::test]
async fn requests_are_read_as_json_whatever_their_content_type() {
    for uri in broker_uris() {
        let (service, math) = start(&uri).await;
        let raw = UfwCaller::new(service.transport(), &math).await;
        let request = br#"{"command": "add", "command_args": [1], "command_kwargs": {"b": 2}}"#;
        // the Python original's server reads any of these (kombu decodes text and raw bytes,
        // its RPC manager parses the string as JSON)
        for content_type in [Some("text/plain"), Some("application/octet-stream"), None] {
            let reply = raw
                .request_with("add", Bytes::from_static(request), |properties| {
                    properties.content_type = content_type.map(str::to_owned);
                })
                .await;
            assert_eq!(reply, json!({"data": 3, "exception": null}), "{content_type:?}");
        }
        raw.close().await;
        service.stop().await.unwrap();
        common::cleanup(&uri, &[math]).await;
    }
}

/// A malformed request to the built-ins' queue is answered `RPCMalformedMessage` and counted
/// under no route: it was counted as a failure of the service's first target (its stats, the
/// status page's failures), which had nothing to do with it. One to a target still counts
/// for that target.
#[tokio::test]
async fn a_malformed_request_to_the_builtins_counts_for_no_target() {
    for uri in broker_uris() {
        let (service, math) = start(&uri).await;
        let raw = UfwCaller::new(service.transport(), &math).await;
        let reply = raw.request("_broadcast.__list_targets__", Bytes::from_static(b"{oops")).await;
        assert_eq!(reply["exception"]["exception"], "RPCMalformedMessage", "{reply}");
        let reply = raw.request("add", Bytes::from_static(b"{oops")).await;
        assert_eq!(reply["exception"]["exception"], "RPCMalformedMessage", "{reply}");
        service.wait_for_route("add", 1).await.unwrap();
        // a request is settled just after its reply is sent: let a second count come, if any
        tokio::time::sleep(Duration::from_millis(200)).await;
        for (route, expected) in [("add", 1), ("echo", 0), ("fail", 0), ("slow", 0)] {
            let failed = service.route(route).unwrap().stats().failed_count();
            assert_eq!(failed, expected, "{uri}: failures counted for route {route}");
        }
        service.stop().await.unwrap();
        common::cleanup(&uri, &[math]).await;
    }
}

/// A request to the built-ins' queue that came back unsettled past `MAX_REDELIVERIES` (as if
/// it crashed the service) is refused with an answer, counted under no route: not as a
/// failure of the service's first target.
#[tokio::test]
async fn a_request_to_the_builtins_refused_as_a_crash_counts_for_no_target() {
    for uri in broker_uris() {
        let config = config(&uri, "ufw_refused")
            .with_protocol(Protocol::MicroFramework)
            .with_max_redeliveries(0);
        let math = config.service_name.clone();
        let transport = micro_framework::transport::connect(&config).await.unwrap();
        // the service declares its queues, then stops: they stay (durable)
        let service = TestService::start(routes(RPCListener::new), config.clone()).await.unwrap();
        service.stop().await.unwrap();
        let raw = UfwCaller::new(&transport, &math).await;
        raw.send_with("_broadcast.__list_targets__", Bytes::from_static(b"{oops"), |_| {}).await;
        let queue = format!("rpc-{math}-broadcast");
        // back to its queue unsettled, redelivered: a crash, for the next consumer
        common::queues::put_back_redelivered(&transport, &queue).await;

        let service = TestService::start(routes(RPCListener::new), config).await.unwrap();
        let reply = raw.reply().await;
        assert!(reply["exception"].is_object(), "{uri}: {reply}");
        assert!(reply.to_string().contains("MAX_REDELIVERIES=0"), "{uri}: {reply}");
        // a request is settled just after its reply is sent: let a count come, if any
        tokio::time::sleep(Duration::from_millis(200)).await;
        for route in ["add", "echo", "fail", "slow"] {
            let failed = service.route(route).unwrap().stats().failed_count();
            assert_eq!(failed, 0, "{uri}: failures counted for route {route}");
        }
        service.stop().await.unwrap();
        raw.close().await;
        transport.close().await;
        common::cleanup(&uri, &[math]).await;
    }
}

/// A target's command that comes by the built-ins' queue (`{service}._broadcast.add`, which
/// takes any command, as the Python original's does) is run, counted and logged under the
/// target: its failure was logged with an empty route.
#[tokio::test]
async fn a_targets_failure_by_the_builtins_queue_is_logged_under_its_route() {
    common::logs::capture(tracing::Level::WARN);
    let uri = format!("memory://{}", common::unique("ufw_logs"));
    let (service, math) = start(&uri).await;
    let raw = UfwCaller::new(service.transport(), &math).await;
    let body = br#"{"command": "add", "command_args": ["one", 2], "command_kwargs": {}}"#;
    let reply = raw.request("_broadcast.add", Bytes::from_static(body)).await;
    assert!(reply["exception"].is_object(), "the call failed: {reply}");
    service.wait_for_route("add", 1).await.unwrap();
    assert_eq!(service.route("add").unwrap().stats().failed_count(), 1);
    service.stop().await.unwrap();
    let logged = common::logs::logged();
    let failed = format!("RPC {math}._broadcast.add failed");
    let line = logged.lines().find(|line| line.contains(&failed));
    let line = line.unwrap_or_else(|| panic!("no failure logged in:\n{logged}"));
    assert!(line.contains(r#"route="add""#), "logged under its route: {line}");
}
