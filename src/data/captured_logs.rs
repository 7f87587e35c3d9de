//! For unit tests: what a piece of code logs.

use std::sync::{Arc, Mutex, OnceLock};

use tracing::level_filters::LevelFilter;
use tracing::subscriber::{Interest, Subscriber};
use tracing::{span, Dispatch, Event, Metadata};

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
        SECOND_DISPATCH.get_or_init(|| Dispatch::new(WantsNothing));
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

/// Registered for the life of the test binary, before any capture: with a capture alone,
/// `tracing` asks only the current thread's subscriber for a log line's interest when it first
/// reaches that line, and a thread with none caches "never" for every thread (a capture's
/// warning then lost while a test beside it reached the same line; a `tracing-core` bug).
/// With two subscribers registered it asks every live one, whichever thread gets there first.
static SECOND_DISPATCH: OnceLock<Dispatch> = OnceLock::new();

/// Wants no log line. Its level hint leaves `tracing`'s global level filter where the captures
/// set it: closed until the first capture registers, so no thread reaches a log line (and
/// caches its interest) while this subscriber is registered alone.
struct WantsNothing;

impl Subscriber for WantsNothing {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        Interest::never()
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::OFF)
    }

    fn enabled(&self, _: &Metadata<'_>) -> bool {
        false
    }

    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }

    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}

    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}

    fn event(&self, _: &Event<'_>) {}

    fn enter(&self, _: &span::Id) {}

    fn exit(&self, _: &span::Id) {}
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

#[cfg(test)]
mod tests {
    use super::Captured;

    fn reach_a_warning() {
        tracing::warn!("reached");
    }

    /// Another test's thread, with no subscriber, may reach a log line first while a capture
    /// lives: the capture still gets the line.
    #[test]
    fn a_capture_gets_a_line_another_thread_reached_first() {
        let captured = Captured::start(tracing::Level::WARN);
        std::thread::spawn(reach_a_warning).join().unwrap();
        reach_a_warning();
        assert!(captured.logged().contains("reached"), "{}", captured.logged());
    }
}
