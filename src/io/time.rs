//! UTC timestamps as ISO 8601 text (metadata dates, Jupyter message headers), without a date library.

/// `YYYY-MM-DDTHH:MM:SS` for `secs` since 1970-01-01 UTC.
pub fn iso8601(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // civil date from days since 1970-01-01 (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The time since 1970-01-01 UTC now (zero if the clock is before it).
pub fn now() -> std::time::Duration {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_match_the_system_calendar() {
        // values checked with `date -u -d @SECS`
        assert_eq!(super::iso8601(0), "1970-01-01T00:00:00");
        assert_eq!(super::iso8601(1_795_700_057), "2026-11-26T13:34:17");
        assert_eq!(super::iso8601(951_782_400), "2000-02-29T00:00:00");
        assert_eq!(super::iso8601(-1), "1969-12-31T23:59:59");
    }
}
