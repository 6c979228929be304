//! Retries that respect limits: jittered exponential backoff, `retry-after` honoured, a retry
//! budget, and only what is safe to send again.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tower::retry::budget::{Budget, TpsBudget};

use crate::service::{Reason, Unavailable};

/// Jittered exponential backoff: attempt `n` waits a random time between half and all of
/// `base * 2^n`, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
}

impl Default for Backoff {
    /// 200 ms, doubling, up to 5 s.
    fn default() -> Self {
        Self::new(Duration::from_millis(200), Duration::from_secs(5))
    }
}

impl Backoff {
    /// Starting at `base`, doubling, up to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
        }
    }

    /// The longest any wait can be.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The wait before retry number `attempt` (0 for the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        let full = self
            .base
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max);
        let half = full / 2;
        half + half.mul_f64(random_unit())
    }

    /// The wait before retry `attempt` of a call that got `retry_after`: the longer of the two,
    /// or `None` if the upstream asked for more than this backoff would ever wait.
    pub fn delay_after(&self, attempt: u32, retry_after: Option<Duration>) -> Option<Duration> {
        match retry_after {
            Some(after) if after > self.max => None,
            Some(after) => Some(after.max(self.delay(attempt))),
            None => Some(self.delay(attempt)),
        }
    }
}

/// A uniform number in [0, 1): jitter needs no more than a hashed counter.
fn random_unit() -> f64 {
    static STATE: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = STATE.get_or_init(RandomState::new).build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Whether a response may be sent again, and after how long the upstream asked.
///
/// Safe to retry: a response a [`CircuitBreaker`](crate::CircuitBreaker) marked
/// [`Unavailable`] because the upstream failed, stalled or said 429 (nothing of it reached
/// the client; a stream is judged by its first event, before any byte goes on); without a
/// breaker, a 429, 502, 503, 504 or 529. Never an open breaker (falling back beats waiting),
/// refused credentials, or anything else.
pub fn retryable<B>(response: &Response<B>) -> Option<Option<Duration>> {
    if let Some(unavailable) = response.extensions().get::<Unavailable>() {
        return match unavailable.reason {
            Reason::Failed | Reason::Stalled | Reason::RateLimited => Some(unavailable.retry_after),
            _ => None,
        };
    }
    match response.status() {
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => Some(crate::classify::retry_after(response.headers())),
        status if status.as_u16() == 529 => Some(crate::classify::retry_after(response.headers())),
        _ => None,
    }
}

/// A [`tower::retry::Policy`] for requests whose body can be cloned (buffered bytes, `String`,
/// `http_body_util::Full`): up to `attempts` retries of what [`retryable`] allows, and of
/// errors, with [`Backoff`], honouring `retry-after` (a longer wait than the backoff's
/// maximum is not retried), within a retry budget shared by clones.
///
/// ```
/// use moat_breaker::RetryPolicy;
/// use tower::retry::RetryLayer;
///
/// let layer = RetryLayer::new(RetryPolicy::new(2));
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct RetryPolicy {
    attempts: u32,
    made: u32,
    backoff: Backoff,
    budget: Arc<TpsBudget>,
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("attempts", &self.attempts)
            .field("backoff", &self.backoff)
            .finish()
    }
}

impl RetryPolicy {
    /// Up to `attempts` retries per request, with the default backoff and a budget of 20% of
    /// requests (at least 10 retries a second).
    pub fn new(attempts: u32) -> Self {
        Self {
            attempts,
            made: 0,
            backoff: Backoff::default(),
            budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2)),
        }
    }

    /// Waits with `backoff`.
    #[must_use]
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Retries within `budget` (shared by every clone of this policy).
    #[must_use]
    pub fn with_budget(mut self, budget: TpsBudget) -> Self {
        self.budget = Arc::new(budget);
        self
    }

    fn wait(&mut self, retry_after: Option<Duration>) -> Option<tokio::time::Sleep> {
        if self.made >= self.attempts {
            return None;
        }
        let delay = self.backoff.delay_after(self.made, retry_after)?;
        if !self.budget.withdraw() {
            return None;
        }
        self.made += 1;
        Some(tokio::time::sleep(delay))
    }
}

impl<B: Clone, ResBody, E> tower::retry::Policy<Request<B>, Response<ResBody>, E> for RetryPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        _req: &mut Request<B>,
        result: &mut Result<Response<ResBody>, E>,
    ) -> Option<Self::Future> {
        match result {
            Ok(response) => match retryable(response) {
                Some(retry_after) => self.wait(retry_after),
                None => {
                    self.budget.deposit();
                    None
                }
            },
            Err(_) => self.wait(None),
        }
    }

    fn clone_request(&mut self, req: &Request<B>) -> Option<Request<B>> {
        let mut clone = Request::new(req.body().clone());
        *clone.method_mut() = req.method().clone();
        *clone.uri_mut() = req.uri().clone();
        *clone.version_mut() = req.version();
        *clone.headers_mut() = req.headers().clone();
        *clone.extensions_mut() = req.extensions().clone();
        Some(clone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        for attempt in 0..10 {
            let full = (Duration::from_millis(100) * (1 << attempt)).min(Duration::from_secs(1));
            let d = b.delay(attempt);
            assert!(d >= full / 2 && d <= full, "{attempt}: {d:?}");
        }
        assert_eq!(b.delay_after(0, Some(Duration::from_secs(2))), None);
        assert_eq!(
            b.delay_after(0, Some(Duration::from_millis(900))),
            Some(Duration::from_millis(900))
        );
    }

    #[test]
    fn only_safe_responses_are_retried() {
        let response = |status: u16| {
            Response::builder()
                .status(status)
                .header("retry-after", "1")
                .body(())
                .unwrap()
        };
        assert_eq!(
            retryable(&response(503)),
            Some(Some(Duration::from_secs(1)))
        );
        assert_eq!(
            retryable(&response(529)),
            Some(Some(Duration::from_secs(1)))
        );
        assert_eq!(
            retryable(&response(429)),
            Some(Some(Duration::from_secs(1)))
        );
        assert_eq!(retryable(&response(400)), None);
        assert_eq!(
            retryable(&response(500)),
            None,
            "an internal error may repeat the call's effect"
        );
        let mut open = response(503);
        open.extensions_mut().insert(Unavailable {
            breaker: "a".into(),
            reason: Reason::Open,
            retry_after: None,
        });
        assert_eq!(retryable(&open), None, "an open breaker is not waited for");
    }
}
