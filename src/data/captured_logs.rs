//! For unit tests: what a piece of code logs.

use std::sync::{Arc, Mutex};

/// What `run` returns, and every warning (and error) it logged, as plain text lines.
pub(crate) fn warnings_of<R>(run: impl FnOnce() -> R) -> (R, String) {
    let logs = Arc::new(Mutex::new(Vec::new()));
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || LogSink(sink.clone()))
        .finish();
    let returned = tracing::subscriber::with_default(subscriber, run);
    let bytes = logs.lock().unwrap().clone();
    (returned, String::from_utf8(bytes).unwrap())
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
