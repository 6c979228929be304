//! What makes a breaker trip, and how long it stays open.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// The calls a breaker judges the upstream by.
///
/// Written `count:N` (the last `N` calls) or `time:D` (the calls of the last `D`, in whole
/// seconds, e.g. `time:30s`) in a configuration file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(try_from = "String"))]
#[non_exhaustive]
pub enum Window {
    /// The last `n` calls (1 to 10,000).
    Count(u32),
    /// The calls that ended in the last whole seconds of this duration (1 s to 1 h).
    Time(Duration),
}

/// The largest count window: its slots are scanned when a failure is recorded.
pub const MAX_COUNT_WINDOW: u32 = 10_000;
/// The longest time window: one bucket per second.
pub const MAX_TIME_WINDOW: Duration = Duration::from_secs(3600);

impl Default for Window {
    fn default() -> Self {
        Self::Count(100)
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Count(n) => write!(f, "count:{n}"),
            Self::Time(d) => write!(f, "time:{}s", d.as_secs()),
        }
    }
}

impl FromStr for Window {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let invalid = || ConfigError::Window(s.to_owned());
        let window = match s.split_once(':') {
            Some(("count", n)) => Self::Count(n.trim().parse().map_err(|_| invalid())?),
            Some(("time", d)) => {
                let d = d.trim();
                let secs = d.strip_suffix('s').unwrap_or(d);
                let duration = match secs.parse::<u64>() {
                    Ok(secs) => Duration::from_secs(secs),
                    Err(_) => parse_duration(d).ok_or_else(invalid)?,
                };
                Self::Time(duration)
            }
            _ => return Err(invalid()),
        };
        window.check()?;
        Ok(window)
    }
}

impl TryFrom<String> for Window {
    type Error = ConfigError;

    fn try_from(s: String) -> Result<Self, ConfigError> {
        s.parse()
    }
}

impl Window {
    fn check(self) -> Result<(), ConfigError> {
        let ok = match self {
            Self::Count(n) => (1..=MAX_COUNT_WINDOW).contains(&n),
            Self::Time(d) => {
                d.subsec_nanos() == 0 && d >= Duration::from_secs(1) && d <= MAX_TIME_WINDOW
            }
        };
        if ok {
            Ok(())
        } else {
            Err(ConfigError::Window(self.to_string()))
        }
    }
}

/// `5m`, `30s`, `1500ms`, `2h 30m`: durations as a configuration file writes them.
fn parse_duration(s: &str) -> Option<Duration> {
    humantime::parse_duration(s).ok()
}

/// When a breaker opens, how long it stays open and how it tries the upstream again.
///
/// The defaults suit an LLM provider: trip when half of at least 10 of the last 100 calls
/// failed, stay open 30 s (doubling on each trip that follows a failed trial, up to 5 min, with
/// 10% jitter), then let 3 trial calls through.
///
/// ```
/// use moat_breaker::{BreakerConfig, Window};
/// use std::time::Duration;
///
/// let config = BreakerConfig::default()
///     .with_failure_rate(0.5)
///     .with_minimum_calls(10)
///     .with_window(Window::Time(Duration::from_secs(30)))
///     .with_open_for(Duration::from_secs(10))
///     .with_half_open_calls(2)
///     .with_slow_call(Duration::from_secs(30));
/// assert!(config.check().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct BreakerConfig {
    /// Trip when at least this share of the window's calls failed (0 < rate ≤ 1).
    pub failure_rate: f64,
    /// With `slow_call` set: trip when at least this share of the window's calls were slow
    /// (0 < rate ≤ 1; the default 1 trips only when every call is slow).
    pub slow_call_rate: f64,
    /// A call slower than this is slow: time to the response head, or to the first streamed
    /// event. Unset (the default), calls are not timed, and the closed path reads no clock.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde::option"))]
    pub slow_call: Option<Duration>,
    /// No rate trips the breaker before the window holds this many calls.
    pub minimum_calls: u32,
    /// The calls the rates are computed over.
    pub window: Window,
    /// Also trip after this many failures in a row, whatever the rates.
    pub consecutive_failures: Option<u32>,
    /// How long the breaker stays open after its first trip.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub open_for: Duration,
    /// Each trip that follows a failed trial stays open this many times longer (1: constant).
    pub open_growth: f64,
    /// The longest the breaker stays open, however often it tripped.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub open_max: Duration,
    /// Spread open durations by up to this share either way (0 to 1), so that breakers that
    /// tripped together do not all try the upstream again at the same instant.
    pub jitter: f64,
    /// Trial calls let through when half-open (1 to 1,000): all must end before the breaker
    /// decides, and it closes only if their failure rate is under `failure_rate`.
    pub half_open_calls: u32,
    /// The longest the breaker waits half-open for its trials to end before opening again.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub half_open_max_wait: Duration,
    /// A streamed reply with no first event by then is a failure, answered 504 before any
    /// header reaches the client (and a fallback can serve the request instead).
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde::option"))]
    pub first_token_timeout: Option<Duration>,
    /// How long a 429 without `retry-after` keeps the upstream marked rate-limited.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub rate_limited_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_rate: 0.5,
            slow_call_rate: 1.0,
            slow_call: None,
            minimum_calls: 10,
            window: Window::default(),
            consecutive_failures: None,
            open_for: Duration::from_secs(30),
            open_growth: 2.0,
            open_max: Duration::from_secs(300),
            jitter: 0.1,
            half_open_calls: 3,
            half_open_max_wait: Duration::from_secs(120),
            first_token_timeout: None,
            rate_limited_for: Duration::from_secs(1),
        }
    }
}

