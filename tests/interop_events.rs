//! Events between this framework and the real Python packages over RabbitMQ: Nameko 2.14.1
//! and micro-framework 2.1.1, run as subprocess peers (`tests/interop/*.py`, see the README
//! there). The venv comes from `.ci/python-env.sh`; its interpreter is found through
//! `MF_INTEROP_PYTHON_NAMEKO` / `MF_INTEROP_PYTHON_UFW`, else `.venv*/bin/python`.
//! Without RabbitMQ or the venv the tests fail under `CI=true` and are skipped loudly
//! otherwise.

mod common;

use common::peer::*;
use common::unique;

use std::sync::Arc;

use common::{config, Probe};
use micro_framework::amqp::dependencies::Producer;
use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::config::Protocol;
use micro_framework::dependencies::Shared;
use micro_framework::prelude::*;
use micro_framework::testing::TestService;
use micro_framework::transport::{
    HeaderValue, Headers, OutgoingMessage, Properties, PublishOptions,
};
use micro_framework::CallContext;
use serde_json::{json, Value};

/// Delete what a test declared on RabbitMQ (best effort: a test's own result matters more):
/// our listeners' work `queues` with their `.dlq`, and `exchanges`.
async fn clean_up(uri: &str, queues: &[String], exchanges: &[String]) {
    let config = Config::new("interop_cleanup").with_amqp_uri(uri.to_owned());
    let Ok(transport) = micro_framework::transport::connect(&config).await else { return };
    for queue in queues {
        let _ = transport.delete_queue(queue).await;
        let _ = transport.delete_queue(&format!("{queue}.dlq")).await;
    }
    for exchange in exchanges {
        let _ = transport.delete_exchange(exchange).await;
    }
    transport.close().await;
}

/// Records the payload and the call context of each call.
fn record_call(Payload(payload): Payload<Value>, call: CallContext, Dep(probe): Dep<Arc<Probe>>) {
    probe
        .enter(json!({ "payload": payload, "stack": call.call_id_stack, "call_id": call.call_id }));
    probe.leave();
}

/// Dispatches `relayed` with the received payload, from inside the call: the event carries
/// this call's context headers.
async fn relay(
    Payload(payload): Payload<Value>,
    call: CallContext,
    producer: Producer,
    Dep(probe): Dep<Arc<Probe>>,
) -> micro_framework::Result<()> {
    probe
        .enter(json!({ "payload": payload, "stack": call.call_id_stack, "call_id": call.call_id }));
    probe.leave();
    producer.dispatch("relayed", &payload).await
}

fn strings(value: &Value) -> Vec<String> {
    serde_json::from_value(value.clone())
        .unwrap_or_else(|_| panic!("expected an array of strings, got {value}"))
}

fn sample_payload(i: usize) -> Value {
    json!({ "i": i, "text": "café ☕ \"quoted\"", "nested": { "list": [1, 2.5, null, true] } })
}

// ---------------------------------------------------------------------------------------
// Nameko

#[tokio::test]
async fn nameko_events_reach_a_rust_listener_with_their_call_id_stack() {
    let Some((uri, python)) = prerequisites(NAMEKO) else { return };
    let source = unique("nk_src");
    let probe = Probe::new();
    let config = config(&uri, "rs_from_nameko");
    let service_name = config.service_name.clone();
    let routes = vec![Route::new(record_call)
        .entrypoint(EventListener::new(source.clone(), "paid"))
        .dependency(Shared(probe.clone()))];
    let service = TestService::start(routes, config).await.unwrap();

    let payload = sample_payload(1);
    let peer = Peer::spawn(
        &python,
        NAMEKO,
        &uri,
        &[
            "dispatch",
            "--service",
            &source,
            "--event",
            "paid",
            "--payload",
            &payload.to_string(),
            "--count",
            "2",
            "--call-id-stack",
            "origin.run.1,middle.step.2",
        ],
    );
    let lines = peer.finish().await;
    let sent: Vec<Vec<String>> = lines
        .iter()
        .filter(|line| line.get("sent").is_some())
        .map(|line| strings(&line["call_id_stack"]))
        .collect();
    assert_eq!(sent.len(), 2, "{lines:?}");
    assert!(lines.iter().any(|line| line["dispatched"] == 2), "{lines:?}");

    let waited = service.wait_for_route("record_call", 2).await;
    let seen = probe.seen.lock().unwrap().clone();
    service.stop().await.unwrap();
    clean_up(
        &uri,
        &[format!("evt-{source}-paid--{service_name}.record_call")],
        &[format!("{source}.events")],
    )
    .await;
    waited.unwrap();

    assert_eq!(seen.len(), 2);
    for call in &seen {
        assert_eq!(call["payload"], payload);
        let stack = strings(&call["stack"]);
        let call_id = call["call_id"].as_str().unwrap();
        // Nameko's stack (given parents + its own `{source}.emit.{uuid}`), then ours
        assert_eq!(stack.len(), 4, "{stack:?}");
        assert!(sent.contains(&stack[..3].to_vec()), "{stack:?} not among {sent:?}");
        assert_eq!(&stack[..2], ["origin.run.1", "middle.step.2"]);
        assert!(stack[2].starts_with(&format!("{source}.emit.")), "{stack:?}");
        assert_eq!(stack[3], call_id);
        assert!(call_id.starts_with(&format!("{service_name}.record_call.")), "{call_id}");
    }
    assert_ne!(seen[0]["stack"][2], seen[1]["stack"][2], "each Nameko call has its own id");
}

