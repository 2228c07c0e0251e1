//! UTC calendar times for logs, events and RFC 3339 fields, without a date
//! crate: every binary needs the same few formats and nothing else.

use std::time::{SystemTime, UNIX_EPOCH};

/// A UTC instant broken into calendar fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Utc {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    pub milli: u32,
}

impl Utc {
    /// From milliseconds since the Unix epoch (negative is before 1970).
    pub fn from_millis(ms: i64) -> Utc {
        let (secs, milli) = (ms.div_euclid(1000), ms.rem_euclid(1000));
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        // Days to a civil date (Howard Hinnant's algorithm).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        Utc {
            year: yoe + era * 400 + i64::from(month <= 2),
            month: month as u32,
            day: day as u32,
            hour: (rem / 3600) as u32,
            minute: (rem % 3600 / 60) as u32,
            second: (rem % 60) as u32,
            milli: milli as u32,
        }
    }

    /// From seconds since the Unix epoch.
    pub fn from_secs(secs: i64) -> Utc {
        Utc::from_millis(secs.saturating_mul(1000))
    }

    /// From a system time (before 1970 counts as 1970).
    pub fn from_system(t: SystemTime) -> Utc {
        let ms = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
        Utc::from_millis(i64::try_from(ms).unwrap_or(i64::MAX))
    }

    /// `2026-12-02{sep}20:40:32`: no zone, no fraction.
    pub fn date_time(&self, sep: char) -> String {
        format!(
            "{:04}-{:02}-{:02}{sep}{:02}:{:02}:{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }

    /// RFC 3339 to the second: `2026-12-02T20:40:32Z`.
    pub fn rfc3339(&self) -> String {
        format!("{}Z", self.date_time('T'))
    }

    /// RFC 3339 to the millisecond: `2026-12-02T20:40:32.123Z`.
    pub fn rfc3339_millis(&self) -> String {
        format!("{}.{:03}Z", self.date_time('T'), self.milli)
    }
}

/// Parses durations (flags of the CLI and the control plane) like `90s`, `15m`, `24h`, `7d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30m, 24h or 7d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, m, h or d)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn civil_dates_and_formats() {
        assert_eq!(Utc::from_secs(0).rfc3339(), "1970-01-01T00:00:00Z");
        assert_eq!(Utc::from_secs(951_782_400).rfc3339(), "2000-02-29T00:00:00Z");
        assert_eq!(Utc::from_secs(1_735_689_599).rfc3339(), "2024-12-31T23:59:59Z");
        assert_eq!(Utc::from_millis(-1).rfc3339_millis(), "1969-12-31T23:59:59.999Z");
        assert_eq!(
            Utc::from_millis(1_796_244_032_123).date_time(' '),
            "2026-12-02 20:40:32"
        );
        let t = UNIX_EPOCH + Duration::from_millis(1_796_244_032_123);
        assert_eq!(Utc::from_system(t).rfc3339_millis(), "2026-12-02T20:40:32.123Z");
    }
}
