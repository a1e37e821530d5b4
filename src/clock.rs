//! Time as keyrack stores and shows it: Unix seconds, written as RFC 3339 in UTC
//! (`2026-11-25T20:09:15Z`) by the `time` crate.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Seconds since the Unix epoch, now: the one clock of key expiry, sessions and counters.
pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
        + test_offset()
}

/// Debug builds only: `KEYRACK_TEST_CLOCK_OFFSET` (seconds, read once) moves keyrack's clock, so
/// the test suite can see a key expire without waiting for it. Release builds ignore it.
fn test_offset() -> i64 {
    static OFFSET: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *OFFSET.get_or_init(|| {
        crate::config::test_switch("CLOCK_OFFSET")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    })
}

/// An RFC 3339 time as Unix seconds (fractions of a second dropped).
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    OffsetDateTime::parse(s.trim(), &Rfc3339)
        .ok()
        .map(OffsetDateTime::unix_timestamp)
}

/// `secs` as RFC 3339 in UTC, to the second. Seconds outside the years 1 to 9999 (which keyrack
/// never stores) give an empty string.
pub(crate) fn rfc3339(secs: i64) -> String {
    OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_to_the_second() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(rfc3339(4_102_444_800), "2100-01-01T00:00:00Z");
    }

    #[test]
    fn parses_what_it_writes_and_offsets() {
        assert_eq!(parse_rfc3339("2000-02-29T00:00:00Z"), Some(951_782_400));
        assert_eq!(
            parse_rfc3339("2000-02-29T01:00:00+01:00"),
            Some(951_782_400)
        );
        assert_eq!(parse_rfc3339("2000-02-29"), None);
        assert_eq!(parse_rfc3339("soon"), None);
    }
}
