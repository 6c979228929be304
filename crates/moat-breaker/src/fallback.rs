//! A ladder of targets: the request goes to the next when one cannot serve it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::Body;
use moat_core::body::{buffer, RequestBody, ResponseBody, DEFAULT_BODY_LIMIT};
use moat_core::decision::{Decision, Decisions, Outcome};
use moat_core::llm::model_matches;
use moat_core::reject::{Protocol, Rejection};
use moat_core::request::SharedLlmRequest;
use tower::ServiceExt;
use tower_service::Service;

use crate::retry::{retryable, Backoff};
use crate::service::{with_retry_after, Reason, Unavailable};

/// The header that says which fallback served a response.
pub const FALLBACK_HEADER: HeaderName = HeaderName::from_static("x-moat-fallback");

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One rung of a [`Fallback`] ladder.
#[derive(Debug, Clone)]
struct Target<S> {
    name: Arc<str>,
    service: S,
    models: Vec<String>,
}

/// Serves each request from the first target that can: when a target's breaker is open, or
/// it fails before the first byte of its reply (a 5xx, a 429, refused credentials, a stream
/// whose first event is an error or that stalls), the request goes to the next target, down
/// to a configured static response or a 503 with `retry-after`.
///
/// Targets are usually [`CircuitBreaker`](crate::CircuitBreaker)s around each provider or
/// deployment: the fallback reads the [`Unavailable`] they leave in a response. The request
/// body is buffered once (under the body limit; LLM requests are small) and sent again as
/// is. A response from any target but the first says so in `x-moat-fallback: <name>`.
///
/// A failing target is tried again up to `attempts` times before the next (jittered backoff,
/// `retry-after` honoured; see [`retryable`](crate::retryable) for what is safe to retry).
///
/// Falling back from one provider kind to another (OpenAI to Anthropic) would need the
/// request and the reply translated; the fallback sends the same request, so every target of
/// a ladder must speak the same API.
///
/// ```
/// use bytes::Bytes;
/// use http::{Request, Response, StatusCode};
/// use http_body_util::Full;
/// use moat_breaker::{Breaker, CircuitBreakerLayer, Fallback};
/// use moat_core::body::RequestBody;
/// use std::convert::Infallible;
/// use tower::{service_fn, Layer, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// type Body = RequestBody<Full<Bytes>>;
/// let provider = |status: u16, text: &'static str| {
///     service_fn(move |_req: Request<Body>| async move {
///         let mut response = Response::new(Full::new(Bytes::from(text)));
///         *response.status_mut() = StatusCode::from_u16(status).unwrap();
///         Ok::<_, Infallible>(response)
///     })
/// };
/// let primary = CircuitBreakerLayer::new(Breaker::new("primary")).layer(provider(503, "overloaded"));
/// let backup = CircuitBreakerLayer::new(Breaker::new("backup")).layer(provider(200, "hello"));
/// let ladder = Fallback::new().target("primary", primary).target("backup", backup);
/// let response = ladder.oneshot(Request::new(Full::new(Bytes::from("{}")))).await.unwrap();
/// assert_eq!(response.status(), 200);
/// assert_eq!(response.headers()["x-moat-fallback"], "backup");
/// # }
/// ```
pub struct Fallback<S> {
    targets: Arc<[Target<S>]>,
    last_resort: Option<Arc<LastResort>>,
    attempts: u32,
    backoff: Backoff,
    body_limit: usize,
}

/// A static response that ends a ladder.
#[derive(Debug, Clone)]
struct LastResort {
    status: StatusCode,
    content_type: HeaderValue,
    body: Bytes,
}

impl<S: Clone> Clone for Fallback<S> {
    fn clone(&self) -> Self {
        Self {
            targets: self.targets.clone(),
            last_resort: self.last_resort.clone(),
            attempts: self.attempts,
            backoff: self.backoff,
            body_limit: self.body_limit,
        }
    }
}

impl<S> fmt::Debug for Fallback<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fallback")
            .field(
                "targets",
                &self.targets.iter().map(|t| &*t.name).collect::<Vec<_>>(),
            )
            .field("attempts", &self.attempts)
            .field("last_resort", &self.last_resort.is_some())
            .finish()
    }
}

