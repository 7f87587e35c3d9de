//! [`BackOffData`]: where a message is in its retries.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::data::headers::{HeaderValue, Headers};

/// Header: how many retries this message has had.
pub const HEADER_RETRY_COUNT: &str = "x-mf-retry-count";
/// Header: when the last retry was scheduled (seconds since the epoch).
pub const HEADER_LAST_RETRY: &str = "x-mf-last-retry";
/// Header: the error that caused the last retry.
pub const HEADER_LAST_ERROR: &str = "x-mf-last-error";

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
    /// `x-death`: the broker's count of delay-queue passes wins if a header was lost.
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
    /// the message that is to come back at this attempt).
    pub(crate) fn write_headers(&self, headers: &mut Headers) {
        headers.insert(HEADER_RETRY_COUNT.into(), HeaderValue::Int(i64::from(self.retry_count)));
        if let Some(at) = self.last_retry {
            let seconds = at.duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs());
            headers.insert(HEADER_LAST_RETRY.into(), HeaderValue::Timestamp(seconds));
        }
        if let Some(error) = &self.last_error {
            headers.insert(HEADER_LAST_ERROR.into(), error.as_str().into());
        }
    }

    /// True while retries remain.
    pub fn can_retry(&self) -> bool {
        self.retry_count < self.max_retries
    }
}

/// How many times `x-death` says the message expired from a delay queue (`{queue}.delay-{ms}`).
fn delay_passes(headers: &Headers) -> i64 {
    let Some(HeaderValue::Array(deaths)) = headers.get("x-death") else { return 0 };
    deaths
        .iter()
        .filter_map(|death| match death {
            HeaderValue::Table(table) => Some(table),
            _ => None,
        })
        .filter(|table| {
            table.get("queue").and_then(HeaderValue::as_str).is_some_and(|q| q.contains(".delay-"))
        })
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
            ("x-death".to_owned(), HeaderValue::Array(vec![HeaderValue::Table(death)])),
        ]);
        let data = BackOffData::from_headers(&headers, 3);
        assert_eq!(data.retry_count, 2);
        assert!(data.can_retry());
        assert!(!BackOffData::from_headers(&headers, 2).can_retry());
        assert_eq!(BackOffData::from_headers(&Headers::new(), 3).retry_count, 0);
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
        data.write_headers(&mut headers);
        assert_eq!(BackOffData::from_headers(&headers, 5), data);
    }
}
