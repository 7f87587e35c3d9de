//! Limits: `MAX_MESSAGE_SIZE` on what a service receives and sends, the in-process broker's
//! memory bound and the bound on pending RPC calls. Each limit gives a clear error and loses
//! nothing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{broker_uris, cleanup, config, unique, Probe};
use micro_framework::amqp::dependencies::{Producer, ServiceProxy};
use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::amqp::rpc::{Args, Client, RpcError};
use micro_framework::dependencies::Shared;
use micro_framework::prelude::*;
use micro_framework::settle::HEADER_ERROR;
use micro_framework::testing::TestService;
use micro_framework::transport::memory::MemoryTransport;
use micro_framework::transport::{
    ExchangeSpec, HeaderValue, Limit, OutgoingMessage, PublishOptions, QueueSpec, Transport,
    TransportError,
};

use serde_json::{json, Value};

fn record(Payload(payload): Payload<Value>, Dep(probe): Dep<Arc<Probe>>) {
    probe.enter(payload);
    probe.leave();
}

#[tokio::test]
async fn oversized_events_are_dead_lettered_with_the_reason_and_others_handled() {
    for uri in broker_uris() {
        let probe = Probe::new();
        let source = unique("big_source");
        let config = config(&uri, "big_sink").with_max_message_size(1024);
        let service_name = config.service_name.clone();
        let routes = vec![Route::new(record)
            .entrypoint(EventListener::new(source.clone(), "data"))
            .dependency(Shared(probe.clone()))];
        let service = TestService::start(routes, config.clone()).await.unwrap();
        let sender = Producer::new(service.transport().clone(), &Config::new(source.clone()));
        sender.dispatch("data", &json!({"pad": "x".repeat(2000)})).await.unwrap();
        sender.dispatch("data", &json!({"small": true})).await.unwrap();
        service.wait_for_route("record", 2).await.unwrap();
        assert_eq!(probe.seen.lock().unwrap().clone(), vec![json!({"small": true})]);
        let queue = format!("evt-{source}-data--{service_name}.record.dlq");
        let dead = service.take_messages(&queue).await.unwrap();
        assert_eq!(dead.len(), 1, "the oversized event is kept in the dead-letter queue");
        let reason = dead[0].properties.headers.get(HEADER_ERROR).and_then(HeaderValue::as_str);
        let reason = reason.unwrap_or_default().to_owned();
        assert!(reason.contains("exceeds MAX_MESSAGE_SIZE (1024 bytes)"), "{reason}");
        assert!(dead[0].body.len() > 2000, "the dead letter keeps the whole body");
        service.stop().await.unwrap();
        cleanup(&uri, &[source, service_name]).await;
    }
}

#[tokio::test]
async fn oversized_events_are_refused_before_publishing() {
    for uri in broker_uris() {
        let config = config(&uri, "big_producer").with_max_message_size(100);
        let transport = micro_framework::transport::connect(&config).await.unwrap();
        let producer = Producer::new(transport.clone(), &config);
        let error = producer.dispatch("data", &"x".repeat(200)).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            "limit reached: event data of 202 bytes exceeds MAX_MESSAGE_SIZE (100 bytes); not sent"
        );
        producer.dispatch("data", &"small").await.unwrap();
        transport.close().await;
        cleanup(&uri, std::slice::from_ref(&config.service_name)).await;
    }
}

fn echo(Args((x,)): Args<(Value,)>) -> Value {
    x
}

fn big(Args(()): Args<()>, Dep(_session): Dep<common::journaled::Session>) -> String {
    "y".repeat(4000)
}

