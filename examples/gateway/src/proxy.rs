//! Forwarding to the provider: the client's key out, the provider's key in, bodies streamed.

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use moat::core::reject::{Protocol, Rejection};

use crate::config::{Resolved, UpstreamKind};
use crate::reject;

/// Headers that describe one connection, never forwarded (RFC 9110, section 7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The provider behind the gateway, and the client that reaches it.
#[derive(Debug)]
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, Body>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    base_path: String,
    kind: UpstreamKind,
    api_key: Option<HeaderValue>,
    timeout: Duration,
    max_body_bytes: usize,
}

impl Upstream {
    /// The upstream of a resolved configuration.
    pub fn new(resolved: &Resolved) -> Self {
        let base: Uri = resolved
            .config
            .upstream
            .base_url
            .get_ref()
            .parse()
            .expect("validated by Config::resolve");
        let connector = HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .build();
        let kind = resolved.config.upstream.kind;
        let api_key = resolved.upstream_api_key.as_deref().and_then(|key| {
            let value = match kind {
                UpstreamKind::Openai => format!("Bearer {key}"),
                UpstreamKind::Anthropic => key.to_owned(),
            };
            let mut value = HeaderValue::from_str(&value).ok()?;
            value.set_sensitive(true);
            Some(value)
        });
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            scheme: base.scheme().cloned().unwrap_or(http::uri::Scheme::HTTPS),
            authority: base
                .authority()
                .cloned()
                .expect("validated by Config::resolve"),
            base_path: base.path().trim_end_matches('/').to_owned(),
            kind,
            api_key,
            timeout: Duration::from_secs(resolved.config.upstream.timeout_secs),
            max_body_bytes: resolved.config.max_body_bytes,
        }
    }

    /// The upstream URI for a gateway path: `/v1/x?q` goes to `BASE/x?q`.
    fn uri_for(&self, uri: &Uri) -> Result<Uri, http::Error> {
        let path = uri.path();
        let rest = path.strip_prefix("/v1").unwrap_or(path);
        let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(format!("{}{rest}{query}", self.base_path))
            .build()
    }

    fn outgoing_headers(&self, headers: &mut HeaderMap) {
        strip_hop_by_hop(headers);
        headers.remove(header::HOST);
        headers.remove(header::AUTHORIZATION);
        headers.remove("x-api-key");
        if let Some(key) = &self.api_key {
            match self.kind {
                UpstreamKind::Openai => headers.insert(header::AUTHORIZATION, key.clone()),
                UpstreamKind::Anthropic => headers.insert("x-api-key", key.clone()),
            };
        }
        if self.kind == UpstreamKind::Anthropic && !headers.contains_key("anthropic-version") {
            headers.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
        }
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

fn too_large(limit: usize) -> Rejection {
    Rejection::payload_too_large(format!(
        "request body is larger than the limit of {limit} bytes"
    ))
}

/// The proxy handler.
pub(crate) async fn forward(State(upstream): State<Arc<Upstream>>, request: Request) -> Response {
    let protocol = Protocol::of(&request);
    let (mut parts, body) = request.into_parts();
    let limit = upstream.max_body_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return reject(too_large(limit), protocol);
    }
    parts.uri = match upstream.uri_for(&parts.uri) {
        Ok(uri) => uri,
        Err(e) => {
            return reject(
                Rejection::bad_request(format!("bad request path: {e}")),
                protocol,
            )
        }
    };
    upstream.outgoing_headers(&mut parts.headers);
    let body = Body::new(Limited::new(body, limit).map_err(axum::Error::new));
    let sent = upstream.client.request(Request::from_parts(parts, body));
    let response = match tokio::time::timeout(upstream.timeout, sent).await {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => {
            let mut source = error.source();
            while let Some(cause) = source {
                if cause.is::<http_body_util::LengthLimitError>() {
                    return reject(too_large(limit), protocol);
                }
                source = cause.source();
            }
            tracing::warn!(target: "moat::gateway", error = %error, "upstream request failed");
            let rejection = Rejection::new(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "the upstream provider could not be reached",
            )
            .with_code("upstream_unreachable");
            return reject(rejection, protocol);
        }
        Err(_) => {
            let rejection = Rejection::new(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_error",
                format!(
                    "the upstream provider did not answer within {:?}",
                    upstream.timeout
                ),
            )
            .with_code("upstream_timeout");
            return reject(rejection, protocol);
        }
    };
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, Body::new(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn upstream(base: &str, kind: &str) -> Upstream {
        let source =
            format!("[upstream]\nbase_url = \"{base}\"\nkind = \"{kind}\"\napi_key_env = \"K\"\n");
        Upstream::new(&Config::resolve(&source, |_| Some("sk-provider".into())).unwrap())
    }

    #[test]
    fn paths_map_onto_the_base_url() {
        let up = upstream("https://api.openai.com/v1/", "openai");
        let uri = up
            .uri_for(&"/v1/chat/completions?x=1".parse().unwrap())
            .unwrap();
        assert_eq!(
            uri.to_string(),
            "https://api.openai.com/v1/chat/completions?x=1"
        );
        let up = upstream("http://127.0.0.1:9/proxy/v1", "openai");
        assert_eq!(
            up.uri_for(&"/v1/models".parse().unwrap())
                .unwrap()
                .to_string(),
            "http://127.0.0.1:9/proxy/v1/models"
        );
    }

    #[test]
    fn the_client_key_is_replaced_and_hop_headers_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sk-moat-client"),
        );
        headers.insert("x-api-key", HeaderValue::from_static("sk-moat-client"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("x-secret-hop"));
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        headers.insert(header::HOST, HeaderValue::from_static("gateway"));
        headers.insert("x-custom", HeaderValue::from_static("kept"));
        let mut openai = headers.clone();
        upstream("https://api.openai.com/v1", "openai").outgoing_headers(&mut openai);
        assert_eq!(openai[header::AUTHORIZATION], "Bearer sk-provider");
        assert!(openai.get("x-api-key").is_none() && openai.get("x-secret-hop").is_none());
        assert!(openai.get(header::HOST).is_none() && openai.get(header::CONNECTION).is_none());
        assert_eq!(openai["x-custom"], "kept");
        let mut anthropic = headers;
        upstream("https://api.anthropic.com/v1", "anthropic").outgoing_headers(&mut anthropic);
        assert_eq!(anthropic["x-api-key"], "sk-provider");
        assert!(anthropic.get(header::AUTHORIZATION).is_none());
        assert_eq!(anthropic["anthropic-version"], "2023-06-01");
    }
}