#[tokio::test]
async fn a_rust_listener_shares_the_queue_of_a_nameko_handler_without_reliable_delivery() {
    let Some((uri, python)) = prerequisites(NAMEKO) else { return };
    let source = unique("nk_src");
    let probe = Probe::new();
    let config = config(&uri, "rs_unreliable");
    let service_name = config.service_name.clone();
    // the Python instance of the same service declares the handler's queue first, auto-delete
    let argv = ["listen", "--service", &service_name, "--source", &source, "--event", "paid"];
    let mut nameko = Peer::spawn(
        &python,
        NAMEKO,
        &uri,
        &[&argv[..], &["--unreliable", "--keep-queue"]].concat(),
    );
    nameko.expect("ready").await;
    let routes = vec![Route::new(record_call)
        .name("handle")
        .entrypoint(EventListener::new(source.clone(), "paid").reliable_delivery(false))
        .dependency(Shared(probe.clone()))];
    let started = TestService::start(routes, config).await;

    let queues = [format!("evt-{source}-paid--{service_name}.handle")];
    let exchanges = [format!("{source}.events")];
    let service = match started {
        Ok(service) => service,
        Err(error) => {
            drop(nameko);
            clean_up(&uri, &queues, &exchanges).await;
            panic!("the Rust instance could not join the Nameko handler's queue: {error}");
        }
    };
    // four events, round-robin over the two instances' consumers: each takes some
    let payload = json!({"order": 1});
    let dispatch = ["dispatch", "--service", &source, "--event", "paid", "--count", "4"];
    let payload_text = payload.to_string();
    Peer::spawn(&python, NAMEKO, &uri, &[&dispatch[..], &["--payload", &payload_text]].concat())
        .finish()
        .await;
    let heard = nameko.finish().await;
    let waited = service.wait_for_route("handle", 1).await;
    service.stop().await.unwrap();
    clean_up(&uri, &queues, &exchanges).await;
    waited.unwrap();

    assert!(heard.iter().any(|line| line["payload"] == payload), "{heard:?}");
    assert!(probe.seen.lock().unwrap().iter().all(|call| call["payload"] == payload));
}

