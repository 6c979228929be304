//! Criterion benchmarks for moat; see the `benches/` directory. This library holds what the
//! benchmarks share.

use std::future::Future;
use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};

/// A request with a whole body, as the service benchmarks send.
pub type Plain = Request<Full<Bytes>>;

/// One request through a service that answers at once (no runtime needed), its response body
/// read to the end (where layers record outcomes).
pub fn round_trip<S, B>(service: &mut S, request: Plain)
where
    S: Service<Plain, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let response = service
        .ready()
        .now_or_never()
        .expect("ready at once")
        .expect("ready")
        .call(request)
        .now_or_never()
        .expect("answers at once")
        .expect("a response");
    black_box(
        response
            .into_body()
            .collect()
            .now_or_never()
            .expect("a whole body at once")
            .expect("a body"),
    );
}

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

/// The commands a Redis-backed layer sends, captured with `MONITOR` while `run` sends some:
/// each as its arguments (`["EVALSHA", sha, "1", key, ...]`), `EVALSHA` calls only.
pub fn capture_evalsha(port: u16, run: impl FnOnce()) -> Vec<Vec<String>> {
    let monitor = moat_testkit::redis::Monitor::start(&[port], None)
        .expect("redis-cli is installed with redis-server");
    run();
    monitor
        .finish()
        .into_iter()
        .flat_map(|(_, commands)| commands)
        .filter(|args| {
            args.first()
                .is_some_and(|c| c.eq_ignore_ascii_case("evalsha"))
        })
        .collect()
}

/// What `redis-benchmark` measured: requests per second and the 99th percentile latency.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    /// Requests per second.
    pub rps: f64,
    /// 99th percentile latency.
    pub p99: Duration,
}

/// Runs `command` (an `EVALSHA` captured by [`capture_evalsha`]) with `redis-benchmark` against
/// the server on `port` (with `cluster`, the whole Redis Cluster it belongs to: each client sends
/// to one node, its keys tagged for that node's slots), its keys spread over 1,000 values.
pub fn redis_benchmark(
    port: u16,
    cluster: bool,
    command: &[String],
    clients: usize,
    total: usize,
) -> Measured {
    let mut command = command.to_vec();
    let keys: usize = command[2].parse().expect("EVALSHA sha numkeys key...");
    for (i, key) in command[3..3 + keys].iter_mut().enumerate() {
        // redis-benchmark writes a 12-digit number under 1,000 where it sees `__rand_int__`,
        // and in a cluster a tag of the client's node where it sees `{tag}`.
        *key = if cluster {
            format!("moat-bench:{{tag}}:__rand_int__:{i}")
        } else {
            format!("moat-bench:{{__rand_int__}}:{i}")
        };
    }
    let output = std::process::Command::new("redis-benchmark")
        .args(["-p", &port.to_string(), "-c", &clients.to_string()])
        .args(["-n", &total.to_string(), "-r", "1000", "--csv"])
        .args(cluster.then_some("--cluster"))
        .args(&command)
        .output()
        .expect("redis-benchmark is installed with redis-server");
    let text = String::from_utf8_lossy(&output.stdout);
    // `"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms",
    // "p99_latency_ms","max_latency_ms"` then one row.
    let row: Vec<f64> = text
        .lines()
        .find(|l| l.starts_with("\"EVALSHA"))
        .map(|row| {
            row.split("\",\"")
                .skip(1)
                .filter_map(|v| v.trim_matches('"').parse().ok())
                .collect()
        })
        .filter(|values: &Vec<f64>| values.len() >= 6)
        .unwrap_or_else(|| panic!("redis-benchmark said: {text}"));
    Measured {
        rps: row[0],
        p99: Duration::from_secs_f64(row[5] / 1000.0),
    }
}
