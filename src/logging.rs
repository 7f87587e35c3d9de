//! Default log output for services started with [`Runner::start`](crate::Runner::start).

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Install a stderr logger filtered by `RUST_LOG` (default `info`): readable lines, or one
/// JSON object per line (with the `call` span's service, route and call ids) for
/// `LOG_FORMAT=json`. Does nothing if the program installed a `tracing` subscriber already.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
    };
}