#[tokio::test]
async fn a_rust_producer_reaches_a_nameko_listener_with_the_call_id_stack() {
    let Some((uri, python)) = prerequisites(NAMEKO) else { return };
    let trigger = unique("trigger");
    let listener = unique("nk_lst");
    let probe = Probe::new();
    let config = config(&uri, "rs_to_nameko");
    let service_name = config.service_name.clone();

    // Nameko declares `{service_name}.events` and its queue first; our producer then
    // declares the same exchange: any flag mismatch would fail the dispatch (406).
    let mut peer = Peer::spawn(
        &python,
        NAMEKO,
        &uri,
        &[
            "listen",
            "--service",
            &listener,
            "--source",
            &service_name,
            "--event",
            "relayed",
            "--count",
            "2",
        ],
    );
    let ready = peer.expect("ready").await;
    assert_eq!(ready["queue"], format!("evt-{service_name}-relayed--{listener}.handle"));

    let routes = vec![Route::new(relay)
        .entrypoint(EventListener::new(trigger.clone(), "go"))
        .dependency(Shared(probe.clone()))];
    let service = TestService::start(routes, config).await.unwrap();
    for i in 0..2 {
        service.dispatch(&trigger, "go", &sample_payload(i)).await.unwrap();
    }
    let lines = peer.finish().await;
    let waited = service.wait_for_route("relay", 2).await;
    let relayed = probe.seen.lock().unwrap().clone();
    service.stop().await.unwrap();
    clean_up(
        &uri,
        &[format!("evt-{trigger}-go--{service_name}.relay")],
        &[format!("{trigger}.events"), format!("{service_name}.events")],
    )
    .await;
    waited.unwrap();

    let events: Vec<&Value> = lines.iter().filter(|line| line.get("payload").is_some()).collect();
    assert_eq!(events.len(), 2, "{lines:?}");
    for event in events {
        let i = event["payload"]["i"].as_u64().unwrap() as usize;
        assert_eq!(event["payload"], sample_payload(i));
        let ours = relayed.iter().find(|call| call["payload"]["i"] == i).unwrap();
        // the header arrives as a list of str (not bytes): exactly our call's stack
        let parents = strings(&event["parent_call_id_stack"]);
        assert_eq!(parents, strings(&ours["stack"]));
        assert_eq!(parents, [ours["call_id"].as_str().unwrap()]);
        assert!(parents[0].starts_with(&format!("{service_name}.relay.")), "{parents:?}");
        let stack = strings(&event["call_id_stack"]);
        assert_eq!(stack.len(), 2);
        assert!(stack[1].starts_with(&format!("{listener}.handle.")), "{stack:?}");
        assert_eq!(event["context_data"], json!({}), "no other nameko.* headers were sent");
    }
}

#[tokio::test]
async fn the_call_id_stack_survives_nameko_to_rust_to_nameko() {
    let Some((uri, python)) = prerequisites(NAMEKO) else { return };
    let source = unique("nk_origin");
    let listener = unique("nk_end");
    let probe = Probe::new();
    let config = config(&uri, "rs_middle");
    let service_name = config.service_name.clone();

    let mut end = Peer::spawn(
        &python,
        NAMEKO,
        &uri,
        &["listen", "--service", &listener, "--source", &service_name, "--event", "relayed"],
    );
    end.expect("ready").await;
    let routes = vec![Route::new(relay)
        .entrypoint(EventListener::new(source.clone(), "go"))
        .dependency(Shared(probe.clone()))];
    let service = TestService::start(routes, config).await.unwrap();
    let start = Peer::spawn(
        &python,
        NAMEKO,
        &uri,
        &["dispatch", "--service", &source, "--event", "go", "--payload", "[1, \"two\"]"],
    );
    let sent = start.finish().await;
    let lines = end.finish().await;
    let waited = service.wait_for_route("relay", 1).await;
    service.stop().await.unwrap();
    clean_up(
        &uri,
        &[format!("evt-{source}-go--{service_name}.relay")],
        &[format!("{source}.events"), format!("{service_name}.events")],
    )
    .await;
    waited.unwrap();

    let origin = strings(&sent.iter().find(|l| l.get("sent").is_some()).unwrap()["call_id_stack"]);
    let event = lines.iter().find(|line| line.get("payload").is_some()).unwrap();
    assert_eq!(event["payload"], json!([1, "two"]));
    let stack = strings(&event["call_id_stack"]);
    // origin's `emit`, our `relay`, the listener's `handle`
    assert_eq!(stack.len(), 3, "{stack:?}");
    assert_eq!(stack[..1], origin[..]);
    assert!(stack[1].starts_with(&format!("{service_name}.relay.")), "{stack:?}");
    assert!(stack[2].starts_with(&format!("{listener}.handle.")), "{stack:?}");
}

/// Records the context data of each call.
fn record_context(call: CallContext, Dep(probe): Dep<Arc<Probe>>) {
    probe.enter(json!(call.data.keys().collect::<Vec<_>>()));
    probe.leave();
}

