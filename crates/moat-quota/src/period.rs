//! Budget periods: calendar-aligned in a time zone, or rolling.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jiff::tz::TimeZone;
use jiff::{Span, Timestamp, ToSpan, Zoned};

/// How long a budget lasts before it starts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Period {
    /// Each calendar minute.
    Minute,
    /// Each calendar hour.
    Hour,
    /// Each calendar day, from midnight in the budget's time zone.
    Day,
    /// Each calendar month, from the 1st at midnight in the budget's time zone.
    Month,
    /// The last `window`, sliding: usage fades out as it ages past the window (a two-bucket
    /// sliding-window count).
    Rolling(Duration),
}

/// A period that is not one moat knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsePeriodError {
    text: String,
}

impl fmt::Display for ParsePeriodError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown period `{}`: expected minute, hour, day, month or rolling:24h",
            self.text
        )
    }
}

impl std::error::Error for ParsePeriodError {}

impl FromStr for Period {
    type Err = ParsePeriodError;

    /// `minute`, `hour`, `day`, `month`, or `rolling:24h` (units `s`, `m`, `h`, `d`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "minute" => Ok(Self::Minute),
            "hour" => Ok(Self::Hour),
            "day" => Ok(Self::Day),
            "month" => Ok(Self::Month),
            other => {
                let window = other
                    .strip_prefix("rolling:")
                    .and_then(parse_window)
                    .ok_or_else(|| ParsePeriodError {
                        text: other.to_owned(),
                    })?;
                Ok(Self::Rolling(window))
            }
        }
    }
}

fn parse_window(s: &str) -> Option<Duration> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let n: u64 = s[..digits].parse().ok().filter(|n| *n > 0)?;
    let unit = match &s[digits..] {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    Some(Duration::from_secs(n.checked_mul(unit)?))
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Minute => f.write_str("minute"),
            Self::Hour => f.write_str("hour"),
            Self::Day => f.write_str("day"),
            Self::Month => f.write_str("month"),
            Self::Rolling(w) => write!(f, "rolling {}s", w.as_secs()),
        }
    }
}

/// The period a moment falls in: its number (calendar start in seconds since the epoch, or the
/// rolling bucket's index), and where it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    pub(crate) id: i64,
    /// Seconds since the epoch when the period ends (for a rolling period: the current bucket).
    pub(crate) end: i64,
    /// For rolling periods: how much of the previous bucket still counts, in millionths.
    pub(crate) carry_ppm: u64,
}

/// The last calendar window worked out, reused until it ends: finding where a day or a month
/// starts in a time zone costs more than the rest of a reservation, and changes once a period.
///
/// Lock-free, so it adds no lock every request of a budget would share: the window is packed in
/// one `u64` (its start in seconds since the epoch, 42 bits, and its length, 22 bits: a month of
/// 31 days is 2,678,400 s, under 2²²). A window that does not fit is not cached.
#[derive(Debug, Default)]
pub(crate) struct WindowCache(AtomicU64);

const LENGTH_BITS: u32 = 22;

impl WindowCache {
    /// [`Period::window`], from the cache while `wall` is inside the last window.
    pub(crate) fn window(&self, period: &Period, wall: SystemTime, tz: &TimeZone) -> Window {
        if matches!(period, Period::Rolling(_)) {
            // Arithmetic only: nothing to save.
            return period.window(wall, tz);
        }
        let secs = wall
            .duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|d| i64::try_from(d.as_secs()).ok());
        let packed = self.0.load(Ordering::Relaxed);
        let (start, length) = (packed >> LENGTH_BITS, packed & ((1 << LENGTH_BITS) - 1));
        if let Some(secs) = secs.and_then(|s| u64::try_from(s).ok()) {
            if start <= secs && secs < start + length {
                let id = i64::try_from(start).unwrap_or(i64::MAX);
                return Window {
                    id,
                    end: id + i64::try_from(length).unwrap_or(0),
                    carry_ppm: 0,
                };
            }
        }
        let window = period.window(wall, tz);
        let fits = (
            u64::try_from(window.id)
                .ok()
                .filter(|s| *s < 1 << (64 - LENGTH_BITS)),
            u64::try_from(window.end - window.id)
                .ok()
                .filter(|l| *l < 1 << LENGTH_BITS),
        );
        if let (Some(start), Some(length)) = fits {
            self.0
                .store(start << LENGTH_BITS | length, Ordering::Relaxed);
        }
        window
    }
}

