//! `moat-gateway`: an OpenAI-compatible guarded proxy built from the moat layers.
//!
//! Clients call the gateway with a virtual key; the gateway checks it, applies the protection
//! layers, swaps in the provider key (which never leaves the server) and streams the provider's
//! answer back without buffering.
//!
//! - [`config`]: the TOML file (`listen`, `[server]`, `[upstream]`, `[[keys]]`), with one module
//!   per layer section ([`identity`], [`ratelimit`], [`quota`], redact) reading the specs the
//!   layer crates define, and one build context (one Redis connection per server, the body
//!   limit, the caller resolver) every section is built with.
//! - [`Stack`]: the layers in the recommended order around any upstream tower service;
//!   [`Upstream`] is the provider client, [`AuthenticateLayer`] the virtual keys.
//! - [`app`]: the axum router for a resolved configuration.
//! - [`server`]: serves it: HTTP/1.1 and HTTP/2, deadlines, a connection cap, graceful shutdown.
//! - [`demo`]: the no-argument demo, in front of the built-in mock upstream.

#![forbid(unsafe_code)]

pub mod audit;
pub mod auth;
pub mod config;
mod context;
mod deadline;
pub mod identity;
pub mod observe;
mod proxy;
pub mod quota;
pub mod ratelimit;
mod redact;
pub mod server;
pub mod stack;
pub mod upstreams;

use std::convert::Infallible;

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, get_service, on_service, MethodFilter};
use axum::Router;
use moat::core::reject::{Protocol, Rejection};
use moat::quota::QuotaLayer;
use tower::service_fn;

pub use crate::auth::AuthenticateLayer;
use crate::config::Resolved;
pub use crate::proxy::Upstream;
pub use crate::server::serve;
pub use crate::stack::{GatewayService, Stack};

/// Renders a rejection as an axum response.
pub(crate) fn reject(rejection: Rejection, protocol: Protocol) -> Response {
    rejection
        .into_response::<axum::body::Body>(protocol)
        .map(axum::body::Body::new)
}

async fn method_not_allowed(request: Request) -> Response {
    let message = format!(
        "Method {} is not allowed for {}",
        request.method(),
        request.uri().path()
    );
    let rejection = Rejection::new(
        http::StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        message,
    )
    .with_code("method_not_allowed");
    reject(rejection, Protocol::of(&request))
}

async fn not_found(request: Request) -> Response {
    let message = format!(
        "Unknown request URL: {} {}",
        request.method(),
        request.uri().path()
    );
    let rejection = Rejection::new(
        http::StatusCode::NOT_FOUND,
        "invalid_request_error",
        message,
    )
    .with_code("unknown_url");
    reject(rejection, Protocol::of(&request))
}

/// The gateway's router for a resolved configuration: the OpenAI and Anthropic routes through
/// the [`Stack`] to the configured [`Upstream`], `/v1/moat/usage` and `/v1/moat/upstreams`
/// behind authentication only, `/healthz`, `/readyz` and `/metrics` (see [`observe`]); every
/// request gets an `x-request-id` and a log line, and with `[audit]` a record.
///
/// # Panics
///
/// With `[audit]`, if its log was not started and cannot start (its file cannot be opened):
/// start it first with [`ResolvedAudit::log`](crate::audit::ResolvedAudit::log), as the binary
/// does, to handle that error.
pub fn app(resolved: &Resolved) -> Router {
    let stack = Stack::new(resolved);
    let guarded = match upstreams::ladder(resolved) {
        Some(ladder) => stack.around(ladder),
        None => stack.around(Upstream::new(resolved)),
    };
    router(&stack, guarded, resolved)
}

/// A router whose routes can be replaced while it serves (a configuration reload): each request
/// is served by the router current when it arrived, to its end, so in-flight requests finish on
/// the configuration they started with.
#[derive(Debug, Clone)]
pub struct Reloadable {
    current: std::sync::Arc<arc_swap::ArcSwap<Router>>,
}

impl Reloadable {
    /// Serving `app` until it is replaced.
    pub fn new(app: Router) -> Self {
        Self {
            current: std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(app)),
        }
    }

    /// Serves later requests with `app`.
    pub fn replace(&self, app: Router) {
        self.current.store(std::sync::Arc::new(app));
    }

    /// The router to serve: it hands each request to the current app.
    pub fn router(&self) -> Router {
        let current = self.current.clone();
        Router::new().fallback_service(service_fn(move |request: Request| {
            let app = Router::clone(&current.load());
            tower::ServiceExt::oneshot(app, request)
        }))
    }
}

