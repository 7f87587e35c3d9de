//! Default log output for services started with [`Runner::start`](crate::Runner::start).

use tracing_subscriber::EnvFilter;

/// Install a readable stderr logger filtered by `RUST_LOG` (default `info`), unless the
/// program installed a `tracing` subscriber already.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
