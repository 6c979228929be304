//! Budget alerts: a threshold of a budget crossed, once per period.

use serde::Serialize;

use crate::budget::{Amounts, Limits};

/// A budget crossed an alert threshold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct BudgetAlert {
    /// The budget's name.
    pub budget: String,
    /// Whose budget: a secret-free key (`api_key:3fa…`, `tenant:…`, `global`).
    pub key: String,
    /// The threshold crossed, in percent of the tightest cap.
    pub percent: u64,
    /// Used so far this period.
    pub used: Amounts,
    /// The caps.
    pub limits: Limits,
    /// When the period starts over (RFC 3339).
    pub resets_at: String,
}

/// Receives budget alerts. Closures implement it.
pub trait AlertSink: Send + Sync + 'static {
    /// Called once per threshold, budget, key and period.
    fn alert(&self, alert: &BudgetAlert);
}

impl<F: Fn(&BudgetAlert) + Send + Sync + 'static> AlertSink for F {
    fn alert(&self, alert: &BudgetAlert) {
        self(alert)
    }
}

/// The default sink: a `tracing` warning under target `moat::quota`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TracingAlerts;

impl AlertSink for TracingAlerts {
    fn alert(&self, alert: &BudgetAlert) {
        tracing::warn!(
            target: "moat::quota",
            budget = %alert.budget,
            key = %alert.key,
            percent = alert.percent,
            tokens = alert.used.tokens,
            usd_micros = alert.used.usd.micros(),
            resets_at = %alert.resets_at,
            "budget alert"
        );
    }
}