/// The gateway's routes around `guarded`, the stack with its upstream.
fn router(stack: &Stack, guarded: GatewayService, resolved: &Resolved) -> Router {
    let quota = resolved.quota.as_ref().map(QuotaLayer::handle);
    let listed = std::sync::Arc::new(resolved.upstreams.clone());
    let report = service_fn(move |_: Request| {
        let body = upstreams::report(&listed);
        async move {
            let mut response = Response::new(axum::body::Body::from(body));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            Ok::<_, Infallible>(response)
        }
    });
    let usage = service_fn(move |request: Request| {
        let budgets = quota.as_ref().map(|q| q.usage(&request));
        async move {
            let budgets = match budgets {
                Some(usage) => usage.await,
                None => Vec::new(),
            };
            let body = serde_json::json!({"object": "moat.usage", "budgets": budgets});
            Ok::<_, Infallible>(axum::Json(body).into_response())
        }
    });
    let post = || on_service(MethodFilter::POST, guarded.clone());
    let api = Router::new()
        .route("/v1/chat/completions", post())
        .route("/v1/completions", post())
        .route("/v1/responses", post())
        .route("/v1/embeddings", post())
        .route("/v1/messages", post())
        .route("/v1/models", get_service(guarded.clone()))
        .route("/v1/moat/usage", get_service(stack.authenticated(usage)))
        .route(
            "/v1/moat/upstreams",
            get_service(stack.authenticated(report)),
        );
    let redis = std::sync::Arc::new(resolved.redis.clone());
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(move || observe::ready(redis.clone())))
        .route("/metrics", get(observe::metrics))
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    // The audit log sees every request (unknown URLs and refused keys too; not the probes),
    // inside the request id and log line.
    let app = match &resolved.audit {
        Some(audit) => app.layer(
            audit
                .layer(resolved.resolver.clone())
                .unwrap_or_else(|e| panic!("the audit log cannot start: {e}")),
        ),
        None => app,
    };
    app.layer(axum::middleware::from_fn(observe::log_requests))
}

/// Resolves when the process gets Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!(target: "moat::gateway", "shutting down: finishing in-flight requests");
}

/// The demo: the built-in mock upstream, no virtual keys, every layer with its defaults.
pub mod demo {
    use super::config::Config;
    use super::config::Resolved;

    /// The demo's protections: per caller (API key, else IP), request and token rates, a daily
    /// token budget, prompt-injection screening, PII and secrets replaced before they leave
    /// (restored in replies), harmful output withheld (streams cut cleanly), deterministic
    /// requests answered from a cache, and the upstream
    /// behind a circuit breaker. (And an audit log, added by [`config`].)
    pub const LIMITS: &str = r#"
[[ratelimit.rules]]
name = "per-caller"
key = "api_key"
limits = ["60/minute"]
tokens = ["200000/minute"]

[[quota.budgets]]
name = "daily-tokens"
per = "api_key"
period = "day"
tokens = 1000000

[sanitize]
action = "block"
# The demo's clients are your own code, which writes the system prompt.
allow_system_from_client = true
max_prompt_bytes = 200000

[redact]
entities = ["all"]
operator = "pseudonymize"
restore = true

[moderate]
action = "block"
stream_mode = "hold_back"
categories = { "sexual/minors" = 0.1 }

[cache]
ttl = "10m"
scope = "tenant"
only_deterministic = true

[breaker]
minimum_calls = 5
window = "count:20"
open_for = "30s"
"#;

    /// The demo's configuration in front of a primary mock upstream at `mock_url` and a backup
    /// at `backup_url` (both without `/v1`): a request the primary fails is served by the
    /// backup. Every request is recorded in an audit log at `audit_file` (request and response
    /// bodies scrubbed), with checkpoints signed by `audit_key` (a `PRIVATE+KEY+...` note key).
    pub fn config(
        mock_url: &str,
        backup_url: &str,
        listen: std::net::SocketAddr,
        audit_file: &std::path::Path,
        audit_key: &str,
    ) -> Resolved {
        let audit = format!(
            "[audit]\nlevel = \"request_response\"\nfile = {:?}\norigin = \"moat-audit/demo\"\ncheckpoint_key_env = \"MOAT_DEMO_AUDIT_KEY\"\ncheckpoint_every = \"2s\"\n",
            audit_file.display().to_string()
        );
        let source = format!(
            "listen = \"{listen}\"\n[[upstreams]]\nname = \"primary\"\nbase_url = \"{mock_url}/v1\"\n[[upstreams]]\nname = \"backup\"\nbase_url = \"{backup_url}/v1\"\n{LIMITS}{audit}"
        );
        Config::resolve(&source, |name| {
            (name == "MOAT_DEMO_AUDIT_KEY").then(|| audit_key.to_owned())
        })
        .expect("the demo configuration is valid")
    }
}
