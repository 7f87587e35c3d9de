//! Wall-clock time by tokio's clock, so that what a service stamps or schedules by the wall
//! clock (timer payloads, cron schedules, retry and dead-letter timestamps) moves with a
//! paused test clock (`tokio::time::pause`) as its sleeps and timeouts do.
//!
//! The wall time of a tokio instant is read through a reference pair (a monotonic instant
//! and the system time at that instant). Outside a paused clock tokio's instants are the
//! monotonic clock's, so the result is the system time (within [`RESYNC_BEYOND`]: the pair
//! is taken again whenever the system clock is stepped). Under a paused clock the result
//! starts near the system time when the clock was paused and moves only as tokio's clock
//! does, exactly.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

/// How far the system time may stray from the reference pair's reckoning before the pair is
/// taken again (a stepped system clock); also the longest read of a new pair that is trusted.
const RESYNC_BEYOND: Duration = Duration::from_millis(1);

/// A monotonic instant and the system time read with it.
type Reference = (std::time::Instant, SystemTime);

static REFERENCE: Mutex<Option<Reference>> = Mutex::new(None);

/// How far ahead a deadline lies when the duration asked for is too long for the clock.
const FAR_AHEAD: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// The instant `after` from now by tokio's clock. A duration too long for the clock (a
/// timeout of `Duration::MAX`, say, meaning "no limit") gives a year from now rather than
/// a panic.
pub(crate) fn deadline_after(after: Duration) -> tokio::time::Instant {
    deadline_from(tokio::time::Instant::now(), after)
}

/// The instant `after` from `start`, or a year from it when `after` is too long for the
/// clock (see [`deadline_after`]).
pub(crate) fn deadline_from(start: tokio::time::Instant, after: Duration) -> tokio::time::Instant {
    start.checked_add(after).unwrap_or_else(|| start + FAR_AHEAD)
}

/// The pace of tokio's clock against real time, over a wait.
pub(crate) struct Pace {
    tokio: tokio::time::Instant,
    real: std::time::Instant,
}

impl Pace {
    /// Starts watching now.
    pub(crate) fn start() -> Pace {
        Pace { tokio: tokio::time::Instant::now(), real: std::time::Instant::now() }
    }

    /// Whether tokio's clock has run at least ten times as fast as real time since the start,
    /// over at least a millisecond: a paused clock that a test advances, or that tokio
    /// advances while the runtime idles. A running clock keeps real time.
    pub(crate) fn ran_ahead(&self) -> bool {
        let by_tokio = self.tokio.elapsed();
        by_tokio >= Duration::from_millis(1) && self.real.elapsed() * 10 < by_tokio
    }
}

/// The wall-clock time now, by tokio's clock.
pub(crate) fn wall_now() -> SystemTime {
    wall_at(tokio::time::Instant::now())
}

/// The wall-clock time at `instant` of tokio's clock.
pub(crate) fn wall_at(instant: tokio::time::Instant) -> SystemTime {
    let (mono, system) = reference();
    let instant = instant.into_std();
    match instant.checked_duration_since(mono) {
        Some(after) => system.checked_add(after),
        None => system.checked_sub(mono.duration_since(instant)),
    }
    .unwrap_or(system)
}

/// The reference pair, taken again when the system time read now strays from it.
fn reference() -> Reference {
    let before = std::time::Instant::now();
    let system = SystemTime::now();
    let after = std::time::Instant::now();
    // a read interrupted between the two clocks does not say where the system clock is
    let trusted = after.duration_since(before) <= RESYNC_BEYOND;
    let mut reference = REFERENCE.lock().unwrap_or_else(PoisonError::into_inner);
    match *reference {
        Some(kept) if !trusted || agrees(kept, before, system) => kept,
        _ => *reference.insert((before, system)),
    }
}

/// Whether `system`, read at `now`, is within [`RESYNC_BEYOND`] of the time that `mono` and
/// `at` reckon for `now`.
fn agrees((mono, at): Reference, now: std::time::Instant, system: SystemTime) -> bool {
    at.checked_add(now.saturating_duration_since(mono)).is_some_and(|reckoned| {
        let gap = system.duration_since(reckoned).unwrap_or_else(|ahead| ahead.duration());
        gap <= RESYNC_BEYOND
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gap(a: SystemTime, b: SystemTime) -> Duration {
        a.duration_since(b).unwrap_or_else(|ahead| ahead.duration())
    }

    #[tokio::test]
    async fn a_running_clock_reads_the_system_time() {
        for _ in 0..100 {
            let (system, wall) = (SystemTime::now(), wall_now());
            assert!(gap(wall, system) < Duration::from_millis(5), "{wall:?} {system:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_clock_reads_the_wall_time_it_keeps() {
        let start = wall_now();
        assert!(gap(start, SystemTime::now()) < Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(wall_now(), start, "real time does not move it");
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(wall_now().duration_since(start).ok(), Some(Duration::from_secs(3600)));
        let earlier = tokio::time::Instant::now() - Duration::from_secs(7200);
        assert_eq!(start.duration_since(wall_at(earlier)).ok(), Some(Duration::from_secs(3600)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_clock_runs_ahead_of_real_time() {
        let pace = Pace::start();
        assert!(!pace.ran_ahead(), "no time has passed");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(pace.ran_ahead());
    }

    #[tokio::test]
    async fn a_running_clock_keeps_real_time() {
        let pace = Pace::start();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!pace.ran_ahead());
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_too_far_for_the_clock_is_a_year_away() {
        let now = tokio::time::Instant::now();
        assert_eq!(deadline_after(Duration::from_secs(5)), now + Duration::from_secs(5));
        assert_eq!(deadline_after(Duration::MAX), now + FAR_AHEAD);
    }
}
