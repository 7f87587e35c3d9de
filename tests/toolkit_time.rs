//! Controlled time on the in-process broker: retries, delay queues, TTLs, `x-expires`, timers
//! and RPC timeouts follow tokio's paused clock, so these tests of minutes and hours of
//! schedule take milliseconds and see exact times.
//!
//! They run on `memory://` only: RabbitMQ keeps real time (its TTLs and delays run on the
//! broker's clock), and tokio's paused clock would fire the client's I/O timeouts early.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{NaiveDateTime, Timelike};
use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::amqp::rpc::{Args, Client, RpcError};
use micro_framework::config::RetryDelay;
use micro_framework::dependencies::Shared;
use micro_framework::entrypoints::TimeEntrypoint;
use micro_framework::prelude::*;
use micro_framework::retry::{AsyncBackOff, BackOff};
use micro_framework::settle::HEADER_ATTEMPTS;
use micro_framework::testing::{memory_test_config, TestService};
use micro_framework::transport::memory::MemoryTransport;
use micro_framework::transport::{
    HeaderValue, Headers, OutgoingMessage, PublishOptions, QueueSpec, Transport, TransportError,
};
use micro_framework::Message;
use tokio::time::Instant;

/// When each call came, by tokio's clock, and what it was given.
#[derive(Debug, Default)]
struct Calls(Mutex<Vec<(Instant, String)>>);

impl Calls {
    fn record(&self, payload: String) {
        self.0.lock().unwrap().push((Instant::now(), payload));
    }

    fn times(&self) -> Vec<Instant> {
        self.0.lock().unwrap().iter().map(|(at, _)| *at).collect()
    }

