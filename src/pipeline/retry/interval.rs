//! [`Interval`]: how long to wait before each retry.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The delay before retry number `n` (1 for the first retry).
///
/// ```
/// use std::time::Duration;
/// use micro_framework::retry::Interval;
///
/// let exponential = Interval::exponential(Duration::from_millis(100), 2.0, Duration::from_secs(1));
/// assert_eq!(exponential.delay(1), Duration::from_millis(100));
/// assert_eq!(exponential.delay(3), Duration::from_millis(400));
/// assert_eq!(exponential.delay(10), Duration::from_secs(1)); // capped
///
/// let linear = Interval::linear_capped(Duration::from_secs(1), Duration::from_secs(2), Duration::from_secs(4));
/// assert_eq!(linear.delay(2), Duration::from_secs(3));
/// assert_eq!(linear.delay(5), Duration::from_secs(4)); // capped, as LinearIntervalProvider's max_interval
///
/// // any function of the retry number
/// let squares = Interval::custom(|retry| Duration::from_millis(u64::from(retry * retry) * 10));
/// assert_eq!(squares.delay(3), Duration::from_millis(90));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub enum Interval {
    /// The same delay every time.
    Constant(Duration),
    /// `start`, then `start + step`, `start + 2 * step`, ..., never more than `max`.
    Linear {
        /// First delay.
        start: Duration,
        /// Added at each retry.
        step: Duration,
        /// Cap (`Duration::MAX`: none).
        max: Duration,
    },
    /// `start`, then multiplied by `factor` at each retry, never more than `max`.
    Exponential {
        /// First delay.
        start: Duration,
        /// Growth per retry.
        factor: f64,
        /// Cap.
        max: Duration,
    },
    /// A function of the retry number (1 for the first retry).
    Custom(IntervalFn),
}

/// The function of an [`Interval::Custom`]. Two are equal when they are the same function
/// value (clones of one `Interval`).
#[derive(Clone)]
pub struct IntervalFn(Arc<dyn Fn(u32) -> Duration + Send + Sync>);

impl fmt::Debug for IntervalFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IntervalFn(..)")
    }
}

impl PartialEq for IntervalFn {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Interval {
    /// Linear growth, without a cap.
    pub fn linear(start: Duration, step: Duration) -> Self {
        Interval::Linear { start, step, max: Duration::MAX }
    }

    /// Linear growth, never more than `max` (the Python original's
    /// `LinearIntervalProvider(max_interval=...)`).
    pub fn linear_capped(start: Duration, step: Duration, max: Duration) -> Self {
        Interval::Linear { start, step, max }
    }

    /// The delay `delay(retry)` returns for retry number `retry` (1-based).
    pub fn custom(delay: impl Fn(u32) -> Duration + Send + Sync + 'static) -> Self {
        Interval::Custom(IntervalFn(Arc::new(delay)))
    }

    /// Exponential growth with a cap.
    pub fn exponential(start: Duration, factor: f64, max: Duration) -> Self {
        Interval::Exponential { start, factor, max }
    }

    /// The delay before retry number `retry` (1-based), in whole milliseconds.
    pub fn delay(&self, retry: u32) -> Duration {
        let index = retry.saturating_sub(1);
        let delay = match self {
            Interval::Constant(delay) => *delay,
            Interval::Linear { start, step, max } => {
                start.saturating_add(step.saturating_mul(index)).min(*max)
            }
            Interval::Exponential { start, factor, max } => {
                // grows with every retry up to the cap (an infinite growth is the cap, a zero
                // start stays zero); a factor below 1 or no number (NaN), which the public
                // variant can hold, does not grow
                let grown = start.as_secs_f64() * factor.max(1.0).powf(f64::from(index));
                match start.is_zero() {
                    true => Duration::ZERO,
                    false => Duration::try_from_secs_f64(grown).unwrap_or(*max).min(*max),
                }
            }
            Interval::Custom(IntervalFn(delay)) => delay(retry),
        };
        Duration::from_millis(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))
    }
}
