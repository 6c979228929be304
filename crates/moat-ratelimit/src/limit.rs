//! A rate: `count` per `period`, with a burst.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A rate of `count` per `period` (GCRA), allowing a burst of `burst` at once.
///
/// Parsed from strings like `"10/second"`, `"600/minute"`, `"10000/day"`, `"5/10s"` or
/// `"20000/minute"` (tokens); the burst defaults to `count`.
///
/// # Rolling behaviour
///
/// A limit is a generic cell rate (GCRA), not a fixed window: capacity comes back continuously,
/// one unit every `period / count`. With `"5/minute"` a fresh key may send 5 requests at once;
/// after that, one more every 12 seconds, and the full burst of 5 is back 60 seconds after the
/// last request. No window boundary lets a client send 2x the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limit {
    count: u64,
    period: Duration,
    burst: u64,
}

/// Why a limit string did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParseLimitError {
    input: String,
    reason: &'static str,
}

impl fmt::Display for ParseLimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid limit `{}`: {} (expected COUNT/PERIOD, e.g. 10/second, 600/minute, 5/10s)",
            self.input, self.reason
        )
    }
}

impl std::error::Error for ParseLimitError {}

impl Limit {
    /// `count` per `period`, burst `count`. `None` when either is zero or the period is over
    /// ten years.
    pub fn new(count: u64, period: Duration) -> Option<Self> {
        (count > 0 && !period.is_zero() && period <= Duration::from_secs(10 * 365 * 86_400))
            .then_some(Self {
                count,
                period,
                burst: count,
            })
    }

    /// `count` per second.
    pub fn per_second(count: u64) -> Self {
        Self::new(count.max(1), Duration::from_secs(1)).expect("non-zero")
    }

    /// `count` per minute.
    pub fn per_minute(count: u64) -> Self {
        Self::new(count.max(1), Duration::from_secs(60)).expect("non-zero")
    }

    /// `count` per hour.
    pub fn per_hour(count: u64) -> Self {
        Self::new(count.max(1), Duration::from_secs(3600)).expect("non-zero")
    }

    /// `count` per day.
    pub fn per_day(count: u64) -> Self {
        Self::new(count.max(1), Duration::from_secs(86_400)).expect("non-zero")
    }

    /// Allows `burst` at once (at least 1) instead of `count`.
    #[must_use]
    pub fn with_burst(mut self, burst: u64) -> Self {
        self.burst = burst.max(1);
        self
    }

    /// Units per period.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The period.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// Units allowed at once.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// Nanoseconds for one unit to come back.
    pub(crate) fn emission_nanos(&self) -> u64 {
        let nanos = u64::try_from(self.period.as_nanos()).unwrap_or(u64::MAX);
        (nanos / self.count).max(1)
    }

    /// How far ahead of now the theoretical arrival time may run: the burst's worth.
    pub(crate) fn tolerance_nanos(&self) -> u64 {
        self.emission_nanos().saturating_mul(self.burst)
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.period.as_secs();
        let unit = match (secs, self.period.subsec_nanos()) {
            (1, 0) => "second".to_owned(),
            (60, 0) => "minute".to_owned(),
            (3600, 0) => "hour".to_owned(),
            (86_400, 0) => "day".to_owned(),
            (s, 0) => format!("{s}s"),
            _ => format!("{}ms", self.period.as_millis()),
        };
        write!(f, "{}/{unit}", self.count)?;
        if self.burst != self.count {
            write!(f, " (burst {})", self.burst)?;
        }
        Ok(())
    }
}

impl FromStr for Limit {
    type Err = ParseLimitError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseLimitError {
            input: input.to_owned(),
            reason,
        };
        let (count, period) = input.trim().split_once('/').ok_or_else(|| err("no `/`"))?;
        let count: u64 = count
            .trim()
            .replace('_', "")
            .parse()
            .map_err(|_| err("the count is not a whole number"))?;
        let period = parse_period(period.trim()).ok_or_else(|| err("unknown period"))?;
        Limit::new(count, period).ok_or_else(|| err("count and period must be positive"))
    }
}