/// A request over `MAX_MESSAGE_SIZE` is refused; a result whose reply would be is replied as
/// Nameko's `UnserializableValueError`, and its call failed for its dependencies (a session
/// rolls back, as Nameko's `worker_result` sees that error; it committed).
#[tokio::test]
async fn rpc_requests_and_replies_over_the_limit_get_clear_errors() {
    for uri in broker_uris() {
        let config = config(&uri, "big_rpc").with_max_message_size(1024);
        let service_name = config.service_name.clone();
        let journal = common::journaled::Journal::default();
        let routes = vec![
            Route::new(echo).entrypoint(RPCListener::new()),
            Route::new(big)
                .entrypoint(RPCListener::new())
                .dependency(common::journaled::Sessions(journal.clone())),
        ];
        let service = TestService::start(routes, config.clone()).await.unwrap();
        let client =
            Client::connect(&Config::new("caller").with_amqp_uri(uri.clone())).await.unwrap();
        let error =
            client.call::<Value>(&service_name, "echo", ("z".repeat(2000),), ()).await.unwrap_err();
        match &error {
            RpcError::MalformedRequest(reason) => {
                assert!(reason.contains("exceeds MAX_MESSAGE_SIZE (1024 bytes)"), "{reason}")
            }
            other => panic!("expected MalformedRequest, got {other:?}"),
        }
        let error = client.call::<Value>(&service_name, "big", (), ()).await.unwrap_err();
        match &error {
            RpcError::RemoteError { exc_type, value, .. } => {
                assert_eq!(exc_type, "UnserializableValueError");
                assert!(value.contains("result of 4"), "{value}");
            }
            other => panic!("expected a remote error, got {other:?}"),
        }
        assert_eq!(*journal.lock().unwrap(), ["roll back"]);
        let small: Value = client.call(&service_name, "echo", ("ok",), ()).await.unwrap();
        assert_eq!(small, json!("ok"));

        let strict = Client::connect(
            &Config::new("caller").with_amqp_uri(uri.clone()).with_max_message_size(64),
        )
        .await
        .unwrap();
        let error =
            strict.call::<Value>(&service_name, "echo", ("w".repeat(100),), ()).await.unwrap_err();
        assert!(
            matches!(
                &error,
                RpcError::Transport(TransportError::LimitReached {
                    what: Limit::MessageSize,
                    limit: 64,
                    ..
                })
            ),
            "{error:?}"
        );
        assert!(error.to_string().contains("exceeds MAX_MESSAGE_SIZE (64 bytes); not sent"));
        client.close().await;
        strict.close().await;
        service.stop().await.unwrap();
        cleanup(&uri, &[service_name]).await;
    }
}

#[tokio::test]
async fn the_in_process_broker_refuses_publishes_beyond_its_memory_bound() {
    let uri = format!("memory://bounded-{}?max_bytes=4096", uuid::Uuid::new_v4());
    let transport = MemoryTransport::connect(&uri).unwrap();
    transport.declare_exchange(&ExchangeSpec::topic("flood")).await.unwrap();
    transport.declare_queue(&QueueSpec::durable("sink")).await.unwrap();
    let message = |n: usize| OutgoingMessage {
        body: Bytes::from(format!("{n:0>500}")),
        ..OutgoingMessage::default()
    };
    let mut accepted = 0;
    let refused = loop {
        match transport.publish("", "sink", message(accepted), PublishOptions::default()).await {
            Ok(()) => accepted += 1,
            Err(error) => break error,
        }
        assert!(accepted < 100, "the bound never applied");
    };
    assert!(
        matches!(
            refused,
            TransportError::LimitReached { what: Limit::BrokerMemory, limit: 4096, size, .. }
                if size > 4096
        ),
        "{refused:?}"
    );
    assert!(!refused.is_permanent(), "room comes back as consumers catch up");
    assert!(refused.to_string().contains("publish refused"), "{refused}");
    assert_eq!(accepted, 5, "5 × (500 + 256) bytes fit in 4096, a sixth does not");
    assert_eq!(transport.queue_info("sink").await.unwrap().message_count, 5, "nothing lost");
    // consuming makes room again
    let first = transport.get("sink").await.unwrap().unwrap();
    first.acker.ack().await.unwrap();
    transport.publish("", "sink", message(99), PublishOptions::default()).await.unwrap();

    let bad = MemoryTransport::connect("memory://bounded?max_bytes=lots").err().unwrap();
    assert!(bad.to_string().contains("invalid memory:// option max_bytes=lots"), "{bad}");
}

