//! Criterion benchmarks for moat; see the `benches/` directory. This library holds what the
//! non-criterion harnesses share.

use std::time::Duration;

/// A markdown table row of throughput and latency percentiles: `| label | ops/s | p50 | p99 |`.
pub fn latency_row(
    label: impl std::fmt::Display,
    latencies: &mut [Duration],
    elapsed: Duration,
) -> String {
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies[((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1))]
    };
    format!(
        "| {label} | {:.0} | {:?} | {:?} |",
        latencies.len() as f64 / elapsed.as_secs_f64(),
        pct(0.50),
        pct(0.99)
    )
}
