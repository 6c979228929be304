//! What counts against an upstream's health.
//!
//! [`LlmClassifier`], the default, reads a response head the way an LLM provider means it:
//!
//! | response | verdict | counts against health |
//! |---|---|---|
//! | 1xx–3xx | [`Success`](Verdict::Success) | yes, as a success |
//! | 5xx (529 overloaded included), 408 | [`Failure`](Verdict::Failure) | yes |
//! | 429 | [`RateLimited`](Verdict::RateLimited): refused until its `retry-after` | no |
//! | 401, 403 | [`KeyRejected`](Verdict::KeyRejected): the key's problem | no |
//! | other 4xx (bad request, context length, content filter) | [`Ignored`](Verdict::Ignored): the client's | no |
//!
//! gRPC replies are judged by their `grpc-status` (in the head of a trailers-only reply, or in
//! the trailers): `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `INTERNAL`, `DATA_LOSS` and `UNKNOWN` fail,
//! `RESOURCE_EXHAUSTED` is a rate limit, `UNAUTHENTICATED` and `PERMISSION_DENIED` are the key's,
//! the rest are the client's.
//!
//! The service adds what a head cannot say: an error from the inner service, a streamed reply
//! whose first event is an error or that stalls before it, and a body that breaks midway are
//! failures; a client that goes away is not counted.
//!
//! Any `Fn(StatusCode, &HeaderMap) -> Verdict` is a classifier too. tower-http's `classify`
//! module answers a different question (is this a failure for a log line, with no notion of
//! "the client's fault" or "rate-limited"), so it is not reused here.

use std::fmt;
use std::time::Duration;

use http::{HeaderMap, StatusCode};

/// How a response counts against the upstream's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// The upstream did its job.
    Success,
    /// The upstream failed.
    Failure,
    /// The upstream is rate-limiting: leave it alone until its `retry-after`, without counting
    /// it as unhealthy.
    RateLimited,
    /// The credentials were refused: the key's problem, not the upstream's health.
    KeyRejected,
    /// The client's problem (a bad request): not counted.
    Ignored,
}

/// Decides how a response counts; see the [module docs](self).
pub trait Classify: Send + Sync + 'static {
    /// The verdict on a response head.
    fn classify(&self, status: StatusCode, headers: &HeaderMap) -> Verdict;
}

impl<F> Classify for F
where
    F: Fn(StatusCode, &HeaderMap) -> Verdict + Send + Sync + 'static,
{
    fn classify(&self, status: StatusCode, headers: &HeaderMap) -> Verdict {
        self(status, headers)
    }
}

/// The default classifier, for LLM providers; see the [module docs](self).
#[derive(Debug, Clone, Copy, Default)]
pub struct LlmClassifier;

impl Classify for LlmClassifier {
    fn classify(&self, status: StatusCode, headers: &HeaderMap) -> Verdict {
        if let Some(verdict) = grpc_verdict(headers) {
            return verdict;
        }
        match status.as_u16() {
            429 => Verdict::RateLimited,
            401 | 403 => Verdict::KeyRejected,
            408 | 500..=599 => Verdict::Failure,
            400..=499 => Verdict::Ignored,
            _ => Verdict::Success,
        }
    }
}

/// The verdict of a `grpc-status` in `headers` (a head or trailers), if there is one.
pub(crate) fn grpc_verdict(headers: &HeaderMap) -> Option<Verdict> {
    let code: u32 = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(match code {
        0 => Verdict::Success,
        2 | 4 | 13 | 14 | 15 => Verdict::Failure,
        8 => Verdict::RateLimited,
        7 | 16 => Verdict::KeyRejected,
        _ => Verdict::Ignored,
    })
}

pub(crate) struct SharedClassifier(pub(crate) Box<dyn Classify>);

impl fmt::Debug for SharedClassifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Classify")
    }
}

/// How long the upstream asked to be left alone: `retry-after-ms` (OpenAI), else
/// `retry-after` in seconds (HTTP dates are not read: providers send seconds). Capped at a day.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| -> Option<f64> {
        let value = headers
            .get(name)?
            .to_str()
            .ok()?
            .trim()
            .parse::<f64>()
            .ok()?;
        (value.is_finite() && value >= 0.0).then_some(value)
    };
    let seconds = number("retry-after-ms")
        .map(|ms| ms / 1000.0)
        .or_else(|| number("retry-after"))?;
    Some(Duration::from_secs_f64(seconds.min(86_400.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_llm_table() {
        let c = LlmClassifier;
        let h = HeaderMap::new();
        for (status, verdict) in [
            (200, Verdict::Success),
            (304, Verdict::Success),
            (500, Verdict::Failure),
            (502, Verdict::Failure),
            (503, Verdict::Failure),
            (504, Verdict::Failure),
            (529, Verdict::Failure),
            (408, Verdict::Failure),
            (429, Verdict::RateLimited),
            (401, Verdict::KeyRejected),
            (403, Verdict::KeyRejected),
            (400, Verdict::Ignored),
            (404, Verdict::Ignored),
            (413, Verdict::Ignored),
            (422, Verdict::Ignored),
        ] {
            assert_eq!(
                c.classify(StatusCode::from_u16(status).unwrap(), &h),
                verdict,
                "{status}"
            );
        }
    }

    #[test]
    fn grpc_statuses_are_read_from_the_head() {
        let c = LlmClassifier;
        for (code, verdict) in [
            ("0", Verdict::Success),
            ("14", Verdict::Failure),
            ("4", Verdict::Failure),
            ("8", Verdict::RateLimited),
            ("16", Verdict::KeyRejected),
            ("3", Verdict::Ignored),
        ] {
            let mut h = HeaderMap::new();
            h.insert("grpc-status", code.parse().unwrap());
            assert_eq!(c.classify(StatusCode::OK, &h), verdict, "{code}");
        }
    }

    #[test]
    fn retry_after_reads_ms_then_seconds() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert("retry-after-ms", "1500".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        h.insert("retry-after-ms", "-1".parse().unwrap());
        assert_eq!(
            retry_after(&h),
            Some(Duration::from_secs(3)),
            "nonsense ms is skipped"
        );
        h.insert(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        h.remove("retry-after-ms");
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "1e12".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(86_400)));
    }
}
