//! The payload of a timer's call: the time it fired, as the Python original passes it.

use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Datelike, Timelike, Utc};

use crate::data::Message;

/// The message a timer hands its route when it fires at `now`: a JSON string holding the
/// time in UTC, written as Python's `datetime.utcnow().isoformat()` writes it.
pub(crate) fn tick_message(now: DateTime<Utc>) -> serde_json::Result<Message> {
    Message::json(&isoformat(now))
}

/// `time` in UTC, if Python's `datetime` can hold it (the years 1 to 9999): a Python peer
/// could read no other.
pub(crate) fn python_datetime(time: SystemTime) -> Option<DateTime<Utc>> {
    let utc = match time.duration_since(UNIX_EPOCH) {
        Ok(after) => {
            DateTime::from_timestamp(i64::try_from(after.as_secs()).ok()?, after.subsec_nanos())
        }
        Err(before) => {
            let before = before.duration();
            let seconds = i64::try_from(before.as_secs()).ok()?;
            match before.subsec_nanos() {
                0 => DateTime::from_timestamp(-seconds, 0),
                nanos => DateTime::from_timestamp(-seconds - 1, 1_000_000_000 - nanos),
            }
        }
    }?;
    (1..=9999).contains(&utc.year()).then_some(utc)
}

/// `2026-12-01T11:53:06.123456`: no offset, microseconds, and no fraction at all when the
/// microseconds are zero (Python's `isoformat`). The clock gives no leap seconds, which
/// Python could not write.
fn isoformat(time: DateTime<Utc>) -> String {
    let seconds = time.format("%Y-%m-%dT%H:%M:%S");
    match time.nanosecond() / 1_000 {
        0 => seconds.to_string(),
        micros => format!("{seconds}.{micros:06}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    fn at(micros: u32, extra_nanos: u32) -> DateTime<Utc> {
        NaiveDate::from_ymd_opt(2026, 12, 1)
            .and_then(|day| day.and_hms_nano_opt(11, 53, 6, micros * 1_000 + extra_nanos))
            .unwrap()
            .and_utc()
    }

    #[test]
    fn written_as_python_isoformat_writes_a_naive_utc_datetime() {
        assert_eq!(isoformat(at(123_456, 0)), "2026-12-01T11:53:06.123456");
        assert_eq!(isoformat(at(5, 999)), "2026-12-01T11:53:06.000005");
        // Python leaves the fraction out when microseconds == 0 (nanoseconds are cut)
        assert_eq!(isoformat(at(0, 0)), "2026-12-01T11:53:06");
        assert_eq!(isoformat(at(0, 999)), "2026-12-01T11:53:06");
        let early = NaiveDate::from_ymd_opt(987, 1, 2).unwrap().and_hms_opt(3, 4, 5).unwrap();
        assert_eq!(isoformat(early.and_utc()), "0987-01-02T03:04:05");
    }

    #[test]
    fn times_python_cannot_hold_are_refused() {
        use std::time::Duration;
        let year = Duration::from_secs(366 * 24 * 3600);
        let now = python_datetime(UNIX_EPOCH + Duration::from_millis(1_500)).unwrap();
        assert_eq!(isoformat(now), "1970-01-01T00:00:01.500000");
        let before = python_datetime(UNIX_EPOCH - Duration::from_millis(1_500)).unwrap();
        assert_eq!(isoformat(before), "1969-12-31T23:59:58.500000");
        assert!(python_datetime(UNIX_EPOCH + year * 8_000).is_some());
        assert!(python_datetime(UNIX_EPOCH + year * 8_100).is_none());
        assert!(python_datetime(UNIX_EPOCH - year * 1_960).is_some());
        assert!(python_datetime(UNIX_EPOCH - year * 1_980).is_none());
        assert!(python_datetime(UNIX_EPOCH + Duration::from_secs(u64::MAX / 4)).is_none());
    }

    #[test]
    fn the_message_is_a_json_string() {
        let message = tick_message(at(7, 0)).unwrap();
        assert_eq!(message.properties.content_type.as_deref(), Some("application/json"));
        assert_eq!(&message.body[..], b"\"2026-12-01T11:53:06.000007\"");
    }
}
