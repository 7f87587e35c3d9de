//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use micro_framework::Config;

/// The brokers every transport-parameterized test runs against: a private in-process broker
/// always, and RabbitMQ when `MF_TEST_AMQP_URI` is set.
pub fn broker_uris() -> Vec<String> {
    let mut uris = vec![format!("memory://test-{}", uuid::Uuid::new_v4())];
    if let Ok(uri) = std::env::var("MF_TEST_AMQP_URI") {
        uris.push(uri);
    }
    uris
}

/// A config for a uniquely named service (so queues never collide between tests).
pub fn config(uri: &str, service: &str) -> Config {
    let unique = format!("{service}_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    Config { amqp_uri: uri.to_owned(), ..Config::new(unique) }
}

/// Counts calls, measures concurrency, and can hold calls until released.
#[derive(Debug, Default)]
pub struct Probe {
    pub started: AtomicU64,
    pub finished: AtomicU64,
    running: AtomicUsize,
    pub max_running: AtomicUsize,
    gate: Mutex<bool>,
    opened: Condvar,
    pub seen: Mutex<Vec<serde_json::Value>>,
}

impl Probe {
    pub fn new() -> Arc<Self> {
        Arc::new(Probe { gate: Mutex::new(true), ..Probe::default() })
    }

    /// A probe whose calls wait in `enter` until `open` is called.
    pub fn closed() -> Arc<Self> {
        Arc::new(Probe { gate: Mutex::new(false), ..Probe::default() })
    }

    /// Record a call starting, and wait for the gate.
    pub fn enter(&self, payload: serde_json::Value) {
        self.started.fetch_add(1, Ordering::SeqCst);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        self.seen.lock().unwrap().push(payload);
        let mut open = self.gate.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
    }

    /// Record a call finishing.
    pub fn leave(&self) {
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.finished.fetch_add(1, Ordering::SeqCst);
    }

    pub fn open(&self) {
        *self.gate.lock().unwrap() = true;
        self.opened.notify_all();
    }

    pub fn started(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
    }

    /// Wait (up to 10 s) until `count` calls have started.
    pub async fn wait_started(&self, count: u64) {
        wait_until(|| self.started() >= count, "calls to start").await;
    }
}

/// Poll `condition` every 5 ms for up to 10 s; panic with `what` if it never holds.
pub async fn wait_until(mut condition: impl FnMut() -> bool, what: &str) {
    for _ in 0..2000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out waiting for {what}");
}
