//! Recording fakes of the built-in dependencies: [`FakeProducer`] replaces
//! [`Producer`](crate::amqp::dependencies::Producer), [`FakeRpc`] replaces
//! [`RpcProxy`](crate::amqp::dependencies::RpcProxy). Each is a
//! [`Dependency`](crate::dependencies::Dependency) added like any other, with
//! `Route::dependency(fake.clone())` or `Runner::dependency(fake.clone())`; the test keeps
//! its clone to read what was recorded.
//!
//! Fakes record in the memory of the process that made them, so they serve the worker modes
//! that run calls in the service's process (`thread`, `greedy_thread`). In the process modes
//! a call runs in a re-executed copy of the program whose records the test never sees: there
//! the fake fails the call, saying so, instead of recording where nobody looks.

mod producer;
mod rpc;

pub use producer::{DispatchedEvent, FakeProducer};
pub use rpc::{FakeRpc, RecordedCall};

use crate::data::BoxError;

/// Refuse to provide `fake` to a call that runs in a worker process.
fn refuse_in_worker_process(fake: &str) -> Result<(), BoxError> {
    #[cfg(feature = "process")]
    if crate::pipeline::spawners::process::worker_socket().is_some() {
        return Err(format!(
            "{fake} cannot serve a call in a worker process (WORKER_MODE=process or \
             greedy_process): it records in the test's process, which would never see this \
             call; run the route in WORKER_MODE=thread or greedy_thread to use fakes"
        )
        .into());
    }
    #[cfg(not(feature = "process"))]
    let _ = fake;
    Ok(())
}
