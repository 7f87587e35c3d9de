//! Shared parts of the benchmark binaries.

pub mod bare;
pub mod cpu;
pub mod events;
pub mod footprint;
pub mod rpc;
pub mod workers;

/// How many bytes of padding each event or call carries: `PAYLOAD_BYTES` from the environment,
/// `default` unless set.
pub fn payload_bytes(default: usize) -> micro_framework::Result<usize> {
    match std::env::var("PAYLOAD_BYTES") {
        Ok(bytes) => bytes
            .parse()
            .map_err(|e| micro_framework::Error::Startup(format!("PAYLOAD_BYTES: {e}"))),
        Err(_) => Ok(default),
    }
}
