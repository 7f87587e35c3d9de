//! The two services of the soak, run by `soak --role a|b` (and B's worker processes, which
//! are the same binary started again by the framework).
//!
//! Delivery guarantees, so that every id really gets through:
//! - Event routes retry every failure on the broker for ever (`AsyncBackOff` unlimited, 1 s
//!   apart): a failed RPC call, a failed dispatch or a worker process killed mid-call
//!   (`crashed`) schedule the message again instead of dead-lettering it. The targets fail
//!   only for transient reasons, so "for ever" ends.
//! - RPC methods reply their failure (a killed worker is replied as an error); the caller
//!   retries: A's `on_job` through its retry, the driver in its call loop.
//! - Each execution that completes the path reports `handled{id, exec}` with a fresh `exec`
//!   id, published with confirms before the target returns, so a redelivered report is not
//!   counted twice and a second execution is.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use micro_framework::amqp::dependencies::{Producer, RpcProxy};
use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::amqp::rpc::Args;
use micro_framework::dependencies::Shared;
use micro_framework::prelude::*;
use micro_framework::retry::{AsyncBackOff, BackOffPolicy};
use serde::Deserialize;
use serde_json::json;

use crate::{Names, Role};

/// How long each call of B works, so that B's worker processes are often mid-call.
const WORK: Duration = Duration::from_millis(10);

/// Worker processes of B, calls running at once in A.
pub const B_WORKERS: usize = 3;
const A_WORKERS: usize = 4;

/// The payload of `job` and `forward`, and the argument of `stamp` and `work`.
#[derive(Deserialize)]
pub struct Id {
    pub id: u64,
}

/// What A needs to know: B's name.
#[derive(Clone)]
struct Peers {
    b: String,
}

/// B's calls mark their worker process busy in this directory (a file named after the pid)
/// while they run, so the soak can kill a worker in the middle of a call.
#[derive(Clone)]
struct Busy(Arc<PathBuf>);

struct BusyMark(PathBuf);

impl Busy {
    fn mark(&self) -> BusyMark {
        let path = self.0.join(std::process::id().to_string());
        let _ = std::fs::write(&path, b"");
        BusyMark(path)
    }
}

impl Drop for BusyMark {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The busy directory of a run.
pub fn busy_dir(dir: &Path) -> PathBuf {
    dir.join("busy")
}

fn retry_for_ever() -> BackOffPolicy {
    AsyncBackOff::new(0, Duration::from_secs(1)).unlimited()
}

/// A: the driver's `job` → B's `stamp` over RPC → event `forward` to B.
async fn on_job(
    Payload(job): Payload<Id>,
    rpc: RpcProxy,
    producer: Producer,
    Dep(peers): Dep<Peers>,
) -> Result<(), String> {
    let stamped: u64 = rpc
        .service(peers.b.clone())
        .call("stamp", [job.id], ())
        .await
        .map_err(|error| format!("stamp({}): {error}", job.id))?;
    if stamped != job.id {
        return Err(format!("stamp({}) returned {stamped}", job.id));
    }
    producer.dispatch("forward", &json!({ "id": job.id })).await.map_err(|e| e.to_string())
}

/// B, RPC: returns its argument.
async fn stamp(Args(Id { id }): Args<Id>, Dep(busy): Dep<Busy>) -> u64 {
    let _busy = busy.mark();
    tokio::time::sleep(WORK).await;
    id
}

/// B, event `forward` from A: the end of the event path.
async fn on_forward(
    Payload(job): Payload<Id>,
    producer: Producer,
    Dep(busy): Dep<Busy>,
) -> Result<(), String> {
    let _busy = busy.mark();
    tokio::time::sleep(WORK).await;
    report(&producer, job.id).await
}

/// B, RPC from the driver: the end of the RPC path.
async fn work(
    Args(Id { id }): Args<Id>,
    producer: Producer,
    Dep(busy): Dep<Busy>,
) -> Result<u64, String> {
    let _busy = busy.mark();
    tokio::time::sleep(WORK).await;
    report(&producer, id).await?;
    Ok(id)
}

/// Tell the driver that `id` was handled, by this execution.
async fn report(producer: &Producer, id: u64) -> Result<(), String> {
    let exec = uuid::Uuid::new_v4().simple().to_string();
    let report = json!({ "id": id, "exec": exec, "pid": std::process::id() });
    producer.dispatch("handled", &report).await.map_err(|error| error.to_string())
}

/// Run `role` until SIGTERM (logs on stderr, filtered by `RUST_LOG`).
pub fn serve(role: Role, names: &Names, dir: &Path) -> micro_framework::Result<()> {
    let uri = std::env::var("AMQP_URI").unwrap_or_else(|_| crate::DEFAULT_URI.to_owned());
    let base = names.config(&uri, names.service(role));
    let (routes, config) = match role {
        Role::A => {
            let peers = Peers { b: names.service(Role::B) };
            let routes = vec![Route::new(on_job)
                .entrypoint(EventListener::new(names.driver(), "job"))
                .backoff(retry_for_ever())
                .dependency(Shared(peers))];
            (routes, base.with_max_workers(A_WORKERS).with_worker_mode(WorkerMode::Thread))
        }
        Role::B => {
            let busy = Busy(Arc::new(busy_dir(dir)));
            let routes = vec![
                Route::new(on_forward)
                    .entrypoint(EventListener::new(names.service(Role::A), "forward"))
                    .backoff(retry_for_ever())
                    .dependency(Shared(busy.clone())),
                Route::new(stamp).entrypoint(RPCListener::new()).dependency(Shared(busy.clone())),
                Route::new(work).entrypoint(RPCListener::new()).dependency(Shared(busy)),
            ];
            (routes, base.with_max_workers(B_WORKERS).with_worker_mode(WorkerMode::Process))
        }
    };
    Runner::new(routes, config).start()
}