impl<S> Default for Fallback<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Fallback<S> {
    /// An empty ladder: add targets in the order to try them.
    pub fn new() -> Self {
        Self {
            targets: Arc::from(Vec::new()),
            last_resort: None,
            attempts: 0,
            backoff: Backoff::default(),
            body_limit: DEFAULT_BODY_LIMIT,
        }
    }

    fn push(self, target: Target<S>) -> Self
    where
        S: Clone,
    {
        let mut targets = self.targets.to_vec();
        targets.push(target);
        Self {
            targets: targets.into(),
            ..self
        }
    }

    /// Adds a target for every request.
    pub fn target(self, name: impl Into<Arc<str>>, service: S) -> Self
    where
        S: Clone,
    {
        self.target_for_models(name, service, Vec::new())
    }

    /// Adds a target for the requests whose `model` matches one of `models` (`gpt-4o*`
    /// matches by prefix); empty matches every request, and so does a request without a
    /// model. A request whose model no target serves is answered 404 `model_not_found`.
    pub fn target_for_models(
        self,
        name: impl Into<Arc<str>>,
        service: S,
        models: Vec<String>,
    ) -> Self
    where
        S: Clone,
    {
        self.push(Target {
            name: name.into(),
            service,
            models,
        })
    }

    /// Tries a failing target again up to `attempts` times before moving on, waiting as
    /// `backoff` says.
    #[must_use]
    pub fn with_retries(mut self, attempts: u32, backoff: Backoff) -> Self {
        self.attempts = attempts;
        self.backoff = backoff;
        self
    }

    /// Ends the ladder with this response instead of a 503.
    #[must_use]
    pub fn with_last_resort(
        mut self,
        status: StatusCode,
        content_type: HeaderValue,
        body: Bytes,
    ) -> Self {
        self.last_resort = Some(Arc::new(LastResort {
            status,
            content_type,
            body,
        }));
        self
    }

    /// Buffers request bodies up to `bytes` (413 past it).
    #[must_use]
    pub fn with_body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// The targets' names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.targets.iter().map(|t| &*t.name)
    }
}

impl<S, B, ResBody> Service<Request<B>> for Fallback<S>
where
    S: Service<Request<RequestBody<B>>, Response = Response<ResBody>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
    S::Error: Send,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        // Each target is driven to readiness when the request reaches it.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(serve(this, request))
    }
}

