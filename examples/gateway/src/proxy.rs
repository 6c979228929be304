//! Forwarding to the provider: the client's key out, the provider's key in, bodies streamed back.
//!
//! The request body is read whole (it has been by any content layer already, and it is capped)
//! and sent with its exact length, so a slow client never holds an upstream connection and an
//! HTTP/1.0 client's body arrives whole. The gateway speaks HTTP/1.1 or HTTP/2 to the upstream as
//! the connection allows, whatever the client spoke. Credentials in the query string never leave.

use std::error::Error as _;
use std::sync::Arc;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::response::Response;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Request;
use http::{StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::Full;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use moat::core::body::buffer;
use moat::core::decision::Decisions;
use moat::core::reject::{Protocol, Rejection};
use tower::{BoxError, Service};

use crate::config::{Resolved, UpstreamKind, UpstreamTimeouts};
use crate::deadline::DeadlineBody;
use crate::reject;
use crate::upstreams::ResolvedUpstream;

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

/// Query parameters that carry credentials (compared without case, after percent-decoding).
const CREDENTIAL_PARAMS: [&str; 11] = [
    "api_key",
    "api-key",
    "apikey",
    "key",
    "x-api-key",
    "access_token",
    "token",
    "auth",
    "authorization",
    "client_secret",
    "password",
];

/// The provider behind the gateway, as a tower [`Service`]: any request body in (read whole,
/// under the body limit), the provider's response out, streamed, under the idle deadline.
/// Failures are answered as OpenAI errors: 502 when the provider cannot be reached, 504 past a
/// deadline. Cheap to clone: clones share one connection pool.
#[derive(Debug, Clone)]
pub struct Upstream {
    provider: Arc<Provider>,
}

/// What every clone of an [`Upstream`] shares.
#[derive(Debug)]
struct Provider {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    base_path: String,
    kind: UpstreamKind,
    api_key: Option<HeaderValue>,
    timeouts: UpstreamTimeouts,
    max_body_bytes: usize,
    /// Its name, for the audit log.
    name: Arc<str>,
}

impl Upstream {
    /// The (first) upstream of a resolved configuration.
    pub fn new(resolved: &Resolved) -> Self {
        Self::to(&resolved.upstreams[0], resolved.max_body_bytes)
    }

    /// A client of `upstream`, reading request bodies up to `max_body_bytes`.
    pub fn to(upstream: &ResolvedUpstream, max_body_bytes: usize) -> Self {
        Self {
            provider: Arc::new(Provider::new(upstream, max_body_bytes)),
        }
    }
}

impl<B> Service<Request<B>> for Upstream
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The pool opens connections on demand.
        let _ = cx;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        Decisions::set_upstream(request.extensions(), &self.provider.name);
        let provider = self.provider.clone();
        Box::pin(async move { Ok(provider.forward(request).await) })
    }
}

impl Provider {
    fn new(upstream: &ResolvedUpstream, max_body_bytes: usize) -> Self {
        let base = &upstream.base_url;
        let timeouts = upstream.timeouts;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeouts.connect));
        http.set_nodelay(true);
        let connector = HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let kind = upstream.kind;
        let api_key = upstream.api_key.as_deref().and_then(|key| {
            let value = match kind {
                UpstreamKind::Openai => format!("Bearer {key}"),
                UpstreamKind::Anthropic => key.to_owned(),
            };
            let mut value = HeaderValue::from_str(&value).ok()?;
            value.set_sensitive(true);
            Some(value)
        });
        Self {
            name: upstream.name.as_str().into(),
            client: Client::builder(TokioExecutor::new()).build(connector),
            scheme: base.scheme().cloned().unwrap_or(http::uri::Scheme::HTTPS),
            authority: base
                .authority()
                .cloned()
                .expect("validated by Config::resolve"),
            base_path: base.path().trim_end_matches('/').to_owned(),
            kind,
            api_key,
            timeouts,
            max_body_bytes,
        }
    }

    /// The upstream URI for a gateway path: `/v1/x?q` goes to `BASE/x?q`, without credentials
    /// in `q`.
    fn uri_for(&self, uri: &Uri) -> Result<Uri, http::Error> {
        let path = uri.path();
        let rest = path.strip_prefix("/v1").unwrap_or(path);
        let query = uri
            .query()
            .map(strip_credentials)
            .filter(|q| !q.is_empty())
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
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
        // The body is sent whole, with its own length.
        headers.remove(header::CONTENT_LENGTH);
        headers.remove(header::EXPECT);
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

    /// Sends `request` on and answers with the provider's response, or why there is none.
    async fn forward<B>(&self, request: Request<B>) -> Response
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let protocol = Protocol::of(&request);
        let model = crate::observe::logging()
            .then(|| {
                request
                    .extensions()
                    .get::<moat::core::request::SharedLlmRequest>()
                    .and_then(|llm| llm.with(|r| r.model().map(Arc::<str>::from)))
            })
            .flatten();
        let (mut parts, body) = request.into_parts();
        let body = match buffer(body, self.max_body_bytes).await {
            Ok(buffered) => buffered.data,
            Err(e) => return reject(e.into(), protocol),
        };
        let scope = parts.extensions.get::<crate::auth::ModelScope>();
        // The audit log learns the model here when no layer parsed the request.
        let unrecorded = Decisions::is_recording(&parts.extensions)
            && parts
                .extensions
                .get::<moat::core::request::SharedLlmRequest>()
                .is_none();
        if scope.is_some() || unrecorded {
            let model = requested_model(&parts.extensions, &body);
            if let (true, Some(model)) = (unrecorded, &model) {
                Decisions::set_model(&parts.extensions, model);
            }
            if let Some(rejection) = scope.and_then(|s| out_of_scope(s, model.as_deref())) {
                return reject(rejection, protocol);
            }
        }
        parts.uri = match self.uri_for(&parts.uri) {
            Ok(uri) => uri,
            Err(e) => {
                return reject(
                    Rejection::bad_request(format!("bad request path: {e}")),
                    protocol,
                )
            }
        };
        // The client's HTTP version is its own business; the connection to the upstream decides.
        parts.version = Version::HTTP_11;
        self.outgoing_headers(&mut parts.headers);
        if !body.is_empty() || !matches!(parts.method, http::Method::GET | http::Method::HEAD) {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        let sent = self
            .client
            .request(Request::from_parts(parts, Full::new(body)));
        let response = match tokio::time::timeout(self.timeouts.first_byte, sent).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) if error.is_connect() && timed_out(&error) => {
                let rejection = upstream_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    format!(
                        "could not connect to the upstream provider within {:?}",
                        self.timeouts.connect
                    ),
                );
                return reject(rejection, protocol);
            }
            Ok(Err(error)) => {
                let cause = error.source().map(ToString::to_string).unwrap_or_default();
                tracing::warn!(target: "moat::gateway", %error, %cause, "upstream request failed");
                let rejection = upstream_error(
                    StatusCode::BAD_GATEWAY,
                    "upstream_unreachable",
                    "the upstream provider could not be reached".into(),
                );
                return reject(rejection, protocol);
            }
            Err(_) => {
                let rejection = upstream_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    format!(
                        "the upstream provider did not answer within {:?}",
                        self.timeouts.first_byte
                    ),
                );
                return reject(rejection, protocol);
            }
        };
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(model) = model {
            parts.extensions.insert(crate::observe::RequestModel(model));
        }
        let body = DeadlineBody::new(body, self.timeouts.idle, None, "the upstream's reply");
        Response::from_parts(parts, axum::body::Body::new(body))
    }
}