/// `second`/`minute`/`hour`/`day` (also `s`, `sec`, `m`, `min`, `h`, `d`, plurals), or a number
/// with a unit: `10s`, `500ms`, `5m`, `2h`, `1d`.
fn parse_period(period: &str) -> Option<Duration> {
    let unit_secs = |unit: &str| -> Option<u64> {
        Some(match unit {
            "s" | "sec" | "secs" | "second" | "seconds" => 1,
            "m" | "min" | "mins" | "minute" | "minutes" => 60,
            "h" | "hr" | "hour" | "hours" => 3600,
            "d" | "day" | "days" => 86_400,
            _ => return None,
        })
    };
    let digits = period.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return unit_secs(period).map(Duration::from_secs);
    }
    let n: u64 = period[..digits].parse().ok()?;
    let unit = period[digits..].trim();
    if unit == "ms" {
        return Some(Duration::from_millis(n));
    }
    Some(Duration::from_secs(n.checked_mul(unit_secs(unit)?)?))
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for Limit {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The GCRA state change of one request against one limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gcra {
    /// Fits: store `tat`.
    Fits { tat: u64 },
    /// Does not fit now; fits after `retry_after` nanoseconds.
    Wait { retry_after: u64 },
    /// Needs more than the whole burst: never fits.
    Never,
}

/// Checks `cost` units arriving at `now` against a limit whose theoretical arrival time is `tat`.
pub(crate) fn gcra(tat: u64, now: u64, cost: u64, emission: u64, tolerance: u64) -> Gcra {
    let increment = cost.saturating_mul(emission);
    if increment > tolerance {
        return Gcra::Never;
    }
    let new_tat = tat.max(now).saturating_add(increment);
    let ahead = new_tat - now;
    if ahead <= tolerance {
        Gcra::Fits { tat: new_tat }
    } else {
        Gcra::Wait {
            retry_after: ahead - tolerance,
        }
    }
}

/// Remaining units and nanoseconds until the limit is fully back, for a stored `tat`.
pub(crate) fn remaining(tat: u64, now: u64, emission: u64, tolerance: u64) -> (u64, u64) {
    let ahead = tat.saturating_sub(now);
    ((tolerance.saturating_sub(ahead)) / emission, ahead)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!("10/second".parse::<Limit>().unwrap(), Limit::per_second(10));
        assert_eq!(
            "600/minute".parse::<Limit>().unwrap(),
            Limit::per_minute(600)
        );
        assert_eq!(
            " 10_000 / day ".parse::<Limit>().unwrap(),
            Limit::per_day(10_000)
        );
        assert_eq!(
            "20000/min".parse::<Limit>().unwrap(),
            Limit::per_minute(20_000)
        );
        assert_eq!(
            "5/10s".parse::<Limit>().unwrap().period(),
            Duration::from_secs(10)
        );
        assert_eq!(
            "5/500ms".parse::<Limit>().unwrap().period(),
            Duration::from_millis(500)
        );
        assert_eq!(
            "1/2h".parse::<Limit>().unwrap().period(),
            Duration::from_secs(7200)
        );
        for bad in [
            "",
            "10",
            "x/second",
            "10/fortnight",
            "0/second",
            "10/0s",
            "-1/second",
            "10/99999999999999999d",
        ] {
            let e = bad.parse::<Limit>().unwrap_err().to_string();
            assert!(e.starts_with("invalid limit"), "{bad}: {e}");
        }
        assert_eq!(Limit::per_minute(5).to_string(), "5/minute");
        assert_eq!(
            Limit::per_second(2).with_burst(10).to_string(),
            "2/second (burst 10)"
        );
        assert_eq!("3/10s".parse::<Limit>().unwrap().to_string(), "3/10s");
    }

    #[test]
    fn gcra_admits_the_burst_then_one_per_emission() {
        let limit = Limit::per_minute(5);
        let (e, t) = (limit.emission_nanos(), limit.tolerance_nanos());
        let mut tat = 0;
        let now = 1_000;
        for _ in 0..5 {
            match gcra(tat, now, 1, e, t) {
                Gcra::Fits { tat: next } => tat = next,
                other => panic!("{other:?}"),
            }
        }
        let Gcra::Wait { retry_after } = gcra(tat, now, 1, e, t) else {
            panic!()
        };
        assert_eq!(retry_after, 12_000_000_000, "one emission interval");
        assert!(matches!(
            gcra(tat, now + retry_after, 1, e, t),
            Gcra::Fits { .. }
        ));
        assert_eq!(remaining(tat, now, e, t), (0, 60_000_000_000));
        assert_eq!(remaining(tat, now + 60_000_000_000, e, t), (5, 0));
        assert_eq!(
            gcra(0, now, 6, e, t),
            Gcra::Never,
            "more than the burst never fits"
        );
        assert!(matches!(gcra(0, now, 0, e, t), Gcra::Fits { .. }));
    }
}
