//! [`TimeEntrypoint`]: call a route on a fixed interval or a cron schedule.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Timelike, Utc};
use croner::Cron;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};

use super::fired_at::tick_message;
use super::leadership::Leadership;
use crate::clock;
use crate::data::Handled;
use crate::error::{Error, Result};
use crate::pipeline::entrypoint_kind::{EntrypointKind, Kind};
use crate::pipeline::Entrypoint;
use crate::pipeline::RouteHandle;

/// When a timer fires.
#[derive(Clone, Debug)]
pub enum Schedule {
    /// Every interval, the first tick one interval after start.
    Every(Duration),
    /// On a cron expression (5 fields, or 6 with seconds first), in UTC.
    Cron(Box<Cron>),
}

/// Calls its route on a schedule. Runs never overlap: a tick that comes while the previous
/// run is still going is skipped. A failing run is logged and the timer goes on.
///
/// The payload is the time the timer fired, in UTC, as the Python original passes it
/// (`datetime.utcnow().isoformat()`): a JSON string such as `"2026-12-01T11:53:06.123456"`,
/// without the fraction when the microseconds are zero. Take it with `Payload<String>`, or
/// leave it.
///
/// Timers keep tokio's time: under a paused clock (`#[tokio::test(start_paused = true)]`)
/// intervals, cron occurrences and the payload's time follow the test clock, the wall time
/// starting from the system time when the clock was paused.
///
/// ```
/// use std::time::Duration;
/// use micro_framework::prelude::*;
/// use micro_framework::entrypoints::TimeEntrypoint;
///
/// fn cleanup() {}
/// fn report(Payload(fired_at): Payload<String>) {}
///
/// let hourly = Route::new(report).entrypoint(TimeEntrypoint::every(Duration::from_secs(3600)));
/// let every = Route::new(cleanup).entrypoint(TimeEntrypoint::every(Duration::from_secs(60)));
/// let nightly = Route::new(cleanup)
///     .name("nightly_cleanup")
///     .entrypoint(TimeEntrypoint::cron("0 3 * * *").unwrap());
/// ```
#[derive(Clone, Debug)]
pub struct TimeEntrypoint {
    schedule: Schedule,
    cluster_wide: bool,
}

impl TimeEntrypoint {
    /// Fire every `interval`. A zero interval is refused when the service starts
    /// ([`Error::Startup`]): it would fire without pause. An interval too long for the clock
    /// (`Duration::MAX`) never fires; the service runs on.
    pub fn every(interval: Duration) -> Self {
        TimeEntrypoint { schedule: Schedule::Every(interval), cluster_wide: false }
    }

    /// Fire each tick on one instance of the service only (the Python original and Nameko
    /// fire on every instance). The instance whose connection owns the exclusive queue
    /// `timer-{service}-{route}.lock` leads; when it stops or dies, or its connection or
    /// its broker node goes away, another one takes over at its next tick. A follower claims
    /// the queue only once an empty message published to it comes back unroutable, so it is
    /// not refused at every tick. An instance that is not connected never fires: it cannot
    /// know whether another one leads.
    pub fn cluster_wide(mut self) -> Self {
        self.cluster_wide = true;
        self
    }

    /// Fire on a cron expression such as `*/5 * * * *` or `0 */10 * * * *` (with seconds).
    /// An expression with no occurrence to come (`0 0 31 2 *`) is refused when the service
    /// starts ([`Error::Startup`]).
    pub fn cron(expression: &str) -> Result<Self> {
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .build()
            .parse(expression)
            .or_else(|_| Cron::from_str(expression))
            .map_err(|error| {
                Error::Startup(format!("invalid cron expression {expression:?}: {error}"))
            })?;
        Ok(TimeEntrypoint { schedule: Schedule::Cron(Box::new(cron)), cluster_wide: false })
    }