impl Period {
    /// The window `wall` falls in, in time zone `tz`.
    pub(crate) fn window(&self, wall: SystemTime, tz: &TimeZone) -> Window {
        let ts = Timestamp::try_from(wall).unwrap_or(Timestamp::UNIX_EPOCH);
        if let Self::Rolling(width) = self {
            let width_ns = i128::try_from(width.as_nanos()).unwrap_or(i128::MAX).max(1);
            let now = ts.as_nanosecond();
            let index = now.div_euclid(width_ns);
            let into = now.rem_euclid(width_ns);
            let end_ns = (index + 1) * width_ns;
            return Window {
                id: i64::try_from(index).unwrap_or(i64::MAX),
                end: i64::try_from(end_ns / 1_000_000_000).unwrap_or(i64::MAX),
                carry_ppm: u64::try_from((width_ns - into) * 1_000_000 / width_ns).unwrap_or(0),
            };
        }
        let zoned = ts.to_zoned(tz.clone());
        let start = self.start(&zoned).unwrap_or_else(|| zoned.clone());
        let step: Span = match self {
            Self::Minute => 1.minute(),
            Self::Hour => 1.hour(),
            Self::Day => 1.day(),
            _ => 1.month(),
        };
        let end = start
            .checked_add(step)
            .map(|z| z.timestamp())
            .unwrap_or(Timestamp::MAX);
        Window {
            id: start.timestamp().as_second(),
            end: end.as_second(),
            carry_ppm: 0,
        }
    }

    fn start(&self, zoned: &Zoned) -> Option<Zoned> {
        let day = zoned.start_of_day().ok()?;
        match self {
            Self::Minute => zoned.with().second(0).subsec_nanosecond(0).build().ok(),
            Self::Hour => zoned
                .with()
                .minute(0)
                .second(0)
                .subsec_nanosecond(0)
                .build()
                .ok(),
            Self::Day => Some(day),
            _ => day.first_of_month().ok()?.start_of_day().ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn at(rfc3339: &str) -> SystemTime {
        let ts: Timestamp = rfc3339.parse().unwrap();
        UNIX_EPOCH + Duration::from_secs(u64::try_from(ts.as_second()).unwrap())
    }

    fn ts(secs: i64) -> String {
        Timestamp::from_second(secs).unwrap().to_string()
    }

    #[test]
    fn the_window_cache_answers_as_the_period_does() {
        let paris = TimeZone::get("Europe/Paris").unwrap();
        for period in [Period::Minute, Period::Hour, Period::Day, Period::Month] {
            let cache = WindowCache::default();
            // Across a DST change and a month end, a step at a time, back and forth.
            let start = at("2026-03-28T22:00:00Z");
            for step in (0..400).chain((0..50).rev()) {
                let wall = start + Duration::from_secs(step * 997);
                assert_eq!(
                    cache.window(&period, wall, &paris),
                    period.window(wall, &paris)
                );
            }
        }
    }

    #[test]
    fn calendar_periods_align_in_the_time_zone() {
        let utc = TimeZone::UTC;
        let w = Period::Day.window(at("2026-03-14T23:30:00Z"), &utc);
        assert_eq!(
            (ts(w.id), ts(w.end)),
            ("2026-03-14T00:00:00Z".into(), "2026-03-15T00:00:00Z".into())
        );
        let paris = TimeZone::get("Europe/Paris").unwrap();
        // 23:30 UTC on the 14th is already the 15th in Paris.
        let w = Period::Day.window(at("2026-03-14T23:30:00Z"), &paris);
        assert_eq!(
            (ts(w.id), ts(w.end)),
            ("2026-03-14T23:00:00Z".into(), "2026-03-15T23:00:00Z".into())
        );
        // The day of the spring DST change in Paris has 23 hours.
        let w = Period::Day.window(at("2026-03-29T12:00:00Z"), &paris);
        assert_eq!(w.end - w.id, 23 * 3600);
        let w = Period::Month.window(at("2026-02-10T05:00:00Z"), &utc);
        assert_eq!(
            (ts(w.id), ts(w.end)),
            ("2026-02-01T00:00:00Z".into(), "2026-03-01T00:00:00Z".into())
        );
        let w = Period::Hour.window(at("2026-02-10T05:59:59Z"), &utc);
        assert_eq!(ts(w.end), "2026-02-10T06:00:00Z");
        let w = Period::Minute.window(at("2026-02-10T05:59:59Z"), &utc);
        assert_eq!(w.end - w.id, 60);
    }

    #[test]
    fn rolling_windows_carry_the_previous_bucket() {
        let p: Period = "rolling:24h".parse().unwrap();
        assert_eq!(p, Period::Rolling(Duration::from_secs(86_400)));
        let w = p.window(at("2026-01-01T06:00:00Z"), &TimeZone::UTC);
        assert_eq!(
            w.carry_ppm, 750_000,
            "a quarter into the bucket, three quarters of the last one count"
        );
        for bad in ["week", "rolling:", "rolling:0h", "rolling:5y"] {
            assert!(bad.parse::<Period>().is_err(), "{bad}");
        }
    }
}