/// The binding of the queue of [`silent_service`].
fn silent_binding() -> micro_framework::transport::BindingSpec {
    micro_framework::transport::BindingSpec {
        queue: "rpc-silent".into(),
        exchange: "nameko-rpc".into(),
        routing_key: "silent.*".into(),
        arguments: Default::default(),
    }
}

/// A connection to the in-process broker at `uri`, where a "service" `silent` takes Nameko
/// requests in its queue and never answers.
async fn silent_service(uri: &str) -> MemoryTransport {
    let transport = MemoryTransport::connect(uri).unwrap();
    transport.declare_exchange(&ExchangeSpec::topic("nameko-rpc")).await.unwrap();
    transport.declare_queue(&QueueSpec::durable("rpc-silent")).await.unwrap();
    transport.bind_queue(&silent_binding()).await.unwrap();
    transport
}

/// A caller on `uri` with 65,535 calls waiting on [`silent_service`], one short of the bound.
async fn flooded_caller(uri: &str) -> (Client, Vec<micro_framework::amqp::rpc::RpcReply>) {
    let config = Config::new("flooder")
        .with_amqp_uri(uri.to_owned())
        .with_rpc_timeout(Duration::from_secs(300));
    let client = Client::connect(&config).await.unwrap();
    let silent = client.service("silent");
    let mut waiting = Vec::new();
    for _ in 0..65_535 {
        waiting.push(silent.call_async("wait", (), ()).await.expect("room for it"));
    }
    (client, waiting)
}

#[tokio::test]
async fn pending_rpc_calls_are_bounded() {
    let uri = format!("memory://pending-{}", uuid::Uuid::new_v4());
    let _silent = silent_service(&uri).await;
    let client = Client::connect(&Config::new("flooder").with_amqp_uri(uri.clone())).await.unwrap();
    let silent = client.service("silent");
    let mut waiting = Vec::new();
    let refused = loop {
        match silent.call_async("wait", (), ()).await {
            Ok(reply) => waiting.push(reply),
            Err(error) => break error,
        }
        assert!(waiting.len() <= 65_536, "the bound never applied");
    };
    assert_eq!(waiting.len(), 65_536);
    assert!(matches!(
        &refused,
        RpcError::Transport(TransportError::LimitReached {
            what: Limit::PendingCalls,
            size: 65_537,
            limit: 65_536,
            ..
        })
    ));
    assert!(refused.to_string().contains("wait for replies already; call refused"), "{refused}");
    waiting.truncate(10);
    assert!(silent.call_async("wait", (), ()).await.is_ok(), "room again once calls end");
    client.close().await;
}

/// The bound is the caller's, across its reply queues: calls still waiting on a queue the
/// caller retired (its reply path broken) count, beside those on the queue set up in its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pending_call_bound_holds_across_the_reply_queues_of_a_caller() {
    let uri = format!("memory://pending-retired-{}", uuid::Uuid::new_v4());
    let transport = silent_service(&uri).await;
    let (client, waiting) = flooded_caller(&uri).await;
    let silent = client.service("silent");
    // the reply path breaks (the exchange declared again, the reply queue's binding gone),
    // and a call that times out has the probe retire the queue
    transport.delete_exchange("nameko-rpc").await.unwrap();
    transport.declare_exchange(&ExchangeSpec::topic("nameko-rpc")).await.unwrap();
    transport.bind_queue(&silent_binding()).await.unwrap();
    let short = silent.clone().timeout(Duration::from_millis(200));
    assert!(matches!(short.call::<u64>("wait", (), ()).await, Err(RpcError::Timeout { .. })));
    tokio::time::sleep(Duration::from_millis(2_600)).await;
    let mut more = Vec::new();
    let refused = loop {
        match silent.call_async("wait", (), ()).await {
            Ok(reply) => more.push(reply),
            Err(error) => break error,
        }
        assert!(more.len() <= 65_536, "no bound at all");
    };
    assert_eq!(waiting.len() + more.len(), 65_536, "{refused}");
    assert!(matches!(
        &refused,
        RpcError::Transport(TransportError::LimitReached { what: Limit::PendingCalls, .. })
    ));
    drop((more, waiting));
    client.close().await;
}