    /// Fire at each tick (where this instance leads, for a cluster-wide timer) until the
    /// service stops.
    async fn fire(&self, route: &RouteHandle, leadership: &mut Option<Leadership>) -> Result<()> {
        let mut last = Instant::now();
        let mut last_occurrence = None;
        loop {
            let Some(due) = self.next_tick(last, &mut last_occurrence) else {
                // the service goes on (its other routes, or a timer left for later): only the
                // stop ends the route, as it ends any other
                tracing::info!(route = route.name(), "schedule has no further tick");
                route.stopping().cancelled().await;
                return Ok(());
            };
            tokio::select! {
                _ = route.stopping().cancelled() => return Ok(()),
                _ = due.wait(wall_now, false) => {}
            }
            if let Tick::At(due) = due {
                last = due;
            }
            if let Some(leadership) = leadership.as_mut() {
                // a follower's check publishes, which an alarm may hold up to its timeout
                let leads = tokio::select! {
                    _ = route.stopping().cancelled() => return Ok(()),
                    leads = leadership.lead(route) => leads,
                };
                if !leads {
                    continue;
                }
            }
            let message = tick_message(clock::wall_now().into())?;
            // the wait for a worker slot too: a greedy pool's may never come free
            let run = tokio::spawn({
                let route = route.clone();
                async move {
                    let permit = route.acquire().await?;
                    Some(route.handle(permit, message).await)
                }
            });
            let Some(handled) = finish(route, run).await? else {
                // a run left going (or none started): the lock stays with the connection,
                // so that no other instance's run overlaps one still going here
                *leadership = None;
                return Ok(());
            };
            if let Handled::Failed(failure) | Handled::Retry { failure, .. } = &handled {
                tracing::error!(
                    route = route.name(),
                    "timer run failed: {}",
                    failure.full_message()
                );
            }
            route.settled(&handled);
            // Skip the ticks that passed while the run was going: runs never overlap.
            if let Schedule::Every(interval) = &self.schedule {
                last = last_tick_by(last, *interval, Instant::now());
            }
        }
    }

    /// When the tick after `last` is due; `None` when the schedule has no future tick. A
    /// cron tick is the occurrence after now and after `last_occurrence` (so an occurrence
    /// fires once however early the clock wakes the timer), which it updates. The search
    /// starts from a whole second: croner keeps the fraction it starts from, which would
    /// make each occurrence that late.
    fn next_tick(
        &self,
        last: Instant,
        last_occurrence: &mut Option<DateTime<Utc>>,
    ) -> Option<Tick> {
        match &self.schedule {
            // an interval too long for the clock (`Duration::MAX`) never comes: no tick
            Schedule::Every(interval) => last.checked_add(*interval).map(Tick::At),
            Schedule::Cron(cron) => {
                let wall = wall_now();
                let after = last_occurrence.map_or(wall, |occurrence| occurrence.max(wall));
                let after = after.with_nanosecond(0).unwrap_or(after);
                let next = cron.find_next_occurrence(&after, false).ok()?;
                *last_occurrence = Some(next);
                Some(Tick::OnTheWallClock(next))
            }
        }
    }
}

/// When a tick is due: an instant of the monotonic clock (intervals), or a time of the wall
/// clock (cron occurrences, which follow the system clock when it is stepped).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Tick {
    At(Instant),
    OnTheWallClock(DateTime<Utc>),
}

/// The longest a cron timer sleeps before it looks at the wall clock again: a system clock
/// stepped during a long sleep (a corrected drift, a virtual machine resumed) moves the tick
/// by at most this much, where sleeping on the monotonic clock alone would move it by the
/// whole step.
const WALL_CLOCK_RECHECK: Duration = Duration::from_secs(1);

fn wall_now() -> DateTime<Utc> {
    DateTime::<Utc>::from(clock::wall_now())
}

impl Tick {
    /// Wait until the tick is due, reading the wall clock through `wall`; under a paused
    /// clock, reading it again each [`WALL_CLOCK_RECHECK`] only if `recheck_when_paused` (a
    /// test that steps its `wall`).
    async fn wait(self, wall: impl Fn() -> DateTime<Utc>, recheck_when_paused: bool) {
        let occurrence = match self {
            Tick::At(due) => return sleep_until(due).await,
            Tick::OnTheWallClock(occurrence) => occurrence,
        };
        let mut recheck = WALL_CLOCK_RECHECK;
        loop {
            let Ok(left) = (occurrence - wall()).to_std() else { return };
            if left.is_zero() {
                return;
            }
            let pace = clock::Pace::start();
            tokio::time::sleep(left.min(recheck)).await;
            // A paused test clock (which no system clock step moves) would wake a test's
            // week of a nightly cron 600,000 times, for seconds: the rest in one sleep.
            if pace.ran_ahead() && !recheck_when_paused {
                recheck = Duration::MAX;
            }
        }
    }
}

