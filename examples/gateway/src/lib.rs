//! `moat-gateway`: an OpenAI-compatible guarded proxy built from the moat layers.
//!
//! Clients call the gateway with a virtual key; the gateway checks it, applies the protection
//! layers, swaps in the provider key (which never leaves the server) and streams the provider's
//! answer back without buffering.
//!
//! - [`config`]: the TOML file (`listen`, `[server]`, `[upstream]`, `[[keys]]`, the layers).
//! - [`app`]: the axum router for a resolved configuration.
//! - [`server`]: serves it: HTTP/1.1 and HTTP/2, deadlines, a connection cap, graceful shutdown.
//! - [`demo`]: the no-argument demo, in front of the built-in mock upstream.

#![forbid(unsafe_code)]

pub mod budgets;
pub mod config;
mod deadline;
pub mod limits;
pub mod privacy;
mod proxy;
pub mod server;

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use moat::core::identity::{presented_api_key, CallerResolver, Fingerprinter};
use moat::core::reject::{Protocol, Rejection};
use moat::Caller;
use sha2::{Digest, Sha256};

use crate::config::{Resolved, ResolvedKey};
pub use crate::proxy::Upstream;
pub use crate::server::serve;

/// Renders a rejection as an axum response.
pub(crate) fn reject(rejection: Rejection, protocol: Protocol) -> Response {
    rejection
        .into_response::<axum::body::Body>(protocol)
        .map(axum::body::Body::new)
}

/// Virtual keys by SHA-256, and how to describe callers.
#[derive(Debug)]
struct Auth {
    keys: HashMap<[u8; 32], Caller>,
    fingerprinter: Fingerprinter,
    resolver: CallerResolver,
}

impl Auth {
    fn new(keys: &[ResolvedKey], resolver: CallerResolver, fingerprinter: Fingerprinter) -> Self {
        let keys = keys
            .iter()
            .map(|k| {
                let mut caller = Caller::new().with_id(k.entry.id.as_str());
                if let Some(tenant) = &k.entry.tenant {
                    caller = caller.with_tenant(tenant.as_str());
                }
                if let Some(tier) = &k.entry.tier {
                    caller = caller.with_tier(tier.as_str());
                }
                (k.sha256, caller)
            })
            .collect();
        Self {
            keys,
            resolver,
            fingerprinter,
        }
    }
}

/// With `[[keys]]`, only known keys pass (401 otherwise) and their `Caller` is stored; without,
/// every caller is anonymous and known by IP.
async fn authenticate(State(auth): State<Arc<Auth>>, mut request: Request, next: Next) -> Response {
    if !auth.keys.is_empty() {
        let Some(presented) = presented_api_key(request.headers()) else {
            let message = if proxy::has_query_credential(request.uri()) {
                "An API key in the URL is not accepted (URLs end up in logs). Send it as `Authorization: Bearer KEY` or `x-api-key: KEY`."
            } else {
                "You didn't provide an API key. Send it as `Authorization: Bearer KEY` or `x-api-key: KEY`."
            };
            let rejection = Rejection::unauthorized(message).with_code("missing_api_key");
            return reject(rejection, Protocol::of(&request));
        };
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let Some(caller) = auth.keys.get(&digest) else {
            let rejection = Rejection::unauthorized("Incorrect API key provided.");
            return reject(rejection, Protocol::of(&request));
        };
        let caller = caller
            .clone()
            .with_api_key(auth.fingerprinter.fingerprint(presented.as_bytes()));
        request.extensions_mut().insert(caller);
    }
    auth.resolver.resolve(&mut request);
    next.run(request).await
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

/// The gateway's router for a resolved configuration.
pub fn app(resolved: &Resolved) -> Router {
    let upstream = Arc::new(Upstream::new(resolved));
    let auth = Arc::new(Auth::new(
        &resolved.keys,
        resolved.resolver.clone(),
        resolved.fingerprinter.clone(),
    ));
    let mut api = Router::new()
        .route("/v1/chat/completions", post(proxy::forward))
        .route("/v1/completions", post(proxy::forward))
        .route("/v1/responses", post(proxy::forward))
        .route("/v1/embeddings", post(proxy::forward))
        .route("/v1/messages", post(proxy::forward))
        .route("/v1/models", get(proxy::forward))
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(upstream);
    // Layers added last run first: authentication, rate limits, budgets, then redaction
    // (nearest the upstream, so budgets count the prompt the user sent).
    let quota = resolved.quota.as_ref().map(moat::quota::QuotaLayer::handle);
    if let Some(layer) = &resolved.redact {
        api = api.layer(layer.clone());
    }
    if let Some(layer) = &resolved.quota {
        api = api.layer(layer.clone());
    }
    if let Some(ratelimit) = &resolved.ratelimit {
        api = api.layer(ratelimit.clone());
    }
    let usage = Router::new().route(
        "/v1/moat/usage",
        get(move |request: Request| {
            let budgets = quota.as_ref().map(|q| q.usage(&request));
            async move {
                let budgets = match budgets {
                    Some(usage) => usage.await,
                    None => Vec::new(),
                };
                axum::Json(serde_json::json!({"object": "moat.usage", "budgets": budgets}))
            }
        }),
    );
    let api = api
        .merge(usage)
        .method_not_allowed_fallback(method_not_allowed);
    let api = api.layer(middleware::from_fn_with_state(auth, authenticate));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
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
    /// token budget, and PII and secrets replaced before they leave (restored in replies).
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

[redact]
entities = ["all"]
operator = "pseudonymize"
restore = true
"#;

    /// The demo's configuration in front of a mock upstream at `mock_url` (without `/v1`).
    pub fn config(mock_url: &str, listen: std::net::SocketAddr) -> Resolved {
        let source =
            format!("listen = \"{listen}\"\n[upstream]\nbase_url = \"{mock_url}/v1\"\n{LIMITS}");
        Config::resolve(&source, |_| None).expect("the demo configuration is valid")
    }
}