/// The most trial calls a half-open breaker admits.
pub const MAX_HALF_OPEN_CALLS: u32 = 1000;

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $field:ident: $ty:ty;)*) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, value: $ty) -> Self {
                self.$field = value;
                self
            }
        )*
    };
}

impl BreakerConfig {
    setters! {
        /// Sets [`failure_rate`](Self::failure_rate).
        with_failure_rate: failure_rate: f64;
        /// Sets [`slow_call_rate`](Self::slow_call_rate).
        with_slow_call_rate: slow_call_rate: f64;
        /// Sets [`minimum_calls`](Self::minimum_calls).
        with_minimum_calls: minimum_calls: u32;
        /// Sets [`window`](Self::window).
        with_window: window: Window;
        /// Sets [`open_for`](Self::open_for).
        with_open_for: open_for: Duration;
        /// Sets [`open_growth`](Self::open_growth).
        with_open_growth: open_growth: f64;
        /// Sets [`open_max`](Self::open_max).
        with_open_max: open_max: Duration;
        /// Sets [`jitter`](Self::jitter).
        with_jitter: jitter: f64;
        /// Sets [`half_open_calls`](Self::half_open_calls).
        with_half_open_calls: half_open_calls: u32;
        /// Sets [`half_open_max_wait`](Self::half_open_max_wait).
        with_half_open_max_wait: half_open_max_wait: Duration;
        /// Sets [`rate_limited_for`](Self::rate_limited_for).
        with_rate_limited_for: rate_limited_for: Duration;
    }

    /// Sets [`consecutive_failures`](Self::consecutive_failures).
    pub fn with_consecutive_failures(mut self, failures: u32) -> Self {
        self.consecutive_failures = Some(failures);
        self
    }

    /// Sets [`slow_call`](Self::slow_call): calls are timed.
    pub fn with_slow_call(mut self, threshold: Duration) -> Self {
        self.slow_call = Some(threshold);
        self
    }

    /// Sets [`first_token_timeout`](Self::first_token_timeout).
    pub fn with_first_token_timeout(mut self, timeout: Duration) -> Self {
        self.first_token_timeout = Some(timeout);
        self
    }

    /// Whether the configuration makes sense; [`Breaker`](crate::Breaker) checks it when built.
    pub fn check(&self) -> Result<(), ConfigError> {
        let rate = |name: &'static str, value: f64| {
            if value > 0.0 && value <= 1.0 {
                Ok(())
            } else {
                Err(ConfigError::Out {
                    field: name,
                    expected: "a share over 0 and at most 1",
                })
            }
        };
        rate("failure_rate", self.failure_rate)?;
        rate("slow_call_rate", self.slow_call_rate)?;
        self.window.check()?;
        let out = |field, expected| Err(ConfigError::Out { field, expected });
        if self.minimum_calls == 0 {
            return out("minimum_calls", "at least 1");
        }
        if let Window::Count(n) = self.window {
            if self.minimum_calls > n {
                return out("minimum_calls", "at most the count window's size");
            }
        }
        if self.consecutive_failures == Some(0) {
            return out("consecutive_failures", "at least 1");
        }
        if self.open_for.is_zero() {
            return out("open_for", "over zero");
        }
        if !(self.open_growth >= 1.0 && self.open_growth <= 100.0) {
            return out("open_growth", "from 1 to 100");
        }
        if self.open_max < self.open_for {
            return out("open_max", "at least open_for");
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return out("jitter", "from 0 to 1");
        }
        if !(1..=MAX_HALF_OPEN_CALLS).contains(&self.half_open_calls) {
            return out("half_open_calls", "from 1 to 1000");
        }
        if self.half_open_max_wait.is_zero() {
            return out("half_open_max_wait", "over zero");
        }
        if self.slow_call.is_some_and(|d| d.is_zero()) {
            return out("slow_call", "over zero");
        }
        if self.first_token_timeout.is_some_and(|d| d.is_zero()) {
            return out("first_token_timeout", "over zero");
        }
        Ok(())
    }
}

/// A breaker configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A window that is not `count:N` (1 to 10,000) or `time:Ns` (1 s to 1 h, whole seconds).
    Window(String),
    /// A value out of its range.
    Out {
        /// The field.
        field: &'static str,
        /// What it must be.
        expected: &'static str,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Window(w) => write!(
                f,
                "window {w:?} must be \"count:N\" (N from 1 to {MAX_COUNT_WINDOW}) or \"time:Ns\" (whole seconds, 1s to 1h)"
            ),
            Self::Out { field, expected } => write!(f, "{field} must be {expected}"),
        }
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_and_print() {
        assert_eq!("count:20".parse::<Window>().unwrap(), Window::Count(20));
        assert_eq!(
            "time:30s".parse::<Window>().unwrap(),
            Window::Time(Duration::from_secs(30))
        );
        assert_eq!(Window::Count(20).to_string(), "count:20");
        for bad in [
            "count:0",
            "count:x",
            "time:0s",
            "time:2h",
            "sliding:3",
            "20",
        ] {
            assert!(bad.parse::<Window>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_defaults_are_valid_and_nonsense_is_named() {
        assert!(BreakerConfig::default().check().is_ok());
        let err = BreakerConfig::default()
            .with_failure_rate(1.5)
            .check()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "failure_rate must be a share over 0 and at most 1"
        );
        let err = BreakerConfig::default()
            .with_window(Window::Count(5))
            .check()
            .unwrap_err();
        assert!(err.to_string().starts_with("minimum_calls"), "{err}");
        assert!(BreakerConfig::default()
            .with_half_open_calls(0)
            .check()
            .is_err());
        assert!(BreakerConfig::default()
            .with_open_max(Duration::from_secs(1))
            .check()
            .is_err());
    }
}
