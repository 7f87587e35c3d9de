//! [`SlowStartWhenArmed`]: a dependency that makes the worker processes a service starts from
//! now on slow to start, or unable to, for tests of worker replacement.

use std::time::Duration;

use micro_framework::dependencies::{Dependency, SetupContext};
use micro_framework::spawners::process::is_worker_process;
use micro_framework::{BoxError, WorkerContext};

/// The file that, while it exists, makes the workers of `service` start slowly.
pub fn armed_file(service: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("mf-slow-start-{service}"))
}

/// In a worker process started while its service's [`armed_file`] says `slow`, the set-up
/// takes 5 s (a program whose own set-up is slow: the seed's `django.setup()`); while it says
/// `fail`, the set-up fails (a database down), so that no replacement can start.
pub struct SlowStartWhenArmed;

#[micro_framework::async_trait]
impl Dependency for SlowStartWhenArmed {
    type Output = ();

    async fn setup(&self, _: &SetupContext) -> Result<(), BoxError> {
        let service = std::env::var("MF_WORKER_SERVICE_NAME").unwrap_or_default();
        let armed = std::fs::read_to_string(armed_file(&service)).ok();
        match armed.as_deref() {
            Some("slow") if is_worker_process() => tokio::time::sleep(Duration::from_secs(5)).await,
            Some("fail") if is_worker_process() => return Err("the database is down".into()),
            _ => {}
        }
        Ok(())
    }

    async fn get(&self, _: &WorkerContext) -> Result<(), BoxError> {
        Ok(())
    }
}