    fn payloads(&self) -> Vec<String> {
        self.0.lock().unwrap().iter().map(|(_, payload)| payload.clone()).collect()
    }

    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// The gaps between consecutive times.
fn gaps(times: &[Instant]) -> Vec<Duration> {
    times.windows(2).map(|pair| pair[1] - pair[0]).collect()
}

/// How far from a deadline a test looks: the broker's timer and the test wake at the same
/// instant of a deadline in either order, and the timer wheel counts whole milliseconds.
const MARGIN: Duration = Duration::from_millis(10);

/// Whether `gap` is `expected`, as the timer wheel keeps it.
fn about(gap: Duration, expected: Duration) -> bool {
    gap >= expected && gap < expected + MARGIN
}

/// A sync target that fails every time (sync targets run on the blocking pool).
fn always_fails(
    Payload(order): Payload<String>,
    Dep(calls): Dep<Arc<Calls>>,
) -> Result<(), String> {
    calls.record(order);
    Err("the bank is down".to_owned())
}

/// An async target that fails every time.
async fn always_fails_async(
    Payload(order): Payload<String>,
    Dep(calls): Dep<Arc<Calls>>,
) -> Result<(), String> {
    calls.record(order);
    Err("the bank is down".to_owned())
}

fn dead_letter_attempts(message: &Message) -> Option<i64> {
    message.properties.headers.get(HEADER_ATTEMPTS).and_then(HeaderValue::as_i64)
}

#[tokio::test(start_paused = true)]
async fn an_async_backoff_of_5_times_10_s_dead_letters_after_6_attempts_10_s_apart() {
    let plugin =
        format!("memory://{}?plugins=rabbitmq_delayed_message_exchange", common::unique("paused"));
    let delays = [
        (memory_test_config(&common::unique("billing")), "delay queues"),
        (
            Config::new(common::unique("billing"))
                .with_amqp_uri(plugin)
                .with_retry_delay(RetryDelay::DelayedMessagePlugin),
            "the delayed-message plugin",
        ),
    ];
    for (config, delayed_by) in delays {
        let real = std::time::Instant::now();
        let calls = Arc::new(Calls::default());
        let shop = common::unique("shop");
        let queue = format!("evt-{shop}-paid--{}.always_fails", config.service_name);
        let route = Route::new(always_fails)
            .entrypoint(EventListener::new(&shop, "paid"))
            .backoff(AsyncBackOff::new(5, Duration::from_secs(10)))
            .dependency(Shared(calls.clone()));
        let service = TestService::start(vec![route], config).await.unwrap();
        let sent = Instant::now();
        service.dispatch(&shop, "paid", "order 1").await.unwrap();

        service.wait_for_route_within("always_fails", 6, Duration::from_secs(120)).await.unwrap();
        let dead = service.take_messages(&format!("{queue}.dlq")).await.unwrap();
        assert_eq!(dead.len(), 1, "{delayed_by}");
        assert_eq!(dead_letter_attempts(&dead[0]), Some(6), "{delayed_by}");
        let times = calls.times();
        assert_eq!(times.len(), 6, "{delayed_by}: {:?}", calls.payloads());
        assert!(times[0] - sent < MARGIN, "{delayed_by}: {:?}", times[0] - sent);
        let gaps = gaps(&times);
        let ten_seconds = Duration::from_secs(10);
        assert!(gaps.iter().all(|gap| about(*gap, ten_seconds)), "{delayed_by}: {gaps:?}");
        // no seventh attempt, however long the test clock runs on
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(calls.count(), 6, "{delayed_by}");
        assert_eq!(service.queue_len(&format!("{queue}.dlq")).await.unwrap(), 0);
        service.stop().await.unwrap();
        let real = real.elapsed();
        eprintln!("5 x 10 s of broker retries through {delayed_by} took {real:?} of real time");
    }
}

#[tokio::test(start_paused = true)]
async fn an_in_worker_backoff_sleeps_on_the_test_clock() {
    let real = std::time::Instant::now();
    let calls = Arc::new(Calls::default());
    let shop = common::unique("shop");
    let route = Route::new(always_fails_async)
        .entrypoint(EventListener::new(&shop, "paid"))
        .backoff(BackOff::new(3, Duration::from_secs(30)))
        .dependency(Shared(calls.clone()));
    let service = TestService::start(vec![route], memory_test_config(&common::unique("billing")))
        .await
        .unwrap();
    service.dispatch(&shop, "paid", "order 2").await.unwrap();
    service.wait_for_route_within("always_fails_async", 1, Duration::from_secs(200)).await.unwrap();
    let gaps = gaps(&calls.times());
    assert_eq!(gaps.len(), 3);
    assert!(gaps.iter().all(|gap| about(*gap, Duration::from_secs(30))), "{gaps:?}");
    service.stop().await.unwrap();
    eprintln!("3 x 30 s of in-worker retries took {:?} of real time", real.elapsed());
}

#[tokio::test(start_paused = true)]
async fn a_wait_limit_runs_on_the_test_clock_and_says_what_was_seen() {
    let calls = Arc::new(Calls::default());
    let shop = common::unique("shop");
    let route = Route::new(always_fails)
        .entrypoint(EventListener::new(&shop, "paid"))
        .backoff(AsyncBackOff::new(5, Duration::from_secs(10)))
        .dependency(Shared(calls.clone()));
    let service = TestService::start(vec![route], memory_test_config(&common::unique("billing")))
        .await
        .unwrap();
    service.dispatch(&shop, "paid", "order 3").await.unwrap();
    let started = Instant::now();
    let error = service
        .wait_for_route_within("always_fails", 6, Duration::from_secs(25))
        .await
        .unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(25));
    let text = error.to_string();
    assert!(text.contains("'always_fails' settled 3 of 6 messages in 25s"), "{text}");
    service.stop().await.unwrap();
}

/// A sync target that blocks its worker thread for 50 ms of real time.
fn blocks(Dep(calls): Dep<Arc<Calls>>) {
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(50));
    calls.record(format!("{:?}", started.elapsed()));
}