/// A caller with `MAX_PENDING_CALLS` calls waiting on a silent service, whose reply queue then
/// went (deleted under its consumer): the calls waiting on it failed, `Closed`.
async fn flooded_caller_whose_reply_queue_went(uri: &str) -> (Client, ServiceProxy) {
    let transport = silent_service(uri).await;
    let (client, mut waiting) = flooded_caller(uri).await;
    let silent = client.service("silent");
    let request = transport.get("rpc-silent").await.unwrap().expect("a request");
    let reply_to = request.properties.reply_to.clone().expect("reply_to");
    transport.delete_queue(&format!("rpc.reply-standalone_rpc_proxy-{reply_to}")).await.unwrap();
    let first = waiting.pop().unwrap();
    let failed = tokio::time::timeout(Duration::from_secs(10), first.result::<u64>()).await;
    assert!(
        matches!(failed, Ok(Err(RpcError::Transport(TransportError::Closed { .. })))),
        "{failed:?}"
    );
    (client, silent)
}

/// Calls failed because their reply queue went (deleted under its consumer) give their room
/// back: the bound is not used up by calls that ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_failed_with_their_reply_queue_free_their_room() {
    let uri = format!("memory://pending-freed-{}", uuid::Uuid::new_v4());
    let (client, silent) = flooded_caller_whose_reply_queue_went(&uri).await;
    for n in 0..1_000 {
        let call = silent.call_async("wait", (), ()).await;
        assert!(call.is_ok(), "call {n} after the queue went refused: {:?}", call.err());
    }
    client.close().await;
}

/// Calls failed because their reply queue went give their room back to calls then held at
/// the same time, not only to calls that end at once: ten held together are all taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_failed_with_their_reply_queue_give_their_room_back_to_calls_held_together() {
    let uri = format!("memory://pending-held-{}", uuid::Uuid::new_v4());
    let (client, silent) = flooded_caller_whose_reply_queue_went(&uri).await;
    let mut held = Vec::new();
    for n in 0..10 {
        let call = silent.call_async("wait", (), ()).await;
        assert!(call.is_ok(), "call {n} held with {} others refused: {:?}", held.len(), call.err());
        held.push(call.unwrap());
    }
    drop(held);
    client.close().await;
}

#[tokio::test]
async fn an_oversized_event_is_dead_lettered_without_going_through_the_filter() {
    use std::sync::atomic::{AtomicU64, Ordering};
    for uri in broker_uris() {
        let probe = Probe::new();
        let source = unique("big_source");
        let config = config(&uri, "big_filtered").with_max_message_size(1024);
        let service_name = config.service_name.clone();
        let filtered = Arc::new(AtomicU64::new(0));
        let seen = filtered.clone();
        let listener = EventListener::new(source.clone(), "data").filter(move |payload| {
            seen.fetch_add(1, Ordering::SeqCst);
            payload["keep"] == json!(true)
        });
        let routes =
            vec![Route::new(record).entrypoint(listener).dependency(Shared(probe.clone()))];
        let service = TestService::start(routes, config.clone()).await.unwrap();
        let sender = Producer::new(service.transport().clone(), &Config::new(source.clone()));
        // The filter would skip it; over MAX_MESSAGE_SIZE, it is not read at all.
        sender.dispatch("data", &json!({"keep": false, "pad": "x".repeat(2000)})).await.unwrap();
        sender.dispatch("data", &json!({"keep": true})).await.unwrap();
        service.wait_for_route("record", 2).await.unwrap();
        assert_eq!(probe.seen.lock().unwrap().clone(), vec![json!({"keep": true})]);
        let queue = format!("evt-{source}-data--{service_name}.record.dlq");
        let dead = service.take_messages(&queue).await.unwrap();
        assert_eq!(dead.len(), 1, "the oversized event is kept in the dead-letter queue");
        let reason = dead[0].properties.headers.get(HEADER_ERROR).and_then(HeaderValue::as_str);
        let reason = reason.unwrap_or_default().to_owned();
        assert!(reason.contains("exceeds MAX_MESSAGE_SIZE (1024 bytes)"), "{reason}");
        assert_eq!(filtered.load(Ordering::SeqCst), 1, "the filter read the small event only");
        service.stop().await.unwrap();
        cleanup(&uri, &[source, service_name]).await;
    }
}