/// A Nameko handler forwards every header of its call on the events it dispatches, a
/// broker's `x-death` and a Rust instance's retry headers too (as `nameko.x-death`, ...: a
/// Rust retry copy of a queue the two share during a migration). The Rust listener
/// downstream keeps the context and drops those: they are not context, and going out again
/// on every message its call sends, they would travel down the whole chain.
#[tokio::test]
async fn headers_of_the_broker_a_nameko_handler_forwards_are_not_context_downstream() {
    let Some((uri, python)) = prerequisites(NAMEKO) else { return };
    let source = unique("nk_fwd_src");
    let handler = unique("nk_fwd");
    let probe = Probe::new();
    let config = config(&uri, "rs_fwd_end");
    let service_name = config.service_name.clone();
    let routes = vec![Route::new(record_context)
        .entrypoint(EventListener::new(handler.clone(), "relayed"))
        .dependency(Shared(probe.clone()))];
    let service = TestService::start(routes, config).await.unwrap();
    let mut nameko = Peer::spawn(
        &python,
        NAMEKO,
        &uri,
        &[
            "listen",
            "--service",
            &handler,
            "--source",
            &source,
            "--event",
            "go",
            "--relay",
            "relayed",
        ],
    );
    let ready = nameko.expect("ready").await;
    let queue = ready["queue"].as_str().unwrap().to_owned();
    let headers = Headers::from([
        ("x-death".into(), HeaderValue::Array(vec![])),
        ("x-mf-retry-count".into(), HeaderValue::Int(2)),
        ("x-mf-last-error".into(), HeaderValue::from("timeout talking to the bank")),
        ("nameko.tenant".into(), HeaderValue::from("acme")),
    ]);
    let properties = Properties {
        content_type: Some("application/json".into()),
        headers,
        ..Properties::default()
    };
    let message = OutgoingMessage { body: bytes::Bytes::from_static(b"[1]"), properties };
    service.transport().publish("", &queue, message, PublishOptions::default()).await.unwrap();
    let lines = nameko.finish().await;
    let waited = service.wait_for_route("record_context", 1).await;
    service.stop().await.unwrap();
    clean_up(
        &uri,
        &[queue, format!("evt-{handler}-relayed--{service_name}.record_context")],
        &[format!("{source}.events"), format!("{handler}.events")],
    )
    .await;
    waited.unwrap();

    let event = lines.iter().find(|line| line.get("payload").is_some()).unwrap();
    // what Nameko forwards: every header of its call
    assert_eq!(event["context_data"]["x-mf-retry-count"], json!(2), "{event}");
    let seen = probe.seen.lock().unwrap().clone();
    assert_eq!(seen, [json!(["tenant"])], "the context data of the Rust call");
}

/// Reads the payload's Python-typed values as text (see [`PythonTypes`]).
fn record_python_types(Payload(values): Payload<PythonTypes>, Dep(probe): Dep<Arc<Probe>>) {
    probe.enter(serde_json::to_value(values).unwrap());
    probe.leave();
}

/// What a listener of `record_python_types` on `source`/`paid` got from a Python producer
/// that `dispatch`ed with `--python-types` (`peer`), with the reasons of any dead letter.
async fn python_types_through(
    uri: &str,
    python: &std::path::Path,
    peer: &str,
    config: Config,
    source: &str,
    queue: &str,
) -> (Vec<Value>, Vec<String>) {
    let probe = Probe::new();
    let routes = vec![Route::new(record_python_types)
        .entrypoint(EventListener::new(source, "paid"))
        .dependency(Shared(probe.clone()))];
    let service = TestService::start(routes, config).await.unwrap();
    let argv =
        ["dispatch", "--service", source, "--event", "paid", "--payload", "{}", "--python-types"];
    Peer::spawn(python, peer, uri, &argv).finish().await;
    let waited = service.wait_for_route("record_python_types", 1).await;
    let dead = service.take_messages(&format!("{queue}.dlq")).await;
    service.stop().await.unwrap();
    waited.unwrap();
    let reasons = dead
        .unwrap()
        .iter()
        .map(|m| format!("{:?}", m.properties.headers.get("x-mf-error")))
        .collect();
    let seen = probe.seen.lock().unwrap().clone();
    (seen, reasons)
}

/// kombu (5.3 and later) writes a `datetime`, `date`, `time`, `Decimal`, `UUID` or `bytes` as
/// `{"__type__": T, "__value__": V}`: a Rust listener reading them as text gets the text.
#[tokio::test]
async fn dates_decimals_uuids_and_bytes_from_a_nameko_dispatcher_reach_a_rust_listener_as_text() {
    let Some((uri, python)) = prerequisites(NAMEKO) else { return };
    let source = unique("nk_typed_src");
    let config = config(&uri, "rs_nk_typed");
    let queue = format!("evt-{source}-paid--{}.record_python_types", config.service_name);
    let (seen, dead) = python_types_through(&uri, &python, NAMEKO, config, &source, &queue).await;
    clean_up(&uri, &[queue], &[format!("{source}.events")]).await;
    assert_eq!(seen, [python_types_as_text()], "dead-lettered instead: {dead:?}");
}

