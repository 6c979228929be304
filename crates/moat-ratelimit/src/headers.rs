//! Rate-limit response headers: OpenAI's `x-ratelimit-*` and the IETF `RateLimit` fields.

use std::fmt::Write;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;

/// Which rate-limit headers go on responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Headers {
    /// OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (default on).
    pub openai: bool,
    /// The IETF draft's `RateLimit-Policy` and `RateLimit` (default off).
    pub ietf: bool,
}

impl Default for Headers {
    fn default() -> Self {
        Self::OPENAI
    }
}

impl Headers {
    /// OpenAI's `x-ratelimit-*` only (the default).
    pub const OPENAI: Headers = Headers {
        openai: true,
        ietf: false,
    };

    /// The IETF `RateLimit-Policy` and `RateLimit` only.
    pub const IETF: Headers = Headers {
        openai: false,
        ietf: true,
    };

    /// Both.
    pub const BOTH: Headers = Headers {
        openai: true,
        ietf: true,
    };

    /// No rate-limit headers (denials still carry `retry-after`).
    pub const NONE: Headers = Headers {
        openai: false,
        ietf: false,
    };
}

/// The state of the tightest limit of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Binding {
    pub(crate) limit: u64,
    pub(crate) remaining: u64,
    pub(crate) reset: Duration,
    pub(crate) window: Duration,
}

impl Binding {
    /// Keeps the tighter of two states.
    pub(crate) fn tighter(current: Option<Binding>, candidate: Binding) -> Option<Binding> {
        match current {
            Some(c) if c.remaining <= candidate.remaining => Some(c),
            _ => Some(candidate),
        }
    }
}

/// A duration as OpenAI writes it: `12ms`, `1s`, `2.5s`, `6m0s`, `1h2m3s`.
pub(crate) fn duration_string(d: Duration) -> String {
    let ms = u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (hours, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (minutes, rest) = (rest / 60_000, rest % 60_000);
    let mut out = String::new();
    if hours > 0 {
        let _ = write!(out, "{hours}h");
    }
    if hours > 0 || minutes > 0 {
        let _ = write!(out, "{minutes}m");
    }
    let (secs, millis) = (rest / 1000, rest % 1000);
    if millis == 0 {
        let _ = write!(out, "{secs}s");
    } else {
        let frac = format!("{millis:03}");
        let _ = write!(out, "{secs}.{}s", frac.trim_end_matches('0'));
    }
    out
}

fn number(n: u64) -> HeaderValue {
    HeaderValue::from(n)
}

/// Writes the headers for the tightest request and token limits.
pub(crate) fn write(
    which: Headers,
    headers: &mut HeaderMap,
    requests: Option<Binding>,
    tokens: Option<Binding>,
) {
    if which.openai {
        const NAMES: [[&str; 3]; 2] = [
            [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
            ],
            [
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ],
        ];
        for (names, binding) in NAMES.iter().zip([requests, tokens]) {
            let Some(b) = binding else { continue };
            headers.insert(HeaderName::from_static(names[0]), number(b.limit));
            headers.insert(HeaderName::from_static(names[1]), number(b.remaining));
            if let Ok(reset) = HeaderValue::from_str(&duration_string(b.reset)) {
                headers.insert(HeaderName::from_static(names[2]), reset);
            }
        }
    }
    if which.ietf {
        let mut policy = Vec::new();
        let mut state = Vec::new();
        for (kind, binding) in [("requests", requests), ("tokens", tokens)] {
            let Some(b) = binding else { continue };
            policy.push(format!(
                "\"{kind}\";q={};w={}",
                b.limit,
                b.window.as_secs().max(1)
            ));
            state.push(format!(
                "\"{kind}\";r={};t={}",
                b.remaining,
                b.reset.as_nanos().div_ceil(1_000_000_000)
            ));
        }
        if !policy.is_empty() {
            if let Ok(v) = HeaderValue::from_str(&policy.join(", ")) {
                headers.insert("ratelimit-policy", v);
            }
            if let Ok(v) = HeaderValue::from_str(&state.join(", ")) {
                headers.insert("ratelimit", v);
            }
        }
    }
}

/// `retry-after` (whole seconds, rounded up, at least 1) and `retry-after-ms`.
pub(crate) fn retry_after(headers: &mut HeaderMap, wait: Duration) {
    let secs = u64::try_from(wait.as_nanos().div_ceil(1_000_000_000))
        .unwrap_or(u64::MAX)
        .max(1);
    let ms = u64::try_from(wait.as_nanos().div_ceil(1_000_000))
        .unwrap_or(u64::MAX)
        .max(1);
    headers.insert(http::header::RETRY_AFTER, number(secs));
    headers.insert("retry-after-ms", number(ms));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_like_openai() {
        let ms = Duration::from_millis;
        assert_eq!(duration_string(ms(12)), "12ms");
        assert_eq!(
            duration_string(Duration::from_nanos(1)),
            "1ms",
            "rounded up, never 0ms"
        );
        assert_eq!(duration_string(Duration::ZERO), "0ms");
        assert_eq!(duration_string(ms(1000)), "1s");
        assert_eq!(duration_string(ms(2500)), "2.5s");
        assert_eq!(duration_string(ms(360_000)), "6m0s");
        assert_eq!(duration_string(ms(3_723_004)), "1h2m3.004s");
        assert_eq!(duration_string(ms(3_600_000)), "1h0m0s");
    }

    #[test]
    fn retry_after_rounds_up_and_is_never_zero() {
        let mut h = HeaderMap::new();
        retry_after(&mut h, Duration::from_millis(1));
        assert_eq!(
            (
                h["retry-after"].to_str().unwrap(),
                h["retry-after-ms"].to_str().unwrap()
            ),
            ("1", "1")
        );
        retry_after(&mut h, Duration::from_millis(12_001));
        assert_eq!(
            (
                h["retry-after"].to_str().unwrap(),
                h["retry-after-ms"].to_str().unwrap()
            ),
            ("13", "12001")
        );
        retry_after(&mut h, Duration::ZERO);
        assert_eq!(h["retry-after"], "1");
    }

    #[test]
    fn openai_and_ietf_headers() {
        let mut h = HeaderMap::new();
        let req = Binding {
            limit: 60,
            remaining: 59,
            reset: Duration::from_secs(1),
            window: Duration::from_secs(60),
        };
        let tok = Binding {
            limit: 150_000,
            remaining: 149_984,
            reset: Duration::from_millis(6),
            window: Duration::from_secs(60),
        };
        write(
            Headers {
                openai: true,
                ietf: true,
            },
            &mut h,
            Some(req),
            Some(tok),
        );
        assert_eq!(h["x-ratelimit-limit-requests"], "60");
        assert_eq!(h["x-ratelimit-remaining-requests"], "59");
        assert_eq!(h["x-ratelimit-reset-requests"], "1s");
        assert_eq!(h["x-ratelimit-remaining-tokens"], "149984");
        assert_eq!(h["x-ratelimit-reset-tokens"], "6ms");
        assert_eq!(
            h["ratelimit-policy"],
            "\"requests\";q=60;w=60, \"tokens\";q=150000;w=60"
        );
        assert_eq!(
            h["ratelimit"],
            "\"requests\";r=59;t=1, \"tokens\";r=149984;t=1"
        );
        let mut none = HeaderMap::new();
        write(Headers::NONE, &mut none, Some(req), None);
        assert!(none.is_empty());
    }
}
