//! [`ServiceBuilderExt`]: moat's layers as `ServiceBuilder` methods, as tower-http does for its
//! own.

// Without a layer feature the trait has no methods and these are unused.
#[allow(unused_imports)]
use tower::layer::util::Stack;
use tower::ServiceBuilder;

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}

/// Adds moat's layers to a [`ServiceBuilder`], outermost first, in the order they are called:
///
/// ```
/// # #[cfg(all(feature = "ratelimit", feature = "quota", feature = "redact", feature = "breaker"))] {
/// use moat::prelude::*;
/// use moat::core::identity::ApiKey;
/// use tower::ServiceBuilder;
///
/// let stack = ServiceBuilder::new()
///     .moat_rate_limit(RateLimitLayer::new(Rule::new("per-key", ApiKey::default()).limit(Limit::per_second(10))))
///     .moat_quota(QuotaLayer::new(Budget::new("daily", ApiKey::default(), Period::Day).tokens(200_000)))
///     .moat_redact(RedactLayer::new(Redactor::new(&Entity::ALL)))
///     .moat_circuit_breaker(Breaker::new("provider"));
/// # let _ = stack;
/// # }
/// ```
///
/// The trait is sealed: only `ServiceBuilder` implements it.
pub trait ServiceBuilderExt<L>: sealed::Sealed + Sized {
    /// Records every request and every decision of the layers after it ([`moat_audit`]): add
    /// it first.
    #[cfg(feature = "audit")]
    fn moat_audit(
        self,
        layer: moat_audit::AuditLayer,
    ) -> ServiceBuilder<Stack<moat_audit::AuditLayer, L>>;

    /// Adds request, token and concurrency limits ([`moat_ratelimit`]).
    #[cfg(feature = "ratelimit")]
    fn moat_rate_limit(
        self,
        layer: moat_ratelimit::RateLimitLayer,
    ) -> ServiceBuilder<Stack<moat_ratelimit::RateLimitLayer, L>>;

    /// Adds token and spend budgets ([`moat_quota`]).
    #[cfg(feature = "quota")]
    fn moat_quota(
        self,
        layer: moat_quota::QuotaLayer,
    ) -> ServiceBuilder<Stack<moat_quota::QuotaLayer, L>>;

    /// Adds prompt-injection and jailbreak screening ([`moat_sanitize`]).
    #[cfg(feature = "sanitize")]
    fn moat_sanitize(
        self,
        layer: moat_sanitize::SanitizeLayer,
    ) -> ServiceBuilder<Stack<moat_sanitize::SanitizeLayer, L>>;

    /// Adds PII and secret redaction, restored in replies ([`moat_redact`]).
    #[cfg(feature = "redact")]
    fn moat_redact(
        self,
        layer: moat_redact::RedactLayer,
    ) -> ServiceBuilder<Stack<moat_redact::RedactLayer, L>>;

    /// Adds output moderation ([`moat_moderate`]).
    #[cfg(feature = "moderate")]
    fn moat_moderate(
        self,
        layer: moat_moderate::ModerateLayer,
    ) -> ServiceBuilder<Stack<moat_moderate::ModerateLayer, L>>;

    /// Adds the response cache ([`moat_cache`]).
    #[cfg(feature = "cache")]
    fn moat_cache(
        self,
        layer: moat_cache::CacheLayer,
    ) -> ServiceBuilder<Stack<moat_cache::CacheLayer, L>>;

    /// Puts the service behind `breaker` ([`moat_breaker`]), with the LLM classifier.
    #[cfg(feature = "breaker")]
    fn moat_circuit_breaker(
        self,
        breaker: moat_breaker::Breaker,
    ) -> ServiceBuilder<Stack<moat_breaker::CircuitBreakerLayer, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    #[cfg(feature = "audit")]
    fn moat_audit(
        self,
        layer: moat_audit::AuditLayer,
    ) -> ServiceBuilder<Stack<moat_audit::AuditLayer, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "ratelimit")]
    fn moat_rate_limit(
        self,
        layer: moat_ratelimit::RateLimitLayer,
    ) -> ServiceBuilder<Stack<moat_ratelimit::RateLimitLayer, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "quota")]
    fn moat_quota(
        self,
        layer: moat_quota::QuotaLayer,
    ) -> ServiceBuilder<Stack<moat_quota::QuotaLayer, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "sanitize")]
    fn moat_sanitize(
        self,
        layer: moat_sanitize::SanitizeLayer,
    ) -> ServiceBuilder<Stack<moat_sanitize::SanitizeLayer, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "redact")]
    fn moat_redact(
        self,
        layer: moat_redact::RedactLayer,
    ) -> ServiceBuilder<Stack<moat_redact::RedactLayer, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "moderate")]
    fn moat_moderate(
        self,
        layer: moat_moderate::ModerateLayer,
    ) -> ServiceBuilder<Stack<moat_moderate::ModerateLayer, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "cache")]
    fn moat_cache(
        self,
        layer: moat_cache::CacheLayer,
    ) -> ServiceBuilder<Stack<moat_cache::CacheLayer, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "breaker")]
    fn moat_circuit_breaker(
        self,
        breaker: moat_breaker::Breaker,
    ) -> ServiceBuilder<Stack<moat_breaker::CircuitBreakerLayer, L>> {
        self.layer(moat_breaker::CircuitBreakerLayer::new(breaker))
    }
}