// ---------------------------------------------------------------------------------------
// micro-framework 2.1.1

fn ufw_config(uri: &str, service: &str) -> Config {
    config(uri, service).with_protocol(Protocol::MicroFramework)
}

#[tokio::test]
async fn micro_framework_events_reach_a_rust_listener() {
    let Some((uri, python)) = prerequisites(UFW) else { return };
    let source = unique("ufw_src");
    let probe = Probe::new();
    let config = ufw_config(&uri, "rs_from_ufw");
    let service_name = config.service_name.clone();
    let routes = vec![Route::new(record_call)
        .entrypoint(EventListener::new(source.clone(), "paid"))
        .dependency(Shared(probe.clone()))];
    // Our listener declares `{source}.events` (auto_delete) and the queue first: the
    // micro-framework producer never declares, it needs them to exist.
    let service = TestService::start(routes, config).await.unwrap();

    let payload = sample_payload(3);
    let peer = Peer::spawn(
        &python,
        UFW,
        &uri,
        &[
            "dispatch",
            "--service",
            &source,
            "--event",
            "paid",
            "--payload",
            &payload.to_string(),
            "--count",
            "2",
        ],
    );
    let lines = peer.finish().await;
    assert!(lines.iter().any(|line| line["dispatched"] == 2), "{lines:?}");

    let waited = service.wait_for_route("record_call", 2).await;
    let seen = probe.seen.lock().unwrap().clone();
    service.stop().await.unwrap();
    // the exchange is auto_delete: it goes with the queue
    clean_up(&uri, &[format!("{source}.paid__{service_name}.record_call")], &[]).await;
    waited.unwrap();

    assert_eq!(seen.len(), 2);
    for call in &seen {
        assert_eq!(call["payload"], payload);
        // micro-framework sends no context headers: the stack is just this call
        let call_id = call["call_id"].as_str().unwrap();
        assert_eq!(strings(&call["stack"]), [call_id]);
        assert!(call_id.starts_with(&format!("{service_name}.record_call.")), "{call_id}");
    }
}

#[tokio::test]
async fn a_rust_producer_reaches_a_micro_framework_listener() {
    let Some((uri, python)) = prerequisites(UFW) else { return };
    let source = unique("rs_ufw_src");
    let listener = unique("ufw_lst");
    let mut peer = Peer::spawn(
        &python,
        UFW,
        &uri,
        &["listen", "--service", &listener, "--source", &source, "--event", "paid", "--count", "2"],
    );
    let ready = peer.expect("ready").await;
    assert_eq!(ready["queue"], format!("{source}.paid__{listener}.handle"));

    // the exchange micro-framework declared is auto_delete: ours must declare it the same way
    let config = ufw_config(&uri, "unused");
    let config = config.with_service_name(source.clone());
    let transport = micro_framework::transport::connect(&config).await.unwrap();
    let producer = Producer::new(transport.clone(), &config);
    assert_eq!(producer.exchange(), format!("{source}.events"));
    for i in 0..2 {
        producer.dispatch("paid", &sample_payload(i)).await.unwrap();
    }
    transport.close().await;

    let lines = peer.finish().await;
    let mut payloads: Vec<Value> =
        lines.iter().filter_map(|line| line.get("payload").cloned()).collect();
    payloads.sort_by_key(|payload| payload["i"].as_u64());
    assert_eq!(payloads, [sample_payload(0), sample_payload(1)], "{lines:?}");
}

/// micro-framework's producers publish with kombu's JSON encoder too (see the Nameko test).
#[tokio::test]
async fn dates_decimals_uuids_and_bytes_from_a_micro_framework_producer_reach_a_rust_listener_as_text(
) {
    let Some((uri, python)) = prerequisites(UFW) else { return };
    let source = unique("ufw_typed_src");
    let config = ufw_config(&uri, "rs_ufw_typed");
    let queue = format!("{source}.paid__{}.record_python_types", config.service_name);
    let (seen, dead) = python_types_through(&uri, &python, UFW, config, &source, &queue).await;
    clean_up(&uri, &[queue], &[]).await;
    assert_eq!(seen, [python_types_as_text()], "dead-lettered instead: {dead:?}");
}
