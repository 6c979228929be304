//! What the gateway tells its operators: Prometheus metrics at `/metrics`, readiness at
//! `/readyz`, a request id on every request, and one log line per request.
//!
//! - `/metrics`: every `moat_*` metric of the layers (and the breaker's state per upstream) in
//!   Prometheus' text format, once [`install_metrics`] has run; label values carry rule, budget
//!   and upstream names, never keys or prompts.
//! - `/readyz`: 200 once every Redis server the stores use answers a `PING` (within a second),
//!   503 naming the ones that do not. `/healthz` only says the process is up.
//! - `x-request-id`: kept when the client sends a sane one (visible ASCII, at most 128 bytes),
//!   made up otherwise; sent upstream, returned to the client, and in the log line.
//! - The log line, at info under target `moat::gateway::request`: request id, method, path,
//!   status, latency, model (when a layer parsed the body), and the caller's virtual key id,
//!   tenant and key fingerprint. Never a raw key or a prompt.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::header::CONTENT_TYPE;
use http::{HeaderName, HeaderValue, StatusCode};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use moat::core::store::RedisConnection;
use moat::Caller;

/// The request id header.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

static METRICS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder for this process and returns its handle; later calls return
/// the same handle. `None` if another recorder was installed first.
///
/// Call it before the configuration is resolved: layers take their metric handles when they are
/// built, and handles taken before there is a recorder count nothing.
pub fn install_metrics() -> Option<PrometheusHandle> {
    METRICS
        .get_or_init(|| PrometheusBuilder::new().install_recorder().ok())
        .clone()
}

/// How many log lines were dropped because stderr could not keep up (set by `main`).
static DROPPED_LOG_LINES: OnceLock<Box<dyn Fn() -> usize + Send + Sync>> = OnceLock::new();

/// Makes `/metrics` report `moat_gateway_log_lines_dropped_total` from `dropped`: the lines a
/// non-blocking log writer gave up on.
pub fn count_dropped_log_lines(dropped: impl Fn() -> usize + Send + Sync + 'static) {
    let _ = DROPPED_LOG_LINES.set(Box::new(dropped));
}

/// `GET /metrics`.
pub(crate) async fn metrics() -> Response {
    if let Some(dropped) = DROPPED_LOG_LINES.get() {
        metrics::counter!("moat_gateway_log_lines_dropped_total").absolute(dropped() as u64);
    }
    match METRICS.get().and_then(Option::as_ref) {
        Some(handle) => (
            [(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            )],
            handle.render(),
        )
            .into_response(),
        None => crate::reject(
            moat::Rejection::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "metrics are not enabled in this process",
            )
            .with_code("metrics_disabled"),
            moat::core::reject::Protocol::Http,
        ),
    }
}

/// `GET /readyz`.
pub(crate) async fn ready(redis: Arc<Vec<Arc<RedisConnection>>>) -> Response {
    let mut failing = Vec::new();
    for (i, conn) in redis.iter().enumerate() {
        if let Err(e) = conn.ping(Duration::from_secs(1)).await {
            failing
                .push(serde_json::json!({"store": format!("redis[{i}]"), "error": e.to_string()}));
        }
    }
    let (status, body) = if failing.is_empty() {
        (StatusCode::OK, serde_json::json!({"status": "ready"}))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "not_ready", "failing": failing}),
        )
    };
    (status, axum::Json(body)).into_response()
}

/// The model a request named, left in its response's extensions for the log line.
#[derive(Debug, Clone)]
pub(crate) struct RequestModel(pub(crate) Arc<str>);

/// Whether the per-request log line is on (checked before anything is gathered for it).
pub(crate) fn logging() -> bool {
    tracing::enabled!(target: "moat::gateway::request", tracing::Level::INFO)
}

/// The request id and log line middleware (outermost on the router).
pub(crate) async fn log_requests(mut request: Request, next: Next) -> Response {
    let start = Instant::now();
    let id = request
        .headers()
        .get(&REQUEST_ID)
        .filter(|v| sane_id(v.as_bytes()))
        .cloned()
        .unwrap_or_else(new_id);
    request.headers_mut().insert(REQUEST_ID, id.clone());
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let mut response = next.run(request).await;
    if logging() {
        let caller = response.extensions().get::<Caller>();
        let model = response.extensions().get::<RequestModel>();
        tracing::info!(
            target: "moat::gateway::request",
            request_id = ?id,
            method = %method,
            path = ?path,
            status = response.status().as_u16(),
            latency_ms = start.elapsed().as_secs_f64() * 1000.0,
            model = model.map(|m| &*m.0),
            key = caller.and_then(|c| c.id.as_deref()),
            tenant = caller.and_then(|c| c.tenant.as_deref()),
            fingerprint = caller.and_then(|c| c.api_key.as_ref()).map(tracing::field::display),
            "request",
        );
    }
    response.headers_mut().insert(REQUEST_ID, id);
    response
}

/// Visible ASCII, 1 to 128 bytes: what a client may choose as its request id.
fn sane_id(id: &[u8]) -> bool {
    (1..=128).contains(&id.len()) && id.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// A new request id: 32 hex digits, unique in this process and unguessable across processes.
fn new_id() -> HeaderValue {
    static SEED: OnceLock<RandomState> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = SEED.get_or_init(RandomState::new);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut a = seed.build_hasher();
    a.write_u64(n);
    let mut b = seed.build_hasher();
    b.write_u64(!n);
    let id = format!("{:016x}{:016x}", a.finish(), b.finish());
    HeaderValue::from_str(&id).expect("hex digits are a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_sane_and_fresh() {
        assert!(sane_id(b"req-123_abc"));
        assert!(!sane_id(b""));
        assert!(!sane_id(b"has space"));
        assert!(!sane_id(&[b'a'; 129]));
        let (a, b) = (new_id(), new_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
    }
}
