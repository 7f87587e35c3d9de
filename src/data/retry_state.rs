//! [`BackOffData`]: where a message is in its retries.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::data::headers::{HeaderValue, Headers};

/// Header: how many retries this message has had.
pub const HEADER_RETRY_COUNT: &str = "x-mf-retry-count";
/// Header: when the last retry was scheduled (seconds since the epoch).
pub const HEADER_LAST_RETRY: &str = "x-mf-last-retry";
/// Header: the error that caused the last retry.
pub const HEADER_LAST_ERROR: &str = "x-mf-last-error";
/// Header of a retry copy: the queue it comes back to, whose consumer alone reads the retry
/// state above as its own ([`keep_own_retry_state`]).
pub(crate) const HEADER_RETRY_QUEUE: &str = "x-mf-retry-queue";
/// Header of a retry copy: the route it is a retry of (`{service}.{route}`). On a queue that
/// several routes share (Nameko's singleton handlers: every service's, on one event), another
/// route that takes it takes it as an event of its own ([`is_retry_of_route`]).
pub(crate) const HEADER_RETRY_ROUTE: &str = "x-mf-retry-route";

/// The retry state of the current call: a target can behave differently on later attempts,
/// and a callback can report how many were made.
///
/// ```
/// use micro_framework::retry::BackOffData;
///
/// fn flaky(retry: BackOffData) -> Result<(), String> {
///     if retry.retry_count < 2 { Err("not yet".into()) } else { Ok(()) }
/// }
/// ```
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BackOffData {
    /// Retries made before this attempt: 0 on the first attempt.
    pub retry_count: u32,
    /// The route's retry limit (0 without a backoff).
    pub max_retries: u32,
    /// The error that caused the last retry.
    pub last_error: Option<String>,
    /// When the last retry was scheduled.
    pub last_retry: Option<SystemTime>,
}

impl BackOffData {
    /// Read the retry state of a message from its headers. The count is reconciled with
    /// `x-death`: the broker's count of passes through the delay queues `{queue}.delay-{ms}`
    /// of the queue the state was made for (header `x-mf-retry-queue`) wins if a header was
    /// lost; passes through other delay queues are not this state's.
    pub fn from_headers(headers: &Headers, max_retries: u32) -> Self {
        let counted = headers.get(HEADER_RETRY_COUNT).and_then(HeaderValue::as_i64).unwrap_or(0);
        let died = delay_passes(headers);
        // negative counts are 0; counts past u32::MAX mean "retries exhausted"
        let retry_count = u32::try_from(counted.max(died).max(0)).unwrap_or(u32::MAX);
        let last_retry = match headers.get(HEADER_LAST_RETRY) {
            Some(HeaderValue::Timestamp(seconds)) => {
                UNIX_EPOCH.checked_add(Duration::from_secs(*seconds))
            }
            _ => None,
        };
        let last_error =
            headers.get(HEADER_LAST_ERROR).and_then(HeaderValue::as_str).map(str::to_owned);
        BackOffData { retry_count, max_retries, last_error, last_retry }
    }

    /// Write this state into `headers`, as [`BackOffData::from_headers`] reads it (a copy of
    /// the message that is to come back at this attempt), made for `queue`, the queue the copy
    /// comes back to ([`HEADER_RETRY_QUEUE`]), for `route` ([`HEADER_RETRY_ROUTE`]).
    pub(crate) fn write_headers(&self, headers: &mut Headers, queue: &str, route: &str) {
        headers.insert(HEADER_RETRY_QUEUE.into(), queue.into());
        headers.insert(HEADER_RETRY_ROUTE.into(), route.into());
        headers.insert(HEADER_RETRY_COUNT.into(), HeaderValue::Int(i64::from(self.retry_count)));
        if let Some(at) = self.last_retry {
            let seconds = at.duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs());
            headers.insert(HEADER_LAST_RETRY.into(), HeaderValue::Timestamp(seconds));
        }
        if let Some(error) = &self.last_error {
            headers.insert(HEADER_LAST_ERROR.into(), error.as_str().into());
        }
    }

    /// The retry state of the attempt after this one, which failed with `error` at `at`.
    pub(crate) fn next(&self, error: String, at: SystemTime) -> BackOffData {
        BackOffData {
            retry_count: self.retry_count.saturating_add(1),
            max_retries: self.max_retries,
            last_error: Some(error),
            last_retry: Some(at),
        }
    }

    /// True while retries remain.
    pub fn can_retry(&self) -> bool {
        self.retry_count < self.max_retries
    }
}