/// Guards the bound of `MAX_MESSAGE_SIZE` on what a service receives (was never checked at its
/// edge): a body of exactly `MAX_MESSAGE_SIZE` bytes is handled, one byte more dead-lettered.
#[tokio::test]
async fn a_body_of_exactly_max_message_size_is_handled_and_one_byte_more_refused() {
    for uri in broker_uris() {
        let probe = Probe::new();
        let source = unique("edge_source");
        let config = config(&uri, "edge_sink").with_max_message_size(1024);
        let service_name = config.service_name.clone();
        let routes = vec![Route::new(record)
            .entrypoint(EventListener::new(source.clone(), "data"))
            .dependency(Shared(probe.clone()))];
        let service = TestService::start(routes, config.clone()).await.unwrap();
        // JSON strings of 1024 and 1025 bytes, quotes included
        let (fits, over) = ("f".repeat(1022), "o".repeat(1023));
        for text in [&fits, &over] {
            let body = Bytes::from(json!(text).to_string());
            let properties = micro_framework::data::json_properties();
            let message = OutgoingMessage { body, properties };
            let exchange = format!("{source}.events");
            let transport = service.transport();
            transport.publish(&exchange, "data", message, PublishOptions::default()).await.unwrap();
        }
        service.wait_for_route("record", 2).await.unwrap();
        let seen = probe.seen.lock().unwrap().clone();
        let sizes: Vec<usize> = seen.iter().map(|text| text.as_str().map_or(0, str::len)).collect();
        assert_eq!(sizes, [fits.len()], "{uri}: the body that fits is handled");
        let queue = format!("evt-{source}-data--{service_name}.record.dlq");
        let dead = service.take_messages(&queue).await.unwrap();
        assert_eq!(dead.len(), 1, "{uri}: the body one byte over is dead-lettered");
        assert_eq!(dead[0].body.len(), 1025, "{uri}");
        let reason = dead[0].properties.headers.get(HEADER_ERROR).and_then(HeaderValue::as_str);
        let reason = reason.unwrap_or_default().to_owned();
        assert!(reason.contains("message of 1025 bytes exceeds MAX_MESSAGE_SIZE"), "{reason}");
        service.stop().await.unwrap();
        cleanup(&uri, &[source, service_name]).await;
    }
}

/// The size of the request of `silent.wait(text)` when the caller refuses it as over its
/// `MAX_MESSAGE_SIZE` of 1024 bytes; `None` when it is sent.
async fn refused_size(silent: &ServiceProxy, text: &str) -> Option<u64> {
    match silent.call_async("wait", (text,), ()).await {
        Ok(_) => None,
        Err(RpcError::Transport(TransportError::LimitReached {
            what: Limit::MessageSize,
            size,
            limit: 1024,
            ..
        })) => Some(size),
        Err(other) => panic!("{other:?}"),
    }
}

/// The bound of `MAX_MESSAGE_SIZE` on what a caller sends is "at most" too: an RPC request of
/// exactly `MAX_MESSAGE_SIZE` bytes is sent, one byte more refused.
#[tokio::test]
async fn an_rpc_request_of_exactly_max_message_size_is_sent_and_one_byte_more_refused() {
    let uri = format!("memory://request-edge-{}", uuid::Uuid::new_v4());
    let _silent = silent_service(&uri).await;
    let config = Config::new("sizer").with_amqp_uri(uri.clone()).with_max_message_size(1024);
    let client = Client::connect(&config).await.unwrap();
    let silent = client.service("silent");
    // the size of the request of a 2000-byte argument tells the size of its envelope
    let over = refused_size(&silent, &"x".repeat(2000)).await.expect("2000 bytes refused");
    let fits = 2000 - usize::try_from(over - 1024).unwrap();
    assert_eq!(refused_size(&silent, &"x".repeat(fits + 1)).await, Some(1025));
    assert_eq!(refused_size(&silent, &"x".repeat(fits)).await, None, "1024 bytes refused");
    client.close().await;
}