/// Why a request's key may not use the model it names, if it may not.
/// The model a request names: from the shared request when a layer parsed it, else read from
/// the JSON body.
fn requested_model(extensions: &http::Extensions, body: &Bytes) -> Option<String> {
    match extensions.get::<moat::core::request::SharedLlmRequest>() {
        Some(llm) => llm.with(|r| r.model().map(str::to_owned)),
        None => {
            #[derive(serde::Deserialize)]
            struct Named {
                model: Option<String>,
            }
            serde_json::from_slice::<Named>(body).ok()?.model
        }
    }
}

/// The refusal of a request for a model its key may not use.
fn out_of_scope(scope: &crate::auth::ModelScope, model: Option<&str>) -> Option<Rejection> {
    let model = model?;
    (!moat::core::llm::model_matches(&scope.0, Some(model))).then(|| {
        Rejection::new(
            StatusCode::FORBIDDEN,
            "invalid_request_error",
            format!(
                "This API key may not use the model {model:?}; it may use {}.",
                scope.0.join(", ")
            ),
        )
        .with_code("model_not_allowed")
        .with_param("model")
    })
}

/// A query parameter's name, percent-decoded (`+` as a space), for comparison.
fn param_name(pair: &str) -> String {
    let name = pair.split('=').next().unwrap_or("");
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).to_ascii_lowercase()
}

/// Whether a query string carries a credential parameter.
pub(crate) fn has_query_credential(uri: &Uri) -> bool {
    uri.query().is_some_and(|q| {
        q.split('&')
            .any(|pair| CREDENTIAL_PARAMS.contains(&param_name(pair).as_str()))
    })
}

/// The query without its credential parameters.
fn strip_credentials(query: &str) -> String {
    query
        .split('&')
        .filter(|pair| !pair.is_empty() && !CREDENTIAL_PARAMS.contains(&param_name(pair).as_str()))
        .collect::<Vec<_>>()
        .join("&")
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

/// Whether an error, or what caused it, is an `io::Error` of kind `TimedOut`.
fn timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        next = e.source();
    }
    false
}

fn upstream_error(status: StatusCode, code: &'static str, message: String) -> Rejection {
    Rejection::new(status, "upstream_error", message).with_code(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn upstream(base: &str, kind: &str) -> Provider {
        let source =
            format!("[upstream]\nbase_url = \"{base}\"\nkind = \"{kind}\"\napi_key_env = \"K\"\n");
        let resolved = Config::resolve(&source, |_| Some("sk-provider".into())).unwrap();
        Provider::new(&resolved.upstreams[0], resolved.max_body_bytes)
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
    fn credentials_in_the_query_never_leave() {
        let up = upstream("https://api.openai.com/v1", "openai");
        for (query, kept, credential) in [
            ("api_key=sk-1", "", true),
            ("limit=5&API_KEY=sk-1&after=x", "?limit=5&after=x", true),
            (
                "api%5Fkey=sk-1&key=k&token=t&access_token=a&x-api-key=x",
                "",
                true,
            ),
            ("api-version=2024-06-01", "?api-version=2024-06-01", false),
        ] {
            let uri: Uri = format!("/v1/models?{query}").parse().unwrap();
            assert_eq!(has_query_credential(&uri), credential, "{query}");
            assert_eq!(
                up.uri_for(&uri).unwrap().to_string(),
                format!("https://api.openai.com/v1/models{kept}"),
                "{query}"
            );
        }
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
