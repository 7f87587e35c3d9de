//! Shared parts of the benchmarks.

pub mod cpu;
pub mod events;
pub mod rpc;