/// Whether a message with `headers` is a retry made for `queue` (a copy that comes back to it
/// to run again after a failure).
pub(crate) fn is_retry_of(headers: &Headers, queue: &str) -> bool {
    headers.get(HEADER_RETRY_QUEUE).and_then(HeaderValue::as_str) == Some(queue)
}

/// Whether a retry made for a queue (see [`is_retry_of`]) is one of `route` (`{service}.{route}`):
/// a copy that does not say (made before the header was) is taken as one.
pub(crate) fn is_retry_of_route(headers: &Headers, route: &str) -> bool {
    headers.get(HEADER_RETRY_ROUTE).and_then(HeaderValue::as_str).is_none_or(|of| of == route)
}

/// Remove from `headers` the retry state ([`HEADER_RETRY_COUNT`], [`HEADER_LAST_RETRY`],
/// [`HEADER_LAST_ERROR`]) unless it was made for `queue`, the queue the message was consumed
/// from: a copy that kept the headers of a message of another queue (its dead letter, a
/// message a service published again elsewhere) starts its retries anew there.
pub(crate) fn keep_own_retry_state(headers: &mut Headers, queue: &str) {
    if !is_retry_of(headers, queue) {
        drop_retry_state(headers);
    }
}

/// Remove from `headers` any retry state ([`keep_own_retry_state`]).
pub(crate) fn drop_retry_state(headers: &mut Headers) {
    for name in [
        HEADER_RETRY_QUEUE,
        HEADER_RETRY_ROUTE,
        HEADER_RETRY_COUNT,
        HEADER_LAST_RETRY,
        HEADER_LAST_ERROR,
    ] {
        headers.remove(name);
    }
}

