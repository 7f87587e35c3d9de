//! Process worker modes (`process`, `greedy_process`): each call runs in one of the context's
//! worker processes, so a panic, abort, segfault, leak or overrun costs one call and one
//! process, never the service.
//!
//! The workers are the service's own binary re-executed (no `fork()` of a multi-threaded
//! process) with `MF_WORKER_SOCKET` set: the program's `main` runs again, including whatever
//! it sets up before `Runner::start`, and `Runner::start` then serves calls from the service
//! instead of consuming. Each worker has two Unix sockets to its service, carrying MessagePack
//! frames each written in one piece and read through a buffer each end keeps: calls and
//! outcomes on one (read by the calling task and by the worker's call thread themselves), and
//! on the other the workers' broker traffic (a `Producer` dispatching, an RPC call), which the
//! service does on their behalf, so dependencies work the same in a worker, on RabbitMQ and
//! on the in-process broker.

mod control;
#[cfg(test)]
mod fuzz;
mod launcher;
mod parent_transport;
mod pool;
mod protocol;
mod worker;

pub(crate) use pool::{ProcessPool, Reserved};
pub(crate) use protocol::BorrowedCall;
pub(crate) use worker::{
    claim_worker_environment, exit_when_orphaned, routes_digest, served_context, served_routes,
    served_service_name, stop_signals, worker_socket, WorkerLink,
};
pub use worker::{is_worker_process, WORKER_SOCKET_ENV};
