//! [`Interval`]: how long to wait before each retry.

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
/// ```
#[derive(Clone, Debug, PartialEq)]
pub enum Interval {
    /// The same delay every time.
    Constant(Duration),
    /// `start`, then `start + step`, `start + 2 * step`, ...
    Linear {
        /// First delay.
        start: Duration,
        /// Added at each retry.
        step: Duration,
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
}

impl Interval {
    /// Linear growth.
    pub fn linear(start: Duration, step: Duration) -> Self {
        Interval::Linear { start, step }
    }

    /// Exponential growth with a cap.
    pub fn exponential(start: Duration, factor: f64, max: Duration) -> Self {
        Interval::Exponential { start, factor: factor.max(1.0), max }
    }

    /// The delay before retry number `retry` (1-based), in whole milliseconds.
    pub fn delay(&self, retry: u32) -> Duration {
        let index = retry.saturating_sub(1);
        let delay = match self {
            Interval::Constant(delay) => *delay,
            Interval::Linear { start, step } => start.saturating_add(step.saturating_mul(index)),
            Interval::Exponential { start, factor, max } => {
                let grown = start.as_secs_f64() * factor.powi(index.min(1000) as i32);
                Duration::try_from_secs_f64(grown).unwrap_or(*max).min(*max)
            }
        };
        Duration::from_millis(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))
    }
}