/// How many times `x-death` says the message expired from a delay queue `{queue}.delay-{ms}`
/// (or `{queue}.quorum-delay-{ms}`) of the queue its retry state was made for
/// ([`HEADER_RETRY_QUEUE`]).
fn delay_passes(headers: &Headers) -> i64 {
    let Some(queue) = headers.get(HEADER_RETRY_QUEUE).and_then(HeaderValue::as_str) else {
        return 0;
    };
    let Some(HeaderValue::Array(deaths)) = headers.get("x-death") else { return 0 };
    let of_queue = |name: &str| {
        let millis = name.strip_prefix(queue).and_then(|rest| {
            rest.strip_prefix(".delay-").or_else(|| rest.strip_prefix(".quorum-delay-"))
        });
        millis.is_some_and(|ms| !ms.is_empty() && ms.bytes().all(|byte| byte.is_ascii_digit()))
    };
    deaths
        .iter()
        .filter_map(|death| match death {
            HeaderValue::Table(table) => Some(table),
            _ => None,
        })
        .filter(|table| table.get("queue").and_then(HeaderValue::as_str).is_some_and(of_queue))
        .filter_map(|table| table.get("count").and_then(HeaderValue::as_i64))
        .fold(0, i64::saturating_add)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_the_header_with_x_death() {
        let death = Headers::from([
            ("queue".to_owned(), HeaderValue::from("work.delay-200")),
            ("count".to_owned(), HeaderValue::Int(2)),
        ]);
        let headers = Headers::from([
            (HEADER_RETRY_COUNT.to_owned(), HeaderValue::Int(1)),
            (HEADER_RETRY_QUEUE.to_owned(), HeaderValue::from("work")),
            ("x-death".to_owned(), HeaderValue::Array(vec![HeaderValue::Table(death)])),
        ]);
        let data = BackOffData::from_headers(&headers, 3);
        assert_eq!(data.retry_count, 2);
        assert!(data.can_retry());
        assert!(!BackOffData::from_headers(&headers, 2).can_retry());
        assert_eq!(BackOffData::from_headers(&Headers::new(), 3).retry_count, 0);
    }

    #[test]
    fn the_passes_through_quorum_delay_queues_count_too() {
        let death = |queue: &str, count| {
            HeaderValue::Table(Headers::from([
                ("queue".to_owned(), HeaderValue::from(queue)),
                ("count".to_owned(), HeaderValue::Int(count)),
            ]))
        };
        let deaths = vec![
            death("work.quorum-delay-200", 2),
            death("work.delay-100", 1),
            death("work.quorum-delay-", 5),
            death("other.quorum-delay-200", 7),
        ];
        let headers = Headers::from([
            (HEADER_RETRY_QUEUE.to_owned(), HeaderValue::from("work")),
            ("x-death".to_owned(), HeaderValue::Array(deaths)),
        ]);
        assert_eq!(BackOffData::from_headers(&headers, 9).retry_count, 3);
    }

    #[test]
    fn extreme_headers_saturate_instead_of_panicking() {
        let death = |count| {
            HeaderValue::Table(Headers::from([
                ("queue".to_owned(), HeaderValue::from("work.delay-1")),
                ("count".to_owned(), HeaderValue::Int(count)),
            ]))
        };
        let headers = Headers::from([
            (HEADER_RETRY_QUEUE.to_owned(), HeaderValue::from("work")),
            ("x-death".to_owned(), HeaderValue::Array(vec![death(i64::MAX), death(i64::MAX)])),
            (HEADER_LAST_RETRY.to_owned(), HeaderValue::Timestamp(u64::MAX)),
        ]);
        let data = BackOffData::from_headers(&headers, 3);
        assert_eq!((data.retry_count, data.last_retry), (u32::MAX, None));
        let negative = Headers::from([(HEADER_RETRY_COUNT.to_owned(), HeaderValue::Int(-5))]);
        assert_eq!(BackOffData::from_headers(&negative, 3).retry_count, 0);
    }

    #[test]
    fn headers_written_read_back_the_same() {
        let data = BackOffData {
            retry_count: 2,
            max_retries: 5,
            last_error: Some("timed out".to_owned()),
            last_retry: UNIX_EPOCH.checked_add(Duration::from_secs(1_700_000_000)),
        };
        let mut headers = Headers::new();
        data.write_headers(&mut headers, "work", "svc.work");
        assert_eq!(BackOffData::from_headers(&headers, 5), data);
        keep_own_retry_state(&mut headers, "work");
        assert_eq!(BackOffData::from_headers(&headers, 5), data, "made for the queue named");
    }

    /// Passes through the delay queues of another queue (`work.dlq` consuming the dead
    /// letters of `work`), or of a queue no header names, are not counted.
    #[test]
    fn only_the_delay_queues_of_the_state_s_queue_count() {
        let death = |queue: &str, count| {
            HeaderValue::Table(Headers::from([
                ("queue".to_owned(), HeaderValue::from(queue)),
                ("count".to_owned(), HeaderValue::Int(count)),
            ]))
        };
        let deaths = ["work.delay-20", "work.dlq.delay-20", "work.delay-x", "work.delay-"];
        let deaths = deaths.iter().zip([2, 1, 5, 5]).map(|(queue, count)| death(queue, count));
        let mut headers =
            Headers::from([("x-death".to_owned(), HeaderValue::Array(deaths.collect()))]);
        assert_eq!(BackOffData::from_headers(&headers, 9).retry_count, 0, "no queue named");
        for (queue, passes) in [("work", 2), ("work.dlq", 1), ("wor", 0)] {
            headers.insert(HEADER_RETRY_QUEUE.into(), HeaderValue::from(queue));
            assert_eq!(BackOffData::from_headers(&headers, 9).retry_count, passes, "{queue}");
        }
    }

    #[test]
    fn a_queue_keeps_only_the_retry_state_made_for_it() {
        let state = Headers::from([
            (HEADER_RETRY_QUEUE.to_owned(), HeaderValue::from("work")),
            (HEADER_RETRY_COUNT.to_owned(), HeaderValue::Int(3)),
            (HEADER_LAST_RETRY.to_owned(), HeaderValue::Timestamp(1)),
            (HEADER_LAST_ERROR.to_owned(), HeaderValue::from("boom")),
            ("x-custom".to_owned(), HeaderValue::from("kept")),
        ]);
        let mut own = state.clone();
        keep_own_retry_state(&mut own, "work");
        assert_eq!(own, state);
        for queue in ["work.dlq", "elsewhere"] {
            let mut foreign = state.clone();
            keep_own_retry_state(&mut foreign, queue);
            let kept = Headers::from([("x-custom".to_owned(), HeaderValue::from("kept"))]);
            assert_eq!(foreign, kept, "{queue}");
        }
        let mut unnamed = Headers::from([(HEADER_RETRY_COUNT.to_owned(), HeaderValue::Int(3))]);
        keep_own_retry_state(&mut unnamed, "work");
        assert_eq!(unnamed, Headers::new(), "a count no queue owns");
    }
}
