//! Process worker modes (`process`, `greedy_process`): each call runs in one of the context's
//! worker processes, so a panic, abort, segfault, leak or overrun costs one call and one
//! process, never the service.
//!
//! The workers are the service's own binary re-executed (no `fork()` of a multi-threaded
//! process) with `MF_WORKER_SOCKET` set: the program's `main` runs again, including whatever
//! it sets up before `Runner::start`, and `Runner::start` then serves calls from the service
//! instead of consuming. Calls and outcomes cross a Unix socket as JSON frames, each written by
//! the task that has it and read through a buffer each end keeps; the workers' broker
//! traffic (a `Producer` dispatching, an RPC call) is done by the service on their behalf, so
//! dependencies work the same in a worker, on RabbitMQ and on the in-process broker.

#[cfg(test)]
mod fuzz;
mod pool;
mod protocol;
mod worker;

pub(crate) use pool::ProcessPool;
pub(crate) use protocol::BorrowedCall;
pub use worker::WORKER_SOCKET_ENV;
pub(crate) use worker::{worker_socket, WorkerLink};