/// 300 double quotes: 600 bytes as JSON (Nameko's reply fits in 1024), but the
/// micro-framework wire writes the reply again as a JSON string, where each `\"` is `\\\"`:
/// over 1200 bytes.
fn quotes(Args(()): Args<()>, Dep(_session): Dep<common::journaled::Session>) -> String {
    "\"".repeat(300)
}

/// A listener in the micro-framework wire (`RPCListener::protocol`) of a service whose
/// config says Nameko: its reply is measured as it goes out, so a result whose reply does not
/// fit fails the call (the session rolls back) and the caller is told it is unserializable.
/// Measured in the config's format, it "fit", the session committed, and the caller was told
/// the call failed all the same (the reply refused as too large when sent).
#[tokio::test]
async fn a_reply_too_large_in_the_listeners_own_wire_format_fails_the_call() {
    let config = micro_framework::testing::memory_test_config(&common::unique("ufw_big"))
        .with_max_message_size(1024);
    assert_eq!(config.protocol, micro_framework::config::Protocol::Nameko);
    let name = config.service_name.clone();
    let journal = common::journaled::Journal::default();
    let routes = vec![Route::new(quotes)
        .entrypoint(RPCListener::new().protocol(micro_framework::config::Protocol::MicroFramework))
        .dependency(common::journaled::Sessions(journal.clone()))];
    let service = TestService::start(routes, config.clone()).await.unwrap();
    let caller = config.clone().with_protocol(micro_framework::config::Protocol::MicroFramework);
    let client = micro_framework::amqp::rpc::Client::connect(&caller).await.unwrap();
    let answer = client.call::<Value>(&name, "quotes", (), ()).await;
    client.close().await;
    service.stop().await.unwrap();
    assert!(answer.is_err(), "{answer:?}");
    assert_eq!(
        *journal.lock().unwrap(),
        ["roll back"],
        "the call whose reply could not be sent was committed: {answer:?}"
    );
}

/// Numbers beyond a 64-bit float's range, which serde_json does not read (a Python integer of
/// more than 308 digits): refused with a reason that says so and what to do.
mod numbers_beyond_a_float {
    use super::common;

    use std::time::Duration;

    use bytes::Bytes;
    use common::ufw_caller::UfwCaller;
    use common::{config, unique};
    use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
    use micro_framework::amqp::rpc::Args;
    use micro_framework::config::Protocol;
    use micro_framework::prelude::*;
    use micro_framework::testing::TestService;
    use micro_framework::transport::{HeaderValue, OutgoingMessage, PublishOptions};
    use serde_json::{json, Value};

    fn echo(Args((value,)): Args<(Value,)>) -> Value {
        value
    }

    /// Under `PROTOCOL=micro_framework` a request holding a number beyond a float's range (the
    /// Python micro-framework's `json.dumps(10**400)`) is answered with a reason that says so and
    /// what to do, where it said the body, valid JSON, was not JSON.
    #[tokio::test]
    async fn a_micro_framework_request_holding_a_number_beyond_a_float_is_told_so() {
        let uri = format!("memory://{}", unique("ufw_big"));
        let config = config(&uri, "ufw_big").with_protocol(Protocol::MicroFramework);
        let name = config.service_name.clone();
        let routes = vec![Route::new(echo).entrypoint(RPCListener::new())];
        let service = TestService::start(routes, config).await.unwrap();
        let huge = format!(
            r#"{{"command": "echo", "command_args": [1{}], "command_kwargs": {{}}}}"#,
            "0".repeat(400)
        );
        let caller = UfwCaller::new(service.transport(), &name).await;
        let reply = caller.request("echo", Bytes::from(huge)).await;
        // control: 2**64 is read, as a float
        let big =
            r#"{"command": "echo", "command_args": [18446744073709551616], "command_kwargs": {}}"#;
        let control = caller.request("echo", Bytes::from_static(big.as_bytes())).await;
        caller.close().await;
        service.stop().await.unwrap();
        assert_eq!(control["data"], json!(1.8446744073709552e19), "{control}");
        let reason = reply["exception"]["message"].as_str().unwrap_or_default().to_owned();
        assert!(
            reason.contains("beyond a 64-bit float's range") && reason.contains("as a string"),
            "a micro-framework request holding 10**400 is not told why nor what to do \
             (as a Nameko one now is): {reply}"
        );
        assert!(
            !reason.contains("not JSON"),
            "the body is valid JSON, but said not to be: {reason}"
        );
    }