#[tokio::test(start_paused = true)]
async fn a_sync_target_holds_the_paused_clock_while_it_runs() {
    let calls = Arc::new(Calls::default());
    let shop = common::unique("shop");
    let route = Route::new(blocks)
        .entrypoint(EventListener::new(&shop, "paid"))
        .dependency(Shared(calls.clone()));
    let service = TestService::start(vec![route], memory_test_config(&common::unique("blocking")))
        .await
        .unwrap();
    let started = Instant::now();
    service.dispatch(&shop, "paid", "order 4").await.unwrap();
    // an idle paused clock would jump to this limit while the target blocks its thread
    service.wait_for_route_within("blocks", 1, Duration::from_secs(3600)).await.unwrap();
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(calls.payloads(), ["0ns"]);
    service.stop().await.unwrap();
}

/// A timer target recording when it fired and the payload it was given.
fn tick(Payload(fired_at): Payload<String>, Dep(calls): Dep<Arc<Calls>>) {
    calls.record(fired_at);
}

/// A timer payload as a time.
fn fired_at(payload: &str) -> NaiveDateTime {
    NaiveDateTime::parse_from_str(payload, "%Y-%m-%dT%H:%M:%S%.f")
        .unwrap_or_else(|error| panic!("{payload:?} is not a timer payload: {error}"))
}

#[tokio::test(start_paused = true)]
async fn an_interval_timer_of_one_minute_fires_once_a_minute_of_the_test_clock() {
    let real = std::time::Instant::now();
    let calls = Arc::new(Calls::default());
    let route = Route::new(tick)
        .entrypoint(TimeEntrypoint::every(Duration::from_secs(60)))
        .dependency(Shared(calls.clone()));
    let started = Instant::now();
    let service = TestService::start(vec![route], memory_test_config(&common::unique("ticker")))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(10 * 60 + 30)).await;
    let times = calls.times();
    assert_eq!(times.len(), 10, "{:?}", calls.payloads());
    assert!(about(times[0] - started, Duration::from_secs(60)), "{:?}", times[0] - started);
    assert!(gaps(&times).iter().all(|gap| about(*gap, Duration::from_secs(60))));
    // the payload is the wall time of each tick, on the same clock
    let payloads: Vec<NaiveDateTime> = calls.payloads().iter().map(|p| fired_at(p)).collect();
    for (pair, times) in payloads.windows(2).zip(times.windows(2)) {
        let wall = (pair[1] - pair[0]).to_std().unwrap();
        assert_eq!(wall, times[1] - times[0], "{pair:?}");
    }
    service.stop().await.unwrap();
    eprintln!("10 minutes of a timer took {:?} of real time", real.elapsed());
}

async fn fired(Payload(fired_at): Payload<String>) -> String {
    fired_at
}

/// A timer fired by hand (`hook.timer()`) fires at the test clock's time, as its own ticks
/// do: a test of a nightly job that moves the clock a day and fires it saw the system
/// clock's time, "yesterday".
#[tokio::test(start_paused = true)]
async fn a_timer_fired_by_hand_fires_at_the_test_clocks_time() {
    let route = Route::new(fired).entrypoint(TimeEntrypoint::every(Duration::from_secs(3600)));
    let config = memory_test_config(&common::unique("by_hand"));
    let service = TestService::start(vec![route], config).await.unwrap();
    let tick = service.waiter("fired").unwrap().timeout(Duration::from_secs(7200));
    let by_timer: String = tick.wait().await.unwrap().result().unwrap();
    tokio::time::advance(Duration::from_secs(24 * 3600)).await;
    let by_hand: String = service.hook("fired").unwrap().timer().await.unwrap();
    service.stop().await.unwrap();
    let (by_timer, by_hand) = (fired_at(&by_timer), fired_at(&by_hand));
    let moved = (by_hand - by_timer).to_std().unwrap_or_default();
    assert!(moved >= Duration::from_secs(24 * 3600), "{by_timer} then {by_hand}");
    assert!(moved < Duration::from_secs(24 * 3600 + 60), "{by_timer} then {by_hand}");
}

