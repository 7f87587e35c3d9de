//! Retries: [`AsyncBackOff`] schedules a failed message again on the broker after a delay
//! (the worker is freed at once), for routes that take their messages from a queue (events,
//! work queues; elsewhere it retries nothing, and the start-up warns of it); [`BackOff`]
//! retries inside the worker, on any route, for short transient errors. When no retry remains, a `CallbackRoute`'s callback runs, or the message goes to
//! the dead-letter queue.
//!
//! ```
//! use std::time::Duration;
//! use micro_framework::prelude::*;
//! use micro_framework::retry::{AsyncBackOff, BackOff, Interval};
//!
//! fn charge() -> Result<(), std::io::Error> { Ok(()) }
//!
//! // 5 retries after the first attempt, 10 s apart, on the broker (the Python original's
//! // example).
//! let on_the_broker = AsyncBackOff::new(5, Duration::from_millis(10_000));
//! // Exponential delays, only for I/O errors anywhere in the error's source chain.
//! let io_only = AsyncBackOff::new(8, Duration::from_millis(100))
//!     .interval(Interval::exponential(Duration::from_millis(100), 2.0, Duration::from_secs(60)))
//!     .retry_on::<std::io::Error>();
//! // In the worker, 3 quick retries.
//! let quick = BackOff::new(3, Duration::from_millis(50));
//! let route = Route::new(charge).backoff(io_only);
//! ```
//!
//! `max_retries` counts retries after the first attempt: `0` means no retry (the Python
//! original read 0 as "for ever"); for no limit, say so with [`BackOffPolicy::unlimited`].

mod interval;

use std::error::Error as StdError;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

pub use crate::data::{BackOffData, HEADER_LAST_ERROR, HEADER_LAST_RETRY, HEADER_RETRY_COUNT};
use crate::handler::outcome::panic_message;
pub use interval::{Interval, IntervalFn};

type ErrorTest = Arc<dyn Fn(&(dyn StdError + 'static)) -> bool + Send + Sync>;

/// The steps of jitter under `RETRY_DELAY=delay_queues` (see [`BackOffPolicy::delay_in_steps`]).
const JITTER_STEPS: u32 = 8;

/// Where retries wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryMode {
    /// On the broker (a delay queue, or the delayed-message plugin, as `RETRY_DELAY` says);
    /// the worker is freed during the delay.
    Broker,
    /// In the worker, which sleeps and calls again.
    InWorker,
}

/// A retry policy: how many retries, how far apart, for which errors, and where they wait.
/// Built with [`AsyncBackOff::new`] or [`BackOff::new`].
#[derive(Clone)]
pub struct BackOffPolicy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// Delay before each retry.
    pub interval: Interval,
    /// Where retries wait.
    pub mode: RetryMode,
    /// Random extra delay, as a fraction of the delay (0.0 to 1.0).
    pub jitter: f64,
    filters: Vec<ErrorTest>,
}

/// Broker-side retries (the Python micro-framework's `AsyncBackOff`): the failed message is published to a
/// delay queue whose per-queue TTL dead-letters it back to the route's queue, or, under
/// `RETRY_DELAY=delayed_message_plugin`, wrapped as the Python original wraps it to the
/// plugin's exchange, from which the route's backoff queue gets it back. Only a message taken
/// from a queue can be published again: on an RPC, HTTP, WebSocket or timer route the first
/// failure is final (the start-up warns of it; [`BackOff`] retries there).
///
/// See [`CallbackRoute`](crate::CallbackRoute)'s example.
#[derive(Debug)]
pub struct AsyncBackOff;

impl AsyncBackOff {
    /// `max_retries` retries after the first attempt, `interval` apart.
    // A constructor of `BackOffPolicy`, named after the Python micro-framework's class.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(max_retries: u32, interval: Duration) -> BackOffPolicy {
        BackOffPolicy::new(max_retries, interval, RetryMode::Broker)
    }
}

/// In-worker retries: the worker sleeps `interval` and calls the target again.
///
/// See [`Route`](crate::Route)'s example.
#[derive(Debug)]
pub struct BackOff;

impl BackOff {
    /// `max_retries` retries after the first attempt, `interval` apart.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(max_retries: u32, interval: Duration) -> BackOffPolicy {
        BackOffPolicy::new(max_retries, interval, RetryMode::InWorker)
    }
}

impl BackOffPolicy {
    fn new(max_retries: u32, interval: Duration, mode: RetryMode) -> Self {
        BackOffPolicy {
            max_retries,
            interval: Interval::Constant(interval),
            mode,
            jitter: 0.0,
            filters: Vec::new(),
        }
    }

