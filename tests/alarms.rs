//! A memory alarm on a node of the test cluster (`tests/common/cluster.rs`), which blocks the
//! service's publishes (`connection.blocked`): a publish that timed out meanwhile may still go
//! out when the alarm ends, so nothing is published again, nor requeued, behind it. Run in the
//! cluster stage (`MF_CLUSTER_URIS`), one test at a time: the alarm blocks the whole cluster.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{self, Cluster, Fault, FaultKind};
use common::{unique, Probe};
use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::dependencies::Shared;
use micro_framework::prelude::*;
use micro_framework::retry::{AsyncBackOff, BackOffData};
use micro_framework::testing::{take_messages, TestService};
use micro_framework::transport::SharedTransport;
use serde_json::{json, Value};

/// Longer than the publish timeout (30 s; a service has no setting for it), so that a publish
/// sent when the alarm begins times out while it lasts.
const LONG_ALARM: Duration = Duration::from_secs(34);

fn failing(
    Payload(payload): Payload<Value>,
    retry: BackOffData,
    Dep(probe): Dep<Arc<Probe>>,
) -> Result<(), std::io::Error> {
    probe.enter(json!({ "id": payload["id"], "retry": retry.retry_count }));
    probe.leave();
    Err(std::io::Error::other(format!("attempt {} failed", retry.retry_count)))
}

fn record(Payload(payload): Payload<Value>, Dep(probe): Dep<Arc<Probe>>) {
    probe.enter(payload);
    probe.leave();
}

/// A transport on node 2 of `cluster`, to publish and read the queues with.
async fn observer(cluster: &Cluster) -> SharedTransport {
    let config = Config::new(unique("alarm_observer")).with_amqp_uri(cluster.uri(2).to_owned());
    micro_framework::transport::connect(&config).await.unwrap()
}

/// The messages `queue` holds once it holds some, for up to 20 s.
async fn wait_for_messages(
    transport: &SharedTransport,
    queue: &str,
) -> Vec<micro_framework::Message> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let messages = take_messages(&**transport, queue).await.unwrap();
        if !messages.is_empty() {
            return messages;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Vec::new()
}

/// A message fails while the broker blocks publishing for longer than the publish timeout:
/// its retry copy times out, but may still go out when the alarm ends, so the service cannot
/// know whether the broker took it. The message is held, nothing more is published for it
/// while the block lasts, and it is handed back once the block ends: never lost (acked
/// behind a publish whose outcome is unknown, it would be, were that publish refused or the
/// connection lost before it went out: lapin writes the ack first), at the cost of running
/// its retry twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_timed_out_by_a_memory_alarm_is_not_lost_and_not_copied_while_it_lasts() {
    let Some(cluster) = cluster::cluster() else { return };
    let probe = Probe::closed();
    let source = unique("alarm_retry");
    let config = Config::new(unique("alarm_retry"))
        .with_amqp_uri(cluster.uri(1).to_owned())
        .with_max_redeliveries(5);
    let queue = format!("evt-{source}-job--{}.failing", config.service_name);
    let routes = vec![Route::new(failing)
        .entrypoint(EventListener::new(&source, "job"))
        .backoff(AsyncBackOff::new(1, Duration::from_millis(100)))
        .dependency(Shared(probe.clone()))];
    let service = TestService::start(routes, config).await.unwrap();
    let observer = observer(&cluster).await;
    service.dispatch(&source, "job", &json!({ "id": 1 })).await.unwrap();
    probe.wait_started(1).await;
    let alarm = Fault::inject(1, FaultKind::MemoryAlarm);
    tokio::time::sleep(Duration::from_millis(500)).await;
    probe.open();
    tokio::time::sleep(LONG_ALARM).await;
    alarm.undo();
    let dead = wait_for_messages(&observer, &format!("{queue}.dlq")).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = take_messages(&*observer, &format!("{queue}.dlq")).await.unwrap();
    let runs = probe.seen.lock().unwrap().clone();
    service.stop().await.unwrap();
    observer.close().await;
    cluster.delete_named(2, &source).await;
    let retries: Vec<&Value> = runs.iter().map(|run| &run["retry"]).collect();
    // the retry copy that timed out, and the hand-back made once the block ended
    assert_eq!(retries, [&json!(0), &json!(1), &json!(1)], "the attempt, then its retry twice");
    assert_eq!(dead.len() + later.len(), 2, "a dead letter for each run of the retry");
}

/// A stop during a memory alarm, with 4 messages received and not started: they are not
/// handed back as copies, which would go out when the alarm ends, but left to go back with
/// their channel, each once, and the log says so. Was: their copies (the connection's first
/// publishes of the alarm, sent before the broker said it blocks the connection) went out
/// when it ended, and the connection the stop closed requeued them too: each twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_memory_alarm_puts_each_unstarted_message_back_once() {
    let Some(cluster) = cluster::cluster() else { return };
    common::logs::capture(tracing::Level::WARN);
    let probe = Probe::closed();
    let source = unique("alarm_stop");
    let config = Config::new(unique("alarm_stop"))
        .with_amqp_uri(cluster.uri(1).to_owned())
        .with_max_workers(1)
        .with_prefetch_count(Some(5))
        .with_shutdown_timeout(Duration::from_secs(2));
    let queue = format!("evt-{source}-job--{}.record", config.service_name);
    let routes = vec![Route::new(record)
        .entrypoint(EventListener::new(&source, "job"))
        .dependency(Shared(probe.clone()))];
    let service = TestService::start(routes, config).await.unwrap();
    let observer = observer(&cluster).await;
    for id in 0..5 {
        service.dispatch(&source, "job", &json!({ "id": id })).await.unwrap();
    }
    probe.wait_started(1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let alarm = Fault::inject(1, FaultKind::MemoryAlarm);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stop = tokio::spawn(service.stop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    probe.open();
    let stopped = tokio::time::timeout(Duration::from_secs(60), stop).await;
    alarm.undo();
    let mut ids: Vec<u64> = wait_for_messages(&observer, &queue)
        .await
        .iter()
        .map(|message| {
            serde_json::from_slice::<Value>(&message.body).unwrap()["id"].as_u64().unwrap()
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = take_messages(&*observer, &queue).await.unwrap();
    ids.extend(later.iter().map(|message| {
        serde_json::from_slice::<Value>(&message.body).unwrap()["id"].as_u64().unwrap()
    }));
    ids.sort_unstable();
    observer.close().await;
    cluster.delete_named(2, &source).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))), "the stop: {stopped:?}");
    assert_eq!(ids, [1, 2, 3, 4], "each unstarted message once in its queue");
    let logs = common::logs::logged();
    assert!(logs.contains("not handed back as a copy: the broker blocks publishing"), "{logs}");
}
