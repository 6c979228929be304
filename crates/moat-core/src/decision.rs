//! What each layer decided about a request.
//!
//! The outermost interested layer (usually audit) puts a [`Decisions`] handle into the request
//! extensions; every layer inside it appends what it decided. Without a handle, recording costs a
//! failed extension lookup and nothing else.
//!
//! ```
//! use moat_core::decision::{Decision, Decisions, Outcome};
//!
//! let mut req = http::Request::new(());
//! let decisions = Decisions::new();
//! req.extensions_mut().insert(decisions.clone());
//!
//! // Somewhere in a layer:
//! Decisions::record(req.extensions(), Decision::new("ratelimit", Outcome::Allowed).with_rule("per-key"));
//!
//! let all = decisions.snapshot();
//! assert_eq!(all[0].layer, "ratelimit");
//! assert_eq!(all[0].rule.as_deref(), Some("per-key"));
//! ```

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;

use crate::identity::Caller;
use crate::usage::Usage;

/// Enforce a rule, or only decide and record (shadow mode): every moat rule and budget has both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Mode {
    /// Refuse what breaks the rule.
    #[default]
    Enforce,
    /// Count and record what would be refused, but let it through.
    Shadow,
}

/// A cheap, cloneable list of decisions shared by all layers handling one request, with what
/// the layers learned about it on the way ([`Facts`]: who called, which model, which upstream),
/// which an outer layer cannot see in the request it passed on.
#[derive(Clone, Default)]
pub struct Decisions {
    inner: Arc<Mutex<Shared>>,
}

#[derive(Default)]
struct Shared {
    decisions: Vec<Decision>,
    facts: Facts,
}

/// What inner layers learned about a request: set through the [`Decisions`] handle, read by the
/// layer that put it there (audit).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Facts {
    /// The caller as the innermost layer that identified it saw it (authentication adds the
    /// key's id, tenant and tier).
    pub caller: Option<Caller>,
    /// The model the request asked for.
    pub model: Option<Arc<str>>,
    /// The upstream that answered (or was last tried).
    pub upstream: Option<Arc<str>>,
}

impl Decisions {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends a decision.
    pub fn push(&self, decision: Decision) {
        self.lock().decisions.push(decision);
    }

    /// Records who called, if the extensions hold a handle (the identifying layers do this).
    pub fn identify(extensions: &http::Extensions, caller: &Caller) {
        if let Some(decisions) = extensions.get::<Decisions>() {
            decisions.lock().facts.caller = Some(caller.clone());
        }
    }

    /// Records the requested model, if the extensions hold a handle (the request parser does
    /// this).
    pub fn set_model(extensions: &http::Extensions, model: &str) {
        if let Some(decisions) = extensions.get::<Decisions>() {
            decisions.lock().facts.model = Some(model.into());
        }
    }

    /// Records the upstream that answered, if the extensions hold a handle.
    pub fn set_upstream(extensions: &http::Extensions, upstream: &str) {
        if let Some(decisions) = extensions.get::<Decisions>() {
            decisions.lock().facts.upstream = Some(upstream.into());
        }
    }

    /// What the layers learned about the request so far.
    pub fn facts(&self) -> Facts {
        self.lock().facts.clone()
    }

    /// Appends `decision` if the extensions hold a handle; does nothing otherwise.
    pub fn record(extensions: &http::Extensions, decision: Decision) {
        if let Some(decisions) = extensions.get::<Decisions>() {
            decisions.push(decision);
        }
    }

    /// Whether the extensions hold a handle: check it before building an expensive decision.
    pub fn is_recording(extensions: &http::Extensions) -> bool {
        extensions.get::<Decisions>().is_some()
    }

    /// A copy of the decisions so far.
    pub fn snapshot(&self) -> Vec<Decision> {
        self.lock().decisions.clone()
    }

    /// Takes the decisions so far, leaving the list empty.
    pub fn take(&self) -> Vec<Decision> {
        std::mem::take(&mut self.lock().decisions)
    }
}

impl fmt::Debug for Decisions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.snapshot()).finish()
    }
}

/// One layer's decision about one request.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Decision {
    /// The layer that decided, e.g. `"ratelimit"`.
    pub layer: &'static str,
    /// The rule or budget that decided, when the layer has named rules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<Cow<'static, str>>,
    /// What was decided.
    pub outcome: Outcome,
    /// A short, secret-free explanation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<Cow<'static, str>>,
}

impl Decision {
    /// A decision by `layer`.
    pub fn new(layer: &'static str, outcome: Outcome) -> Self {
        Self {
            layer,
            rule: None,
            outcome,
            detail: None,
        }
    }

    /// Names the rule that decided.
    #[must_use]
    pub fn with_rule(mut self, rule: impl Into<Cow<'static, str>>) -> Self {
        self.rule = Some(rule.into());
        self
    }

    /// Adds a short, secret-free explanation.
    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<Cow<'static, str>>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// What a layer decided.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Outcome {
    /// Let through unchanged.
    Allowed,
    /// Rejected with this HTTP status and error code.
    Rejected {
        /// The HTTP status sent.
        status: u16,
        /// The machine-readable error code.
        code: Cow<'static, str>,
    },
    /// Would have been rejected, but the rule is in shadow mode.
    ShadowRejected {
        /// The machine-readable error code it would have sent.
        code: Cow<'static, str>,
    },
    /// Let through after rewriting this many spans of text.
    Rewritten {
        /// How many spans were rewritten.
        spans: u32,
    },
    /// Usage counted against a limit or budget once the response ended.
    UsageSettled {
        /// The usage that was counted.
        usage: Usage,
        /// What it cost, in millionths of a US dollar, when the layer prices usage.
        #[serde(skip_serializing_if = "Option::is_none")]
        cost_usd_micros: Option<u64>,
    },
    /// The circuit breaker's state when the request passed it.
    Breaker {
        /// `closed`, `open` or `half_open`.
        state: Cow<'static, str>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_handle_records_nothing_and_does_not_panic() {
        let req = http::Request::new(());
        assert!(!Decisions::is_recording(req.extensions()));
        Decisions::record(req.extensions(), Decision::new("x", Outcome::Allowed));
    }

    #[test]
    fn clones_share_one_list_in_order() {
        let decisions = Decisions::new();
        let mut ext = http::Extensions::new();
        ext.insert(decisions.clone());
        Decisions::record(&ext, Decision::new("a", Outcome::Allowed));
        Decisions::record(
            &ext,
            Decision::new(
                "b",
                Outcome::Rejected {
                    status: 429,
                    code: "rate_limit_exceeded".into(),
                },
            )
            .with_detail("10/minute"),
        );
        let all = decisions.take();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].layer, "a");
        assert_eq!(all[1].detail.as_deref(), Some("10/minute"));
        assert!(decisions.snapshot().is_empty());
    }

    #[test]
    fn serializes_with_a_tagged_outcome() {
        let d = Decision::new("sanitize", Outcome::Rewritten { spans: 3 }).with_rule("invisible");
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"layer":"sanitize","rule":"invisible","outcome":{"outcome":"rewritten","spans":3}})
        );
    }
}