    /// Retry without limit.
    pub fn unlimited(mut self) -> Self {
        self.max_retries = u32::MAX;
        self
    }

    /// Use another interval provider (linear, exponential).
    pub fn interval(mut self, interval: Interval) -> Self {
        self.interval = interval;
        self
    }

    /// Add up to `fraction` (0.0 to 1.0) of each delay at random; a fraction that is no number
    /// (NaN) adds nothing.
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = jitter_fraction(fraction);
        self
    }

    /// Retry errors of type `E` found anywhere in the error's source chain. With any filter
    /// set, errors that match none fail at once (panics too).
    pub fn retry_on<E: StdError + 'static>(mut self) -> Self {
        self.filters.push(Arc::new(|error| {
            let mut current = Some(error);
            while let Some(error) = current {
                if error.is::<E>() {
                    return true;
                }
                current = error.source();
            }
            false
        }));
        self
    }

    /// Retry errors for which `predicate` holds.
    pub fn retry_if(
        mut self,
        predicate: impl Fn(&(dyn StdError + 'static)) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.filters.push(Arc::new(predicate));
        self
    }

    /// Whether a failure with this error (none for a panic or a time-out) may be retried.
    /// A filter that panics retries nothing.
    pub fn accepts(&self, error: Option<&(dyn StdError + 'static)>) -> bool {
        self.try_accepts(error).unwrap_or(false)
    }

    /// [`BackOffPolicy::accepts`], or why the filters cannot say: one panicked (user code on
    /// an error it did not expect), which must not end the task that holds the message.
    pub(crate) fn try_accepts(
        &self,
        error: Option<&(dyn StdError + 'static)>,
    ) -> Result<bool, String> {
        if self.filters.is_empty() {
            return Ok(true);
        }
        let judged = || error.is_some_and(|error| self.filters.iter().any(|filter| filter(error)));
        catch_unwind(AssertUnwindSafe(judged)).map_err(|panic| {
            format!("the retry filter panicked: {}", panic_message(panic.as_ref()))
        })
    }

    /// The delay before retry number `retry` (1-based), jitter included.
    pub fn delay(&self, retry: u32) -> Duration {
        self.jittered(retry, |random| random)
    }

    /// [`BackOffPolicy::delay`] for retries that wait in delay queues
    /// (`RETRY_DELAY=delay_queues`), where each distinct delay (in milliseconds) takes a queue
    /// of its own: the jitter is rounded to steps of 1/8 of its range, so a retry number waits
    /// in one of at most 9 queues (delay × (1 + jitter × k/8), k = 0..=8) instead of one per
    /// millisecond drawn. Without jitter the delay is [`BackOffPolicy::delay`]'s.
    pub(crate) fn delay_in_steps(&self, retry: u32) -> Duration {
        let steps = f64::from(JITTER_STEPS);
        self.jittered(retry, |random| (random * steps).round() / steps)
    }

    /// The delay before `retry` ([`BackOffPolicy::delay_in_steps`] when `in_steps`), or why
    /// there is none: an [`Interval::custom`] function panicked.
    pub(crate) fn try_delay(&self, retry: u32, in_steps: bool) -> Result<Duration, String> {
        let delay = || match in_steps {
            true => self.delay_in_steps(retry),
            false => self.delay(retry),
        };
        catch_unwind(AssertUnwindSafe(delay)).map_err(|panic| {
            format!("the retry interval panicked: {}", panic_message(panic.as_ref()))
        })
    }

    /// The delay before `retry` with a random jitter in 0.0..=1.0 of its range, as `draw`
    /// rounds it.
    fn jittered(&self, retry: u32, draw: impl Fn(f64) -> f64) -> Duration {
        let base = self.interval.delay(retry);
        // the field is public: what the setter refuses can be written to it directly
        let jitter = jitter_fraction(self.jitter);
        if jitter == 0.0 {
            return base;
        }
        let random = draw(f64::from(uuid::Uuid::new_v4().as_u128() as u32) / f64::from(u32::MAX));
        // in whole milliseconds, as the interval is: through seconds in floating point, 1.001 s
        // came back as 1000.999... ms, and the jitter that only adds took a millisecond off
        let base = u64::try_from(base.as_millis()).unwrap_or(u64::MAX);
        let extra = (base as f64 * jitter * random).round() as u64;
        Duration::from_millis(base.saturating_add(extra))
    }
}

/// A jitter as a fraction from 0.0 to 1.0: NaN passes through `clamp` and would make every
/// delay 0, retries without a pause.
fn jitter_fraction(fraction: f64) -> f64 {
    if fraction.is_nan() {
        0.0
    } else {
        fraction.clamp(0.0, 1.0)
    }
}

impl fmt::Debug for BackOffPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackOffPolicy")
            .field("max_retries", &self.max_retries)
            .field("interval", &self.interval)
            .field("mode", &self.mode)
            .field("jitter", &self.jitter)
            .field("filters", &self.filters.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("wrapped")]
    struct Wrapped(#[source] std::io::Error);

    #[test]
    fn filters_match_through_the_source_chain() {
        let policy = AsyncBackOff::new(1, Duration::ZERO).retry_on::<std::io::Error>();
        let wrapped = Wrapped(std::io::Error::other("disk"));
        assert!(policy.accepts(Some(&wrapped)));
        let other = std::fmt::Error;
        assert!(!policy.accepts(Some(&other)));
        assert!(!policy.accepts(None));
        assert!(AsyncBackOff::new(1, Duration::ZERO).accepts(None));
    }

    #[test]
    fn a_jitter_that_is_no_number_adds_nothing() {
        let base = Duration::from_millis(100);
        let policy = AsyncBackOff::new(1, base).jitter(f64::NAN);
        assert_eq!((policy.delay(1), policy.delay_in_steps(1)), (base, base));
    }

    #[test]
    fn a_jitter_written_to_the_field_is_held_as_the_setter_holds_it() {
        let base = Duration::from_secs(1);
        let mut policy = AsyncBackOff::new(1, base);
        policy.jitter = f64::NAN;
        assert_eq!((policy.delay(1), policy.delay_in_steps(1)), (base, base));
        policy.jitter = f64::INFINITY;
        assert!(policy.delay(1) <= base * 2, "at most the whole delay added");
        let set = AsyncBackOff::new(1, base).jitter(5.0);
        assert_eq!(set.jitter, 1.0, "the setter holds a fraction to 0.0..=1.0");
        assert!((0..20).all(|_| set.delay(1) <= base * 2));
        let mut interval = Interval::exponential(base, 2.0, Duration::from_secs(60));
        if let Interval::Exponential { factor, .. } = &mut interval {
            *factor = f64::NAN;
        }
        assert_eq!(interval.delay(3), base, "a factor that is no number does not grow");
    }

    #[test]
    fn jitter_keeps_every_millisecond_of_the_interval() {
        // a jitter whose extra is far below a millisecond: through seconds in floating point,
        // 1001 ms came back as 1000
        for ms in [1001, 1003, 1235, 2047, 123_457] {
            let base = Duration::from_millis(ms);
            let policy = AsyncBackOff::new(1, base).jitter(f64::MIN_POSITIVE);
            let in_worker = BackOff::new(1, base).jitter(f64::MIN_POSITIVE);
            assert_eq!((policy.delay(1), in_worker.delay(1)), (base, base), "{ms} ms");
        }
    }

    #[test]
    fn an_exponential_interval_grows_at_every_retry_up_to_its_cap() {
        let hour = Duration::from_secs(3600);
        // 1 ms * 1.001^10000 = 21.9 s (the exponent stopped at 1000: 2 ms)
        let slow = Interval::exponential(Duration::from_millis(1), 1.001, hour);
        assert_eq!(slow.delay(10_001), Duration::from_millis(21_916));
        let fast = Interval::exponential(Duration::from_millis(1), 2.0, hour);
        assert_eq!(fast.delay(u32::MAX), hour);
        let from_zero = Interval::exponential(Duration::ZERO, 2.0, hour);
        assert_eq!(from_zero.delay(u32::MAX), Duration::ZERO);
    }

    #[test]
    fn jitter_only_adds() {
        let policy = BackOff::new(1, Duration::from_millis(100)).jitter(0.5);
        for _ in 0..20 {
            let delay = policy.delay(1);
            assert!(delay >= Duration::from_millis(100) && delay <= Duration::from_millis(150));
        }
    }

    #[test]
    fn jitter_in_steps_takes_at_most_nine_delays() {
        let policy = AsyncBackOff::new(5, Duration::from_secs(10)).jitter(0.5);
        let delays: std::collections::BTreeSet<Duration> =
            (0..2000).map(|_| policy.delay_in_steps(1)).collect();
        assert!(delays.len() <= 9, "{} distinct delays: {delays:?}", delays.len());
        assert!(delays.len() > 1, "still jittered");
        for delay in &delays {
            let extra = delay.as_millis() - 10_000;
            assert!(extra <= 5_000 && extra % 625 == 0, "{delay:?} is no step of 625 ms");
        }
        let plain = AsyncBackOff::new(1, Duration::from_millis(1234));
        assert_eq!(plain.delay_in_steps(1), Duration::from_millis(1234));
    }
}
