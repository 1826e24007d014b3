//! Plain text for the values a user prints: a wait as `29.9 s`, an instant
//! as RFC 3339 (`2026-11-30T05:50:04.120Z`).
//!
//! `Debug` of a `Duration` or a `SystemTime` is written for a debugger
//! (`Some(29.999861224s)`, `SystemTime { tv_sec: .. }`); these wrappers are
//! written for a log line or a terminal.
//!
//! ```
//! use pmcp_resilience::display::{Rfc3339, Seconds};
//! use std::time::{Duration, SystemTime};
//!
//! assert_eq!(Seconds(Duration::from_millis(29_940)).to_string(), "29.9 s");
//! assert_eq!(format!("{:.3}", Seconds(Duration::from_millis(1_500))), "1.500 s");
//! let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_997_292_120);
//! assert_eq!(Rfc3339(at).to_string(), "2026-11-30T00:08:12.120Z");
//! ```

use std::fmt;
use std::time::{Duration, SystemTime};

use crate::clock::Timestamp;

/// A duration shown in seconds with one decimal (`29.9 s`); a precision in
/// the format string (`{:.3}`) shows more or fewer decimals.
///
/// ```
/// use pmcp_resilience::display::Seconds;
/// use std::time::Duration;
///
/// let wait = Duration::from_millis(29_940);
/// assert_eq!(format!("retry in {}", Seconds(wait)), "retry in 29.9 s");
/// assert_eq!(format!("{:.2}", Seconds::from(Duration::from_millis(250))), "0.25 s");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Seconds(pub Duration);

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let decimals = f.precision().unwrap_or(1);
        write!(f, "{:.*} s", decimals, self.0.as_secs_f64())
    }
}

impl From<Duration> for Seconds {
    fn from(d: Duration) -> Self {
        Seconds(d)
    }
}

/// An instant shown as an RFC 3339 date and time in UTC with milliseconds
/// (`2026-11-30T05:50:04.120Z`). Instants before 1970 show as the Unix epoch.
///
/// ```
/// use pmcp_resilience::display::Rfc3339;
/// use pmcp_resilience::Timestamp;
/// use std::time::{Duration, SystemTime};
///
/// let reset_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
/// assert_eq!(format!("resets at {}", Rfc3339(reset_at)), "resets at 2026-01-01T00:00:00.000Z");
/// // A `Timestamp` converts too (and its own `Display` shows the same text).
/// let t = Timestamp::from_millis(1_767_225_600_500);
/// assert_eq!(Rfc3339::from(t).to_string(), t.to_string());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rfc3339(pub SystemTime);

impl fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let since_epoch = self
            .0
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        write_utc(f, since_epoch)
    }
}

impl From<SystemTime> for Rfc3339 {
    fn from(t: SystemTime) -> Self {
        Rfc3339(t)
    }
}

impl From<Timestamp> for Rfc3339 {
    fn from(t: Timestamp) -> Self {
        Rfc3339(SystemTime::UNIX_EPOCH + Duration::from_nanos(t.as_nanos()))
    }
}

/// `since_epoch` as `YYYY-MM-DDThh:mm:ss.mmmZ`.
fn write_utc(f: &mut fmt::Formatter<'_>, since_epoch: Duration) -> fmt::Result {
    let secs = since_epoch.as_secs();
    let (days, in_day) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = date_of(days);
    write!(
        f,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        in_day / 3_600,
        in_day % 3_600 / 60,
        in_day % 60,
        since_epoch.subsec_millis()
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01.
///
/// Counts in 400-year cycles (146,097 days each) starting on 0000-03-01,
/// so that the leap day is the last day of a counted year.
fn date_of(days: u64) -> (u64, u64, u64) {
    const CYCLE: u64 = 146_097;
    // Days from 0000-03-01 to 1970-01-01.
    let z = days + 719_468;
    let cycle = z / CYCLE;
    let day_of_cycle = z % CYCLE;
    let year_of_cycle = (day_of_cycle - day_of_cycle / 1_460 + day_of_cycle / 36_524
        - day_of_cycle / (CYCLE - 1))
        / 365;
    let day_of_year =
        day_of_cycle - (365 * year_of_cycle + year_of_cycle / 4 - year_of_cycle / 100);
    // Months from March: 0 is March, 11 is February.
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = cycle * 400 + year_of_cycle + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, millis: u64) -> String {
        Rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis))
            .to_string()
    }

    #[test]
    fn dates_across_leap_years_and_century_rules() {
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 0), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(951_868_800, 0), "2000-03-01T00:00:00.000Z");
        assert_eq!(at(1_709_164_800, 0), "2024-02-29T00:00:00.000Z");
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000Z");
        assert_eq!(at(1_735_689_599, 999), "2024-12-31T23:59:59.999Z");
        assert_eq!(at(1_795_997_292, 120), "2026-11-30T00:08:12.120Z");
    }

    #[test]
    fn before_the_epoch_shows_the_epoch() {
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(10);
        assert_eq!(Rfc3339(before).to_string(), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn timestamps_show_as_their_instant() {
        let t = Timestamp::from_millis(951_782_400_250);
        assert_eq!(Rfc3339::from(t).to_string(), "2000-02-29T00:00:00.250Z");
    }

    #[test]
    fn seconds_round_to_one_decimal_unless_told() {
        assert_eq!(
            Seconds(Duration::from_nanos(29_949_861_224)).to_string(),
            "29.9 s"
        );
        assert_eq!(Seconds(Duration::ZERO).to_string(), "0.0 s");
        assert_eq!(
            format!("{:.0}", Seconds(Duration::from_millis(2_400))),
            "2 s"
        );
    }
}
