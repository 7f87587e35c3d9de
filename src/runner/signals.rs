//! Waiting for SIGINT / SIGTERM, and the graceful stop (then the forced exit) they ask for.

use tokio_util::sync::CancellationToken;

use crate::error::Result;

/// Resolves at the first SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() -> Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = terminate.recv() => Ok("SIGTERM"),
            _ = interrupt.recv() => Ok("SIGINT"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await?;
        Ok("Ctrl-C")
    }
}

/// Cancel `stop` at the first SIGINT or SIGTERM, and exit the process at the second.
pub(super) async fn stop_on_signals(stop: CancellationToken) {
    match shutdown_signal().await {
        Ok(signal) => {
            tracing::info!("{signal} received: stopping gracefully (send it again to force)");
            stop.cancel();
        }
        Err(error) => {
            tracing::error!("cannot wait for signals ({error}); stopping");
            stop.cancel();
            return;
        }
    }
    if shutdown_signal().await.is_ok() {
        tracing::error!("second signal: exiting now");
        std::process::exit(130);
    }
}
