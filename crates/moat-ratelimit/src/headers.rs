//! Rate-limit response headers: OpenAI's `x-ratelimit-*` and the IETF `RateLimit` fields.

use std::sync::OnceLock;
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Binding {
    pub(crate) limit: u64,
    /// `limit`, formatted once per rule.
    pub(crate) limit_value: HeaderValue,
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

/// A short ASCII value built on the stack, so a header value costs one allocation (its own).
struct Ascii {
    buf: [u8; 48],
    len: usize,
}

impl Ascii {
    fn new() -> Self {
        Self {
            buf: [0; 48],
            len: 0,
        }
    }

    fn push(&mut self, text: &str) -> &mut Self {
        // The longest duration, `18446744073709551615h59m59.999s`, fits.
        self.buf[self.len..self.len + text.len()].copy_from_slice(text.as_bytes());
        self.len += text.len();
        self
    }

    fn number(&mut self, n: u64) -> &mut Self {
        self.push(itoa::Buffer::new().format(n))
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).expect("only ASCII is pushed")
    }

    fn header_value(&self) -> HeaderValue {
        HeaderValue::from_bytes(&self.buf[..self.len]).expect("digits and letters")
    }
}

/// A duration as OpenAI writes it: `12ms`, `1s`, `2.5s`, `6m0s`, `1h2m3s`.
fn duration_text(d: Duration) -> Ascii {
    let ms = u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
    let mut out = Ascii::new();
    if ms < 1000 {
        out.number(ms).push("ms");
        return out;
    }
    let (hours, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (minutes, rest) = (rest / 60_000, rest % 60_000);
    if hours > 0 {
        out.number(hours).push("h");
    }
    if hours > 0 || minutes > 0 {
        out.number(minutes).push("m");
    }
    let (secs, millis) = (rest / 1000, rest % 1000);
    out.number(secs);
    if millis > 0 {
        // Three digits, trailing zeros dropped: 2.5s, 3.004s.
        let digits = [millis / 100, millis / 10 % 10, millis % 10];
        let kept = if digits[2] != 0 {
            3
        } else if digits[1] != 0 {
            2
        } else {
            1
        };
        out.push(".");
        for d in &digits[..kept] {
            out.number(*d);
        }
    }
    out.push("s");
    out
}

/// [`duration_text`] as a `String`, for messages.
pub(crate) fn duration_string(d: Duration) -> String {
    duration_text(d).as_str().to_owned()
}

/// Numbers below this are formatted once per process: request limits and what remains of them
/// mostly are, resets under a second are, and a static header value is cloned without
/// allocating (or counting references).
const FORMATTED_ONCE: u64 = 1024;

/// The values `0{suffix}` to `1023{suffix}`, made on first use.
fn formatted_once(
    table: &'static OnceLock<Vec<HeaderValue>>,
    suffix: &str,
) -> &'static [HeaderValue] {
    table.get_or_init(|| {
        // One string of every value, leaked once so each value can borrow it for 'static.
        let all: &'static str = Box::leak(
            (0..FORMATTED_ONCE)
                .map(|i| format!("{i}{suffix}"))
                .collect::<String>()
                .into_boxed_str(),
        );
        let mut at = 0;
        (0..FORMATTED_ONCE)
            .map(|i| {
                let len = itoa::Buffer::new().format(i).len() + suffix.len();
                let value = HeaderValue::from_static(&all[at..at + len]);
                at += len;
                value
            })
            .collect()
    })
}

pub(crate) fn number(n: u64) -> HeaderValue {
    static SMALL: OnceLock<Vec<HeaderValue>> = OnceLock::new();
    match usize::try_from(n) {
        Ok(small) if n < FORMATTED_ONCE => formatted_once(&SMALL, "")[small].clone(),
        _ => HeaderValue::from(n),
    }
}

/// [`duration_text`] as a header value.
fn duration_value(d: Duration) -> HeaderValue {
    static MILLIS: OnceLock<Vec<HeaderValue>> = OnceLock::new();
    let ms = d.as_nanos().div_ceil(1_000_000);
    match usize::try_from(ms) {
        Ok(small) if ms < 1000 => formatted_once(&MILLIS, "ms")[small].clone(),
        _ => duration_text(d).header_value(),
    }
}

/// Writes the headers for the tightest request and token limits.
pub(crate) fn write(
    which: Headers,
    headers: &mut HeaderMap,
    requests: Option<Binding>,
    tokens: Option<Binding>,
) {
    if which.openai {
        headers.reserve(3 * (usize::from(requests.is_some()) + usize::from(tokens.is_some())));
        // Built at compile time: `from_static` at run time would validate every name.
        const NAMES: [[HeaderName; 3]; 2] = [
            [
                HeaderName::from_static("x-ratelimit-limit-requests"),
                HeaderName::from_static("x-ratelimit-remaining-requests"),
                HeaderName::from_static("x-ratelimit-reset-requests"),
            ],
            [
                HeaderName::from_static("x-ratelimit-limit-tokens"),
                HeaderName::from_static("x-ratelimit-remaining-tokens"),
                HeaderName::from_static("x-ratelimit-reset-tokens"),
            ],
        ];
        for (names, binding) in NAMES.iter().zip([&requests, &tokens]) {
            let Some(b) = binding else { continue };
            let [limit, remaining, reset] = names;
            headers.insert(limit, b.limit_value.clone());
            headers.insert(remaining, number(b.remaining));
            headers.insert(reset, duration_value(b.reset));
        }
    }
    if which.ietf {
        let mut policy = Vec::new();
        let mut state = Vec::new();
        for (kind, binding) in [("requests", &requests), ("tokens", &tokens)] {
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
    fn values_formatted_once_or_each_time_read_the_same() {
        for n in (0..2 * FORMATTED_ONCE).chain([u64::MAX, 1 << 40]) {
            assert_eq!(number(n).to_str().unwrap(), n.to_string());
        }
        for ms in (0..3000).chain([60_000, 3_723_004]) {
            let d = Duration::from_millis(ms);
            assert_eq!(duration_value(d).to_str().unwrap(), duration_string(d));
        }
        let d = Duration::from_nanos(999_000_001);
        assert_eq!(duration_value(d).to_str().unwrap(), "1s");
    }

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
        assert_eq!(duration_string(ms(61_050)), "1m1.05s");
        assert_eq!(duration_string(ms(1_200)), "1.2s");
        assert_eq!(
            duration_string(Duration::MAX),
            "5124095576030h25m51.615s",
            "the longest fits"
        );
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
            limit_value: HeaderValue::from(60),
            remaining: 59,
            reset: Duration::from_secs(1),
            window: Duration::from_secs(60),
        };
        let tok = Binding {
            limit: 150_000,
            limit_value: HeaderValue::from(150_000),
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
            Some(req.clone()),
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