#[tokio::test(start_paused = true)]
async fn a_cron_timer_fires_on_each_occurrence_of_the_test_clock() {
    let calls = Arc::new(Calls::default());
    let route = Route::new(tick)
        .entrypoint(TimeEntrypoint::cron("*/5 * * * *").unwrap())
        .dependency(Shared(calls.clone()));
    let service =
        TestService::start(vec![route], memory_test_config(&common::unique("cron"))).await.unwrap();
    // any hour holds exactly twelve five-minute marks
    tokio::time::sleep(Duration::from_secs(3600)).await;
    let payloads: Vec<NaiveDateTime> = calls.payloads().iter().map(|p| fired_at(p)).collect();
    assert_eq!(payloads.len(), 12, "{payloads:?}");
    for at in &payloads {
        assert_eq!((at.minute() % 5, at.second()), (0, 0), "{at}");
        assert!(Duration::from_nanos(at.nanosecond().into()) < MARGIN, "{at}");
    }
    let times = calls.times();
    assert!(gaps(&times).iter().all(|gap| about(*gap, Duration::from_secs(300))));
    service.stop().await.unwrap();
}

async fn slow(Args((seconds,)): Args<(u64,)>) -> u64 {
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    seconds
}

#[tokio::test(start_paused = true)]
async fn an_rpc_call_times_out_after_rpc_timeout_of_the_test_clock() {
    let config = memory_test_config(&common::unique("sloth"));
    let sloth = config.service_name.clone();
    let routes = vec![Route::new(slow).entrypoint(RPCListener::new())];
    let service = TestService::start(routes, config.clone()).await.unwrap();
    let caller = config.with_service_name(common::unique("caller"));
    assert_eq!(caller.rpc_timeout, Duration::from_secs(30));
    let client = Client::connect(&caller).await.unwrap();

    let started = Instant::now();
    let error = client.call::<u64>(&sloth, "slow", [300], ()).await.unwrap_err();
    assert!(matches!(&error, RpcError::Timeout { after, .. } if *after == Duration::from_secs(30)));
    assert_eq!(started.elapsed(), Duration::from_secs(30));
    // a call that ends in time gets its own reply; the late one is dropped
    let patient = client.service(&sloth).timeout(Duration::from_secs(400));
    let started = Instant::now();
    assert_eq!(patient.call::<u64>("slow", [120], ()).await.unwrap(), 120);
    assert!(about(started.elapsed(), Duration::from_secs(120)), "{:?}", started.elapsed());
    client.close().await;
    service.stop().await.unwrap();
}

/// `MARGIN` before `deadline`.
fn just_before(deadline: Duration) -> Duration {
    deadline - MARGIN
}

/// A transport on a broker of this test's own.
fn private_broker() -> MemoryTransport {
    MemoryTransport::connect(&format!("memory://{}", common::unique("paused"))).unwrap()
}

fn text(body: &str) -> OutgoingMessage {
    OutgoingMessage { body: body.to_owned().into(), ..Default::default() }
}

async fn ready(transport: &MemoryTransport, queue: &str) -> Result<u32, TransportError> {
    Ok(transport.queue_info(queue).await?.message_count)
}