#[async_trait]
impl Entrypoint for TimeEntrypoint {
    fn describe(&self) -> String {
        let schedule = match &self.schedule {
            Schedule::Every(interval) => format!("every {interval:?}"),
            Schedule::Cron(cron) => format!("cron {}", cron.pattern),
        };
        match self.cluster_wide {
            true => format!("TimeEntrypoint({schedule}, cluster-wide)"),
            false => format!("TimeEntrypoint({schedule})"),
        }
    }

    async fn setup(&mut self, route: &RouteHandle) -> Result<()> {
        match self.schedule {
            Schedule::Every(interval) if interval.is_zero() => Err(Error::Startup(format!(
                "route {}: TimeEntrypoint::every needs an interval above zero",
                route.name()
            ))),
            Schedule::Cron(ref cron) if cron.find_next_occurrence(&wall_now(), false).is_err() => {
                Err(Error::Startup(format!(
                    "route {}: the cron expression {:?} has no occurrence from now on",
                    route.name(),
                    cron.pattern.to_string()
                )))
            }
            _ => Ok(()),
        }
    }

    async fn run(self: Box<Self>, route: RouteHandle) -> Result<()> {
        let mut leadership = self.cluster_wide.then(|| Leadership::of(&route));
        let ran = self.fire(&route, &mut leadership).await;
        if let Some(leadership) = leadership {
            leadership.resign(&route).await;
        }
        ran
    }

    fn kind(&self) -> EntrypointKind {
        EntrypointKind(Kind::Timer)
    }
}

/// The last tick of the grid of `interval` from `last` that is before `now`, found in one
/// step: ticks of a nanosecond behind a run of a second are a billion, too many to step over.
/// A tick at `now` itself is not covered: a run that ends on a tick has not outlasted it,
/// and it fires at once (as micro-framework's timer does; skipping it halved the rate of
/// runs as long as their interval).
fn last_tick_by(last: Instant, interval: Duration, now: Instant) -> Instant {
    let elapsed = now.saturating_duration_since(last).as_nanos().saturating_sub(1);
    let covered = elapsed - elapsed % interval.as_nanos().max(1);
    let covered = Duration::from_nanos(u64::try_from(covered).unwrap_or(u64::MAX));
    last.checked_add(covered).unwrap_or(last)
}