/// Serves `request` down `this` ladder.
async fn serve<S, B, ResBody>(
    this: Fallback<S>,
    request: Request<B>,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<RequestBody<B>>, Response = Response<ResBody>> + Clone,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let protocol = Protocol::of(&request);
    let (parts, body) = request.into_parts();
    let buffered = match buffer(body, this.body_limit).await {
        Ok(buffered) => buffered,
        Err(e) => return Ok(Rejection::from(e).into_response(protocol)),
    };
    let model = model_of(&parts.extensions, &buffered.data);
    let serves =
        |target: &Target<S>| model.is_none() || model_matches(&target.models, model.as_deref());
    // The request's head is copied for each attempt while another could follow; the last
    // possible attempt (usually the only one) takes it, so the common case copies nothing.
    let last_target = this.targets.iter().rposition(serves);
    let decisions = parts.extensions.get::<Decisions>().cloned();
    let mut parts = Some(parts);
    let mut skipped: Option<(Arc<str>, Reason)> = None;
    let mut shortest_wait: Option<Duration> = None;
    let mut last: Option<Response<ResBody>> = None;
    let mut last_error = None;
    for (index, target) in this.targets.iter().enumerate() {
        if !serves(target) {
            continue;
        }
        let mut attempt = 0;
        loop {
            let final_attempt = Some(index) == last_target && attempt >= this.attempts;
            let head = if final_attempt {
                parts.take()
            } else {
                parts.clone()
            };
            let Some(head) = head else { break };
            let request = Request::from_parts(
                head,
                RequestBody::full(buffered.data.clone(), buffered.trailers.clone()),
            );
            let result = target.service.clone().oneshot(request).await;
            let response = match result {
                Ok(response) => response,
                Err(error) => {
                    last_error = Some(error);
                    if attempt < this.attempts {
                        tokio::time::sleep(this.backoff.delay(attempt)).await;
                        attempt += 1;
                        continue;
                    }
                    skipped.get_or_insert((target.name.clone(), Reason::Failed));
                    break;
                }
            };
            let Some(unavailable) = response.extensions().get::<Unavailable>().cloned() else {
                return Ok(served(
                    response,
                    &target.name,
                    skipped.as_ref(),
                    decisions.as_ref(),
                ));
            };
            if let Some(after) = unavailable.retry_after {
                shortest_wait = Some(shortest_wait.map_or(after, |w| w.min(after)));
            }
            if attempt < this.attempts {
                if let Some(delay) =
                    retryable(&response).and_then(|after| this.backoff.delay_after(attempt, after))
                {
                    drop(response);
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                    continue;
                }
            }
            skipped.get_or_insert((target.name.clone(), unavailable.reason));
            last = Some(response);
            break;
        }
    }
    if last_target.is_none() {
        let model = model.unwrap_or_default();
        return Ok(Rejection::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("no upstream serves the model {model:?}"),
        )
        .with_code("model_not_found")
        .with_param("model")
        .with_layer("fallback")
        .into_response(protocol));
    }
    if let (Some((from, reason)), Some(decisions)) = (&skipped, &decisions) {
        decisions.push(
            Decision::new(
                "fallback",
                Outcome::Rejected {
                    status: 503,
                    code: "no_upstream_available".into(),
                },
            )
            .with_detail(format!("{from}: {}", reason.as_str())),
        );
    }
    if let Some(resort) = &this.last_resort {
        let mut response = Response::new(ResponseBody::full(resort.body.clone()));
        *response.status_mut() = resort.status;
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, resort.content_type.clone());
        response
            .headers_mut()
            .insert(FALLBACK_HEADER, HeaderValue::from_static("static"));
        return Ok(response);
    }
    // The last target's own answer says most; a 503 when none answered.
    if let Some(response) = last {
        return Ok(response.map(ResponseBody::inner));
    }
    if let (Some(error), true) = (last_error, skipped.is_some()) {
        return Err(error);
    }
    let mut rejection = Rejection::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "no upstream can serve this request now; try again later",
    )
    .with_code("no_upstream_available")
    .with_layer("fallback");
    if let Some(wait) = shortest_wait {
        rejection = with_retry_after(rejection, wait);
    }
    Ok(rejection.into_response(protocol))
}

/// A response served by `name`, marked when an earlier target could not serve it.
fn served<ResBody>(
    response: Response<ResBody>,
    name: &Arc<str>,
    skipped: Option<&(Arc<str>, Reason)>,
    decisions: Option<&Decisions>,
) -> Response<ResponseBody<ResBody>> {
    let mut response = response.map(ResponseBody::inner);
    if let Some((from, reason)) = skipped {
        crate::metrics::fallback(from);
        tracing::info!(target: "moat::breaker", from = %from, to = %name, reason = reason.as_str(), "request served by a fallback");
        if let Some(decisions) = decisions {
            decisions.push(
                Decision::new("fallback", Outcome::Allowed)
                    .with_rule(name.to_string())
                    .with_detail(format!("{from}: {}", reason.as_str())),
            );
        }
        if let Ok(value) = HeaderValue::from_str(name) {
            response.headers_mut().insert(FALLBACK_HEADER, value);
        }
    }
    response
}

/// The request's model: from the request an outer moat layer parsed, else read from the body.
fn model_of(extensions: &http::Extensions, body: &Bytes) -> Option<String> {
    if let Some(shared) = extensions.get::<SharedLlmRequest>() {
        return shared.with(|r| r.model().map(str::to_owned));
    }
    #[derive(serde::Deserialize)]
    struct Model {
        model: Option<String>,
    }
    serde_json::from_slice::<Model>(body).ok()?.model
}
