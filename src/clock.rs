//! Time as keyrack stores and shows it: Unix seconds, written as RFC 3339 in UTC
//! (`2026-11-25T20:09:15Z`). Hand-written because it runs for every timestamp of a key listing
//! and every log line; checked against the `time` crate in the tests below.

use std::fmt::Write as _;

/// Seconds since the Unix epoch, now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn push_date_time(out: &mut String, secs: i64) {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
}

/// `secs` as RFC 3339 in UTC, to the second.
pub fn rfc3339(secs: i64) -> String {
    let mut s = String::with_capacity(20);
    push_date_time(&mut s, secs);
    s.push('Z');
    s
}

/// Appends `secs.millis` as RFC 3339 in UTC with milliseconds.
pub fn push_rfc3339_millis(out: &mut String, secs: i64, millis: u32) {
    push_date_time(out, secs);
    let _ = write!(out, ".{millis:03}Z");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agrees_with_the_time_crate() {
        let fmt = &time::format_description::well_known::Rfc3339;
        for secs in [
            0,
            951_782_400,   // 2000-02-29
            1_709_251_199, // 2024-02-29T23:59:59
            1_795_000_000,
            4_102_444_800, // 2100-01-01
            -86_400,
        ] {
            let expected = time::OffsetDateTime::from_unix_timestamp(secs)
                .unwrap()
                .format(fmt)
                .unwrap();
            assert_eq!(rfc3339(secs), expected, "{secs}");
        }
        let mut s = String::new();
        push_rfc3339_millis(&mut s, 0, 7);
        assert_eq!(s, "1970-01-01T00:00:00.007Z");
    }
}
