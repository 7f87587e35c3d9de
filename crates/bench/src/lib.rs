//! Shared parts of the benchmark binaries.

pub mod cpu;
pub mod events;
pub mod footprint;
pub mod rpc;
pub mod workers;
