//! Shared parts of the benchmark binaries.

pub mod bare;
pub mod cpu;
pub mod events;
pub mod footprint;
pub mod rpc;
pub mod workers;