    /// Under `PROTOCOL=micro_framework` a request holding a lone surrogate (the Python
    /// micro-framework's `json.dumps("a\ud800b")`, well-formed JSON) is answered
    /// `RPCMalformedMessage` with a reason naming it, where serde's own says only "unexpected
    /// end of hex escape".
    #[tokio::test]
    async fn a_micro_framework_request_holding_a_lone_surrogate_is_told_so() {
        let uri = format!("memory://{}", unique("ufw_surrogate"));
        let config = config(&uri, "ufw_surrogate").with_protocol(Protocol::MicroFramework);
        let name = config.service_name.clone();
        let routes = vec![Route::new(echo).entrypoint(RPCListener::new())];
        let service = TestService::start(routes, config).await.unwrap();
        let caller = UfwCaller::new(service.transport(), &name).await;
        let body = r#"{"command": "echo", "command_args": ["a\ud800b"], "command_kwargs": {}}"#;
        let reply = caller.request("echo", Bytes::from_static(body.as_bytes())).await;
        caller.close().await;
        service.stop().await.unwrap();
        assert_eq!(reply["exception"]["exception"], json!("RPCMalformedMessage"), "{reply}");
        let reason = reply["exception"]["message"].as_str().unwrap_or_default();
        assert!(reason.contains("lone UTF-16 surrogate"), "{reply}");
    }

    fn takes_numbers(Payload(_): Payload<Value>) {}

    /// An event holding a number beyond a float's range is dead-lettered as bad input, with a
    /// reason that says so.
    #[tokio::test]
    async fn an_event_holding_a_number_beyond_a_float_is_dead_lettered_saying_so() {
        use micro_framework::settle::{HEADER_ERROR, HEADER_ERROR_KIND};
        let uri = format!("memory://{}", unique("evt_big"));
        let shop = unique("big_shop");
        let config = config(&uri, "evt_big");
        let dlq = format!("evt-{shop}-go--{}.takes_numbers.dlq", config.service_name);
        let routes = vec![Route::new(takes_numbers).entrypoint(EventListener::new(&shop, "go"))];
        let service = TestService::start(routes, config).await.unwrap();
        let properties = micro_framework::Properties {
            content_type: Some("application/json".into()),
            ..Default::default()
        };
        let body = Bytes::from(format!("[1{}]", "0".repeat(400)));
        let message = OutgoingMessage { body, properties };
        let exchange = format!("{shop}.events");
        service
            .transport()
            .publish(&exchange, "go", message, PublishOptions::default())
            .await
            .unwrap();
        let transport = service.transport().clone();
        let mut dead = None;
        for _ in 0..500 {
            if let Some(delivery) = transport.get(&dlq).await.unwrap() {
                delivery.acker.ack().await.unwrap();
                dead = Some(delivery);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        service.stop().await.unwrap();
        let dead = dead.expect("the event was not dead-lettered");
        let headers = &dead.properties.headers;
        assert_eq!(
            headers.get(HEADER_ERROR_KIND),
            Some(&HeaderValue::from("bad_input")),
            "{headers:?}"
        );
        let error = format!("{:?}", headers.get(HEADER_ERROR));
        assert!(error.contains("beyond a 64-bit float's range"), "{error}");
    }
}
