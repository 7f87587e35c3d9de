//! Test-support service for the fault tests: handles `fault_src.job` events whose payload is
//! `{"id": N}` by appending `N` to the file `RECORD_FILE` (one line per call, written before
//! the ack), sleeping `WORK_MS` per call. With `SETUP_MS`, a dependency's set-up writes
//! `setup` to the file and then takes that long (a service slow to start). Config from the
//! environment.

use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::prelude::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct Job {
    id: u64,
}

static RECORD: Mutex<Option<std::fs::File>> = Mutex::new(None);

fn job(Payload(job): Payload<Job>) -> Result<(), std::io::Error> {
    let work_ms = std::env::var("WORK_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    std::thread::sleep(Duration::from_millis(work_ms));
    let mut guard = RECORD.lock().map_err(|_| std::io::Error::other("poisoned"))?;
    let file = guard.as_mut().ok_or_else(|| std::io::Error::other("no record file"))?;
    writeln!(file, "{}", job.id)
}

/// A dependency whose set-up takes `SETUP_MS`, once it has written `setup` to the record.
struct SlowStart(Duration);

#[derive(Clone)]
struct Started;

#[micro_framework::async_trait]
impl micro_framework::dependencies::Dependency for SlowStart {
    type Output = Started;

    async fn setup(
        &self,
        _setup: &micro_framework::dependencies::SetupContext,
    ) -> Result<(), micro_framework::BoxError> {
        write_setup()?;
        tokio::time::sleep(self.0).await;
        Ok(())
    }

    async fn get(
        &self,
        _call: &micro_framework::WorkerContext,
    ) -> Result<Started, micro_framework::BoxError> {
        Ok(Started)
    }
}

fn write_setup() -> Result<(), std::io::Error> {
    let mut guard = RECORD.lock().map_err(|_| std::io::Error::other("poisoned"))?;
    let file = guard.as_mut().ok_or_else(|| std::io::Error::other("no record file"))?;
    writeln!(file, "setup")
}

fn main() -> micro_framework::Result<()> {
    let path = std::env::var("RECORD_FILE")
        .map_err(|_| micro_framework::Error::Startup("RECORD_FILE is not set".into()))?;
    let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    if let Ok(mut record) = RECORD.lock() {
        *record = Some(file);
    }
    let config = Config::from_env()?;
    let routes = vec![Route::new(job).entrypoint(EventListener::new("fault_src", "job"))];
    let runner = Runner::new(routes, config);
    match std::env::var("SETUP_MS").ok().and_then(|ms| ms.parse().ok()) {
        Some(ms) => runner.dependency(SlowStart(Duration::from_millis(ms))).start(),
        None => runner.start(),
    }
}
