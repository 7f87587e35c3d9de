//! The payload of a timer's call: the time it fired, as the Python original passes it.

use chrono::{DateTime, Timelike, Utc};

use crate::data::Message;

/// The message a timer hands its route when it fires at `now`: a JSON string holding the
/// time in UTC, written as Python's `datetime.utcnow().isoformat()` writes it.
pub(crate) fn tick_message(now: DateTime<Utc>) -> serde_json::Result<Message> {
    Message::json(&isoformat(now))
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
    fn the_message_is_a_json_string() {
        let message = tick_message(at(7, 0)).unwrap();
        assert_eq!(message.properties.content_type.as_deref(), Some("application/json"));
        assert_eq!(&message.body[..], b"\"2026-12-01T11:53:06.000007\"");
    }
}
