//! The status page's history: every route's counters, sampled in the background. Kept small
//! with many routes: a route is its position in the list of routes (no names per sample), a
//! sample's duration buckets are dropped once the percentiles can no longer read them, and a
//! sample shares its counters with the one before when they did not change (an idle
//! service's history holds one copy of them).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Calls and failures of one route so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Totals {
    pub calls: u64,
    pub failures: u64,
}

/// Every route's counters at one time, in the order of the routes.
#[derive(Debug, Clone)]
pub(super) struct Sample {
    at: SystemTime,
    totals: Arc<[Totals]>,
    /// The cumulative counts of every route's duration buckets, route after route (the
    /// routes share one histogram, so each has as many); `None` once the percentiles can no
    /// longer start at this sample.
    buckets: Option<Arc<[u64]>>,
}

impl Sample {
    /// The totals of the route at `index`.
    pub(super) fn totals(&self, index: usize) -> Totals {
        self.totals.get(index).copied().unwrap_or_default()
    }

    /// The cumulative bucket counts of the route at `index`, while kept.
    pub(super) fn buckets(&self, index: usize) -> Option<&[u64]> {
        let buckets = self.buckets.as_deref()?;
        let per_route = buckets.len().checked_div(self.totals.len())?;
        buckets.get(index * per_route..(index + 1) * per_route)
    }
}

/// The last samples, oldest first.
#[derive(Debug, Clone)]
pub(super) struct History {
    samples: VecDeque<Sample>,
    capacity: usize,
    /// The window of the percentiles.
    window: Duration,
}

impl History {
    /// An empty history of at most `capacity` samples, for percentiles over `window`.
    pub(super) fn new(capacity: usize, window: Duration) -> Self {
        History { samples: VecDeque::with_capacity(capacity), capacity, window }
    }

    /// Add the counters at `at`: every route's totals and cumulative bucket counts, route
    /// after route.
    pub(super) fn record(&mut self, at: SystemTime, totals: Vec<Totals>, buckets: Vec<u64>) {
        let last = self.samples.back();
        let totals = match last.map(|last| &last.totals) {
            Some(same) if **same == totals[..] => same.clone(),
            _ => totals.into(),
        };
        let buckets = match last.and_then(|last| last.buckets.as_ref()) {
            Some(same) if **same == buckets[..] => same.clone(),
            _ => buckets.into(),
        };
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back(Sample { at, totals, buckets: Some(buckets) });
        // The window of every later status starts at this sample or a newer one (see
        // `window_start`): the buckets of the older ones are never read again.
        if let Some(start) = self.window_start_index(at) {
            for sample in self.samples.range_mut(..start) {
                sample.buckets = None;
            }
        }
    }

    /// The samples, oldest first.
    pub(super) fn samples(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter()
    }

    /// Where the percentiles at `now` start: the last sample at least a window old; none
    /// while the service is younger than the window, which then counts from the start.
    pub(super) fn window_start(&self, now: SystemTime) -> Option<&Sample> {
        self.samples.get(self.window_start_index(now)?)
    }

    fn window_start_index(&self, now: SystemTime) -> Option<usize> {
        self.samples
            .iter()
            .rposition(|sample| now.duration_since(sample.at).unwrap_or_default() >= self.window)
    }

    /// The bytes of counters held: each copy once, however many samples share it.
    #[cfg(test)]
    fn bytes_held(&self) -> usize {
        let mut totals: Vec<&Arc<[Totals]>> = self.samples.iter().map(|s| &s.totals).collect();
        totals.dedup_by(|a, b| Arc::ptr_eq(a, b));
        let mut buckets: Vec<&Arc<[u64]>> =
            self.samples.iter().filter_map(|s| s.buckets.as_ref()).collect();
        buckets.dedup_by(|a, b| Arc::ptr_eq(a, b));
        let totals: usize = totals.iter().map(|totals| totals.len() * size_of::<Totals>()).sum();
        let buckets: usize = buckets.iter().map(|counts| counts.len() * size_of::<u64>()).sum();
        totals + buckets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: usize = 200;
    const BUCKETS: usize = 12;
    const EVERY: Duration = Duration::from_secs(10);
    const WINDOW: Duration = Duration::from_secs(300);

    /// 100 samples every 10 s; the counters of every route change in each if `busy`.
    fn sampled(busy: bool) -> History {
        let mut history = History::new(90, WINDOW);
        let start = SystemTime::UNIX_EPOCH;
        for n in 0..100u64 {
            let count = if busy { n } else { 0 };
            let totals = vec![Totals { calls: count, failures: count }; ROUTES];
            history.record(start + EVERY * n as u32, totals, vec![count; ROUTES * BUCKETS]);
        }
        history
    }

    #[test]
    fn an_idle_history_holds_one_copy_of_the_counters() {
        let history = sampled(false);
        assert_eq!(history.samples().count(), 90);
        let one_copy = ROUTES * (size_of::<Totals>() + BUCKETS * size_of::<u64>());
        assert_eq!(history.bytes_held(), one_copy);
    }

    #[test]
    fn a_busy_history_keeps_buckets_only_for_the_samples_that_can_start_the_window() {
        let history = sampled(true);
        // the window's start (300 s before the last sample) and the 30 samples after it
        let with_buckets = history.samples().filter(|sample| sample.buckets.is_some()).count();
        assert_eq!(with_buckets, 31);
        let held = 90 * ROUTES * size_of::<Totals>() + 31 * ROUTES * BUCKETS * size_of::<u64>();
        assert_eq!(history.bytes_held(), held);
        // about 4 KB a route, where every sample held names and buckets of each (~32 KB)
        assert!(history.bytes_held() / ROUTES < 4500, "{}", history.bytes_held() / ROUTES);
    }

    #[test]
    fn the_window_starts_at_the_last_sample_a_window_old_and_has_its_buckets() {
        let history = sampled(true);
        let last = SystemTime::UNIX_EPOCH + EVERY * 99;
        for later in [0, 5, 10, 15] {
            let now = last + Duration::from_secs(later);
            let start = history.window_start(now).unwrap();
            let age = now.duration_since(start.at).unwrap();
            assert!(age >= WINDOW && age < WINDOW + EVERY, "{age:?}");
            assert_eq!(start.buckets(ROUTES - 1).map(<[u64]>::len), Some(BUCKETS));
        }
        let mut young = History::new(90, WINDOW);
        young.record(SystemTime::UNIX_EPOCH, vec![Totals::default()], vec![0; BUCKETS]);
        assert!(young.window_start(SystemTime::UNIX_EPOCH + WINDOW - EVERY).is_none());
    }
}
