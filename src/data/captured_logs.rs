//! For unit tests: what a piece of code logs.

use std::sync::{Arc, Mutex};

/// What `run` returns, and every warning (and error) it logged, as plain text lines.
pub(crate) fn warnings_of<R>(run: impl FnOnce() -> R) -> (R, String) {
    let captured = Captured::start(tracing::Level::WARN);
    let returned = run();
    (returned, captured.logged())
}

/// Every log at a level and above on this thread while it lives: for code that awaits, on a
/// current-thread runtime.
pub(crate) struct Captured {
    logs: Arc<Mutex<Vec<u8>>>,
    _default: tracing::subscriber::DefaultGuard,
}

impl Captured {
    pub(crate) fn start(level: tracing::Level) -> Captured {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .with_writer(move || LogSink(sink.clone()))
            .finish();
        Captured { logs, _default: tracing::subscriber::set_default(subscriber) }
    }

    /// Everything logged so far, as plain text lines.
    pub(crate) fn logged(&self) -> String {
        String::from_utf8(self.logs.lock().unwrap().clone()).unwrap()
    }
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
