//! The breaker's metrics, registered once per breaker (not per call), labelled by its name.
//!
//! - `moat_breaker_state{breaker}`: 0 closed, 1 open, 2 half-open, 3 disabled, 4 forced open,
//!   5 metrics only;
//! - `moat_breaker_calls_total{breaker,outcome}`: `success`, `failure`, `slow_success`,
//!   `slow_failure`;
//! - `moat_breaker_refused_total{breaker,reason}`: `open`, `rate_limited`;
//! - `moat_breaker_transitions_total{breaker,to}`;
//! - `moat_breaker_rate_limited_total{breaker}`: 429s that marked the upstream rate-limited;
//! - `moat_breaker_fallbacks_total{from}` (the [fallback](crate::Fallback)): requests served
//!   by a later target because this one could not.

use std::sync::Arc;

use metrics::{Counter, Gauge};

use crate::breaker::{Refusal, State};

pub(crate) struct Metrics {
    name: Arc<str>,
    state: Gauge,
    /// success, failure, slow success, slow failure
    calls: [Counter; 4],
    refused_open: Counter,
    refused_rate_limited: Counter,
    rate_limited: Counter,
}

impl Metrics {
    pub(crate) fn new(name: &Arc<str>) -> Self {
        let calls = |outcome: &'static str| metrics::counter!("moat_breaker_calls_total", "breaker" => name.to_string(), "outcome" => outcome);
        let refused = |reason: &'static str| metrics::counter!("moat_breaker_refused_total", "breaker" => name.to_string(), "reason" => reason);
        Self {
            name: name.clone(),
            state: metrics::gauge!("moat_breaker_state", "breaker" => name.to_string()),
            calls: [
                calls("success"),
                calls("failure"),
                calls("slow_success"),
                calls("slow_failure"),
            ],
            refused_open: refused("open"),
            refused_rate_limited: refused("rate_limited"),
            rate_limited: metrics::counter!("moat_breaker_rate_limited_total", "breaker" => name.to_string()),
        }
    }

    #[inline]
    pub(crate) fn call(&self, failure: bool, slow: bool) {
        self.calls[usize::from(failure) + 2 * usize::from(slow)].increment(1);
    }

    pub(crate) fn refused(&self, refusal: Refusal) {
        match refusal {
            Refusal::RateLimited { .. } => self.refused_rate_limited.increment(1),
            _ => self.refused_open.increment(1),
        }
    }

    pub(crate) fn rate_limited(&self) {
        self.rate_limited.increment(1);
    }

    pub(crate) fn state(&self, state: State) {
        self.state.set(state as u8 as f64);
    }

    pub(crate) fn transition(&self, to: State) {
        self.state(to);
        // Transitions are rare: the handle is looked up when one happens.
        metrics::counter!("moat_breaker_transitions_total", "breaker" => self.name.to_string(), "to" => to.as_str())
            .increment(1);
    }
}

/// Counts a request a fallback served elsewhere because `from` could not.
pub(crate) fn fallback(from: &str) {
    metrics::counter!("moat_breaker_fallbacks_total", "from" => from.to_owned()).increment(1);
}
