//! Test-support service for the fault tests: handles `fault_src.job` events whose payload is
//! `{"id": N}` by appending `N` to the file `RECORD_FILE` (one line per call, written before
//! the ack), sleeping `WORK_MS` per call. Config from the environment.

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

fn main() -> micro_framework::Result<()> {
    let path = std::env::var("RECORD_FILE")
        .map_err(|_| micro_framework::Error::Startup("RECORD_FILE is not set".into()))?;
    let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    if let Ok(mut record) = RECORD.lock() {
        *record = Some(file);
    }
    let config = Config::from_env()?;
    let routes = vec![Route::new(job).entrypoint(EventListener::new("fault_src", "job"))];
    Runner::new(routes, config).start()
}