#[tokio::test(start_paused = true)]
async fn message_ttls_expire_on_the_test_clock() {
    let transport = private_broker();
    transport.declare_queue(&QueueSpec::durable("expired")).await.unwrap();
    let with_ttl = QueueSpec {
        arguments: Headers::from([
            ("x-message-ttl".to_owned(), HeaderValue::Int(60_000)),
            ("x-dead-letter-exchange".to_owned(), HeaderValue::from("")),
            ("x-dead-letter-routing-key".to_owned(), HeaderValue::from("expired")),
        ]),
        ..QueueSpec::durable("waiting")
    };
    transport.declare_queue(&with_ttl).await.unwrap();
    let options = PublishOptions::default();
    transport.publish("", "waiting", text("queue ttl"), options).await.unwrap();
    let mut short = text("message ttl");
    short.properties.expiration = Some("20000".to_owned());
    transport.publish("", "waiting", short, options).await.unwrap();

    tokio::time::sleep(just_before(Duration::from_secs(60))).await;
    // the head (60 s) holds the second message (20 s) back, as on RabbitMQ
    let counts = (ready(&transport, "waiting").await, ready(&transport, "expired").await);
    assert_eq!(counts, (Ok(2), Ok(0)));
    tokio::time::sleep(2 * MARGIN).await;
    let counts = (ready(&transport, "waiting").await, ready(&transport, "expired").await);
    assert_eq!(counts, (Ok(0), Ok(2)));
    let first = transport.get("expired").await.unwrap().unwrap();
    assert_eq!(&first.body[..], b"queue ttl");
    first.acker.ack().await.unwrap();

    transport.declare_queue(&QueueSpec::durable("alone")).await.unwrap();
    let mut alone = text("alone");
    alone.properties.expiration = Some("45000".to_owned());
    transport.publish("", "alone", alone, options).await.unwrap();
    tokio::time::sleep(just_before(Duration::from_secs(45))).await;
    assert_eq!(ready(&transport, "alone").await, Ok(1));
    tokio::time::sleep(2 * MARGIN).await;
    assert_eq!(ready(&transport, "alone").await, Ok(0));
    transport.close().await;
}

#[tokio::test(start_paused = true)]
async fn an_unused_queue_expires_on_the_test_clock() {
    let transport = private_broker();
    let leased = QueueSpec {
        arguments: Headers::from([("x-expires".to_owned(), HeaderValue::Int(3_600_000))]),
        ..QueueSpec::durable("leased")
    };
    transport.declare_queue(&leased).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3000)).await;
    // declaring it again renews the lease
    transport.declare_queue(&leased).await.unwrap();
    // looked at from the broker's side: a passive declare would renew the lease, as on
    // RabbitMQ
    let leased_now = || transport.broker().queue_names().contains(&"leased".to_owned());
    tokio::time::sleep(just_before(Duration::from_secs(3600))).await;
    assert!(leased_now(), "the lease was renewed 3000 s in");
    tokio::time::sleep(2 * MARGIN).await;
    assert!(!leased_now(), "an hour unused: gone");
    let gone = ready(&transport, "leased").await.unwrap_err();
    assert!(matches!(gone, TransportError::NotFound(_)), "{gone:?}");
    transport.close().await;
}

/// Records when it runs; its first run takes 25 s, two and a half intervals.
async fn long_first_run(Dep(calls): Dep<Arc<Calls>>) {
    let first = calls.count() == 0;
    calls.record(String::new());
    if first {
        tokio::time::sleep(Duration::from_secs(25)).await;
    }
}

/// The README's timer rule: a run longer than the interval skips the ticks it covered, and
/// the next run keeps to the interval's grid (Nameko fires as soon as the long run ends, 25 s
/// after it began here, then once more for each tick it covered).
#[tokio::test(start_paused = true)]
async fn a_run_longer_than_its_interval_skips_the_ticks_it_covered_and_keeps_to_the_grid() {
    let calls = Arc::new(Calls::default());
    let routes = vec![Route::new(long_first_run)
        .entrypoint(TimeEntrypoint::every(Duration::from_secs(10)))
        .dependency(Shared(calls.clone()))];
    let service = TestService::start(routes, memory_test_config("grid")).await.unwrap();
    while calls.count() < 3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    service.stop().await.unwrap();
    // the first run began on a tick and ended 25 s later, the ticks of 10 s and 20 s after
    // it skipped: the next run comes on the tick 30 s after it, then every 10 s
    let gaps = gaps(&calls.times()[..3]);
    let expected = [Duration::from_secs(30), Duration::from_secs(10)];
    for (gap, expected) in gaps.iter().zip(expected) {
        assert!(gap.abs_diff(expected) <= MARGIN, "gaps {gaps:?}, expected 30 s then 10 s");
    }
}