/// The outcome of a timer's run, or `None` when the service stops before the run starts (no
/// worker slot given) or while it is still going (or waiting for a slot) `SHUTDOWN_TIMEOUT`
/// later: it is left to end by itself, as the calls of a queue are, so that a run that never
/// ends cannot hold up the stop for ever.
async fn finish(route: &RouteHandle, run: JoinHandle<Option<Handled>>) -> Result<Option<Handled>> {
    let overdue = async {
        route.stopping().cancelled().await;
        tokio::time::sleep(route.config().shutdown_timeout).await;
    };
    tokio::select! {
        joined = run => joined.map_err(|join| Error::EntrypointPanicked(join.to_string())),
        () = overdue => {
            tracing::warn!(
                route = route.name(),
                "timer run still going after SHUTDOWN_TIMEOUT ({:?}); the service stops without it",
                route.config().shutdown_timeout
            );
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The description (the status page's entrypoint, the "route ready" log line) says when a
    /// timer fires on one instance only, whatever its schedule (a cron timer did not: two
    /// instances looked as though each fired the nightly job).
    #[test]
    fn a_cluster_wide_timer_says_so_whatever_its_schedule() {
        let every = TimeEntrypoint::every(Duration::from_secs(60));
        assert_eq!(every.describe(), "TimeEntrypoint(every 60s)");
        assert_eq!(every.cluster_wide().describe(), "TimeEntrypoint(every 60s, cluster-wide)");
        let Ok(cron) = TimeEntrypoint::cron("0 3 * * *") else { panic!("a cron expression") };
        assert_eq!(cron.describe(), "TimeEntrypoint(cron 0 3 * * *)");
        assert_eq!(cron.cluster_wide().describe(), "TimeEntrypoint(cron 0 3 * * *, cluster-wide)");
    }

    #[test]
    fn an_interval_too_long_for_the_clock_never_ticks() {
        let now = Instant::now();
        let hourly = TimeEntrypoint::every(Duration::from_secs(3600));
        let in_an_hour = Tick::At(now + Duration::from_secs(3600));
        assert_eq!(hourly.next_tick(now, &mut None), Some(in_an_hour));
        assert_eq!(TimeEntrypoint::every(Duration::MAX).next_tick(now, &mut None), None);
    }

    #[test]
    fn the_ticks_a_run_covered_are_skipped_in_one_step_whatever_the_interval() {
        let last = Instant::now();
        let second = Duration::from_secs(1);
        let now = last + Duration::from_millis(3_500);
        assert_eq!(last_tick_by(last, second, now), last + Duration::from_secs(3));
        assert_eq!(last_tick_by(last, second, last + Duration::from_millis(999)), last);
        assert_eq!(last_tick_by(last, second, last), last);
        // a run that ends on a tick has not outlasted it: it is the next
        assert_eq!(last_tick_by(last, second, last + 3 * second), last + 2 * second);
        // a nanosecond behind a run of a minute: 6e10 ticks, skipped at once
        let minute_later = last + Duration::from_secs(60);
        let one_ns = Duration::from_nanos(1);
        assert_eq!(last_tick_by(last, one_ns, minute_later), minute_later - one_ns);
        let three_ns = Duration::from_nanos(3);
        let later = last + Duration::from_nanos(10);
        assert_eq!(last_tick_by(last, three_ns, later), last + Duration::from_nanos(9));
    }

    #[test]
    fn a_cron_expression_is_evaluated_in_utc_and_refused_when_built() {
        let at_three = TimeEntrypoint::cron("0 3 * * *")
            .map(|timer| timer.next_tick(Instant::now(), &mut None));
        let Ok(Some(Tick::OnTheWallClock(next))) = at_three else { panic!("{at_three:?}") };
        assert_eq!((next.hour(), next.minute(), next.second()), (3, 0, 0), "{next}");
        let refused =
            TimeEntrypoint::cron("61 * * * *").map(drop).map_err(|error| error.to_string());
        let Err(message) = refused else { panic!("a bad expression was taken") };
        assert!(
            message.starts_with("cannot start: invalid cron expression \"61 * * * *\""),
            "{message}"
        );
    }

    /// A wall clock that reads tokio's clock, plus `step` once `after` has passed since
    /// `start`: a system clock stepped while the timer sleeps.
    fn stepped_clock(
        start: Instant,
        after: Duration,
        step: chrono::TimeDelta,
    ) -> impl Fn() -> DateTime<Utc> {
        move || {
            let wall = wall_now();
            if start.elapsed() >= after {
                wall + step
            } else {
                wall
            }
        }
    }

    /// `waited` is `expected`, within a recheck (the wall clock's reading, taken through a
    /// reference pair, may differ from tokio's by a millisecond either way); sleeping on the
    /// monotonic clock alone would have waited the whole hour.
    fn assert_near(waited: Duration, expected: Duration) {
        let near =
            waited + WALL_CLOCK_RECHECK >= expected && waited <= expected + WALL_CLOCK_RECHECK;
        assert!(near, "waited {waited:?}, expected {expected:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cron_tick_follows_the_wall_clock_when_it_is_stepped() {
        let start = Instant::now();
        let in_an_hour = wall_now() + chrono::TimeDelta::hours(1);
        let tick = Tick::OnTheWallClock(in_an_hour);

        // stepped 40 minutes forward after 10 minutes: due 10 minutes after the step
        let forward =
            stepped_clock(start, Duration::from_secs(600), chrono::TimeDelta::minutes(40));
        tick.wait(forward, true).await;
        assert_near(start.elapsed(), Duration::from_secs(1200));

        // stepped 30 minutes back after 10 minutes: due 90 minutes after the start
        let start = Instant::now();
        let in_an_hour = wall_now() + chrono::TimeDelta::hours(1);
        let back = stepped_clock(start, Duration::from_secs(600), chrono::TimeDelta::minutes(-30));
        Tick::OnTheWallClock(in_an_hour).wait(back, true).await;
        assert_near(start.elapsed(), Duration::from_secs(5400));
    }
}
