//! Criterion benchmarks for moat; see the `benches/` directory. This library holds what the
//! non-criterion harnesses share.

use std::future::Future;
use std::time::{Duration, Instant};

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

/// Runs `total` operations spread over `clients` concurrent tasks; returns the wall time and each
/// operation's latency. `op(client, i)` is one timed operation.
pub async fn concurrent_clients<F, Fut>(
    clients: usize,
    total: usize,
    op: F,
) -> (Duration, Vec<Duration>)
where
    F: Fn(usize, usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(total / clients);
                for i in 0..total / clients {
                    let t = Instant::now();
                    op(c, i).await;
                    latencies.push(t.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::with_capacity(total);
    for t in tasks {
        all.extend(t.await.expect("a client task panicked"));
    }
    (start.elapsed(), all)
}