async fn as_long_as_its_interval(Dep(calls): Dep<Arc<Calls>>) {
    calls.record(String::new());
    tokio::time::sleep(Duration::from_secs(10)).await;
}

/// A run that ends on a tick has not outlasted it: the tick fires at once (as the Python
/// micro-framework's timer does). The tick was skipped, which halved the rate: 5 runs in
/// 105 s.
#[tokio::test(start_paused = true)]
async fn a_run_as_long_as_its_interval_is_followed_at_once_by_the_tick_it_ends_on() {
    let calls = Arc::new(Calls::default());
    let routes = vec![Route::new(as_long_as_its_interval)
        .entrypoint(TimeEntrypoint::every(Duration::from_secs(10)))
        .dependency(Shared(calls.clone()))];
    let service = TestService::start(routes, memory_test_config(&common::unique("ends_on_tick")))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(105)).await;
    service.stop().await.unwrap();
    let times = calls.times();
    assert_eq!(times.len(), 10, "a run every 10 s from 10 s to 100 s");
    assert!(gaps(&times).iter().all(|gap| about(*gap, Duration::from_secs(10))), "{times:?}");
}

/// A timer whose schedule has no further tick (an interval too long for the clock, as the
/// documentation of `every` allows) leaves the service running: it stopped itself at once,
/// `Runner::run` then returning `Ok` as if it had been asked to stop.
#[tokio::test(start_paused = true)]
async fn a_timer_without_a_further_tick_leaves_the_service_running() {
    let calls = Arc::new(Calls::default());
    let routes = vec![Route::new(tick)
        .entrypoint(TimeEntrypoint::every(Duration::MAX))
        .dependency(Shared(calls.clone()))];
    let service =
        TestService::start(routes, memory_test_config(&common::unique("never"))).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(service.is_ready(), "the service stopped by itself");
    service.stop().await.unwrap();
    assert_eq!(calls.count(), 0);
}

#[tokio::test]
async fn a_cron_expression_that_never_fires_is_refused_at_start() {
    let route = Route::new(tick)
        .entrypoint(TimeEntrypoint::cron("0 0 31 2 *").unwrap())
        .dependency(Shared(Arc::new(Calls::default())));
    let started = TestService::start(vec![route], memory_test_config(&common::unique("feb31")));
    let error = started.await.map(drop).unwrap_err().to_string();
    assert!(error.contains("\"0 0 31 2 *\" has no occurrence from now on"), "{error}");
}

/// A cron timer sleeps its whole wait on a paused clock: it woke each second of test time to
/// look at the wall clock, so a month of a nightly cron took over a minute of real time
/// (16.8 s a week). A generous bound: the month now takes milliseconds.
#[tokio::test(start_paused = true)]
async fn a_month_of_a_nightly_cron_passes_at_once_on_the_paused_clock() {
    let calls = Arc::new(Calls::default());
    let route = Route::new(tick)
        .entrypoint(TimeEntrypoint::cron("0 3 * * *").unwrap())
        .dependency(Shared(calls.clone()));
    let service = TestService::start(vec![route], memory_test_config(&common::unique("nightly")))
        .await
        .unwrap();
    let real = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(30 * 86_400)).await;
    let took = real.elapsed();
    service.stop().await.unwrap();
    let payloads: Vec<NaiveDateTime> = calls.payloads().iter().map(|p| fired_at(p)).collect();
    assert_eq!(payloads.len(), 30, "{payloads:?}");
    assert!(payloads.iter().all(|at| (at.hour(), at.minute(), at.second()) == (3, 0, 0)));
    assert!(took < Duration::from_secs(10), "a month of test time took {took:?}");
}
