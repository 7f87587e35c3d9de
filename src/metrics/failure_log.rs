//! The status page's recent failures: the last few, kept in memory as they happen.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use super::status::{rfc3339, RecentFailure};
use crate::data::Failure;

/// Recent failures kept, when they are shown at all.
const RECENT_FAILURES: usize = 20;

/// Failures kept for the status page, newest last.
#[derive(Debug, Default)]
pub(super) struct FailureLog(Mutex<VecDeque<RecentFailure>>);

impl FailureLog {
    pub(super) fn record(&self, route: &str, failure: &Failure) {
        let mut log = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if log.len() == RECENT_FAILURES {
            log.pop_front();
        }
        log.push_back(RecentFailure {
            route: route.to_owned(),
            at: rfc3339(SystemTime::now()),
            kind: failure.kind.as_str().to_owned(),
            error: failure.full_message(),
        });
    }

    pub(super) fn newest_first(&self) -> Vec<RecentFailure> {
        let log = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        log.iter().rev().cloned().collect()
    }
}
