//! [`ModerateLayer`]: every reply checked before the client sees it.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body;
use moat_core::body::{RequestBody, ResponseBody as CoreBody, DEFAULT_BODY_LIMIT};
use moat_core::decision::{Decision, Decisions, Outcome};
use moat_core::llm::WireFormat;
use moat_core::reject::{Protocol, Rejection};
use moat_core::request::{read_llm_request, LlmBody};
use moat_core::response::Hooks;
use tower_layer::Layer;
use tower_service::Service;

use crate::category::Scores;
use crate::hook::ReplyHook;
use crate::policy::{Action, Policy};
use crate::scan::check_text;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Moderates replies (and, when asked, prompts) by a [`Policy`]. Clones share it.
#[derive(Debug, Clone)]
#[must_use]
pub struct ModerateLayer {
    policy: Arc<Policy>,
    input: bool,
    body_limit: usize,
}

impl Default for ModerateLayer {
    fn default() -> Self {
        Self::new(Policy::new())
    }
}

impl ModerateLayer {
    /// Moderates replies by `policy`.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy: Arc::new(policy),
            input: false,
            body_limit: DEFAULT_BODY_LIMIT,
        }
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Also moderates the prompt (default off): a flagged prompt is refused with 400
    /// `content_filter` (gRPC `INVALID_ARGUMENT`) under [`Action::Block`], masked under
    /// [`Action::Mask`], and recorded under the others.
    pub fn with_input(mut self, input: bool) -> Self {
        self.input = input;
        self
    }

    /// The largest request body read when prompts are moderated (default 4 MiB; 413 past it).
    pub fn with_body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }
}

/// The API a reply to `path` speaks, when it is one whose output is moderated.
fn output_format(path: &str) -> Option<WireFormat> {
    match WireFormat::for_path(path)? {
        WireFormat::AnthropicMessages if path.trim_end_matches('/').ends_with("/count_tokens") => {
            None
        }
        f @ (WireFormat::ChatCompletions
        | WireFormat::Completions
        | WireFormat::Responses
        | WireFormat::AnthropicMessages) => Some(f),
        _ => None,
    }
}

impl<S> Layer<S> for ModerateLayer {
    type Service = Moderate<S>;

    fn layer(&self, inner: S) -> Moderate<S> {
        Moderate {
            inner,
            layer: self.clone(),
        }
    }
}

/// A service whose replies are moderated.
#[derive(Debug, Clone)]
pub struct Moderate<S> {
    inner: S,
    layer: ModerateLayer,
}

impl<S> Moderate<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

moat_core::layer_response_body! {
    /// The response body of [`Moderate`]: the inner service's (moderated), or a refusal.
}

moat_core::layer_response_future! {
    /// The response future of [`Moderate`].
}

/// What the policy makes of a prompt's texts: masked in place, or the refusal.
fn moderate_prompt(
    policy: &Policy,
    request: &mut moat_core::llm::LlmRequest,
    extensions: &http::Extensions,
) -> Option<Rejection> {
    let mut scores = Scores::zero();
    let mut blocked = false;
    let mut masked = 0;
    for i in 0..request.segment_count() {
        let Some(text) = request.text(i) else {
            continue;
        };
        let (out, scan) = check_text(text, policy);
        scores.merge(&scan.scores());
        blocked |= scan.is_blocked();
        if !blocked && out != text {
            masked += scan.masked().len();
            request.set_text(i, out);
        }
    }
    let flagged: Vec<&str> = policy.flagged(&scores).map(|c| c.as_str()).collect();
    if flagged.is_empty() {
        return None;
    }
    let categories = flagged.join(", ");
    let action = if blocked {
        Action::Block
    } else if masked > 0 {
        Action::Mask
    } else {
        policy
            .flagged(&scores)
            .map(|c| policy.action_of(c))
            .next()
            .unwrap_or_default()
    };
    for category in &flagged {
        metrics::counter!("moat_moderate_input_flags_total", "category" => category.to_string(), "action" => action.as_str())
            .increment(1);
    }
    tracing::info!(target: "moat::moderate", action = action.as_str(), categories = %categories, "prompt moderated");
    let outcome = match action {
        Action::Block => Outcome::Rejected {
            status: 400,
            code: "content_filter".into(),
        },
        Action::Mask => Outcome::Rewritten {
            spans: u32::try_from(masked).unwrap_or(u32::MAX),
        },
        Action::Shadow => Outcome::ShadowRejected {
            code: "content_filter".into(),
        },
        Action::Flag => Outcome::Allowed,
    };
    Decisions::record(
        extensions,
        Decision::new("moderate", outcome)
            .with_rule("input")
            .with_detail(categories.clone()),
    );
    blocked.then(|| {
        Rejection::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("The prompt was flagged by content moderation ({categories}). Rephrase it and try again."),
        )
        .with_code("content_filter")
    })
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Moderate<S>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        let format = output_format(req.uri().path());
        let future = async move {
            let protocol = Protocol::of(&req);
            let mut req = if layer.input && format.is_some() {
                match read_llm_request(req, layer.body_limit).await {
                    Ok(LlmBody::Parsed { request, llm }) => {
                        let refused =
                            llm.with(|r| moderate_prompt(&layer.policy, r, request.extensions()));
                        if let Some(rejection) = refused {
                            let response = rejection
                                .with_layer("moderate")
                                .into_response::<ResBody>(protocol);
                            return Ok(response.map(ResponseBody::plain));
                        }
                        request
                    }
                    Ok(LlmBody::Unparsed(request)) => request,
                    Err(rejection) => {
                        let response = rejection
                            .with_layer("moderate")
                            .into_response::<ResBody>(protocol);
                        return Ok(response.map(ResponseBody::plain));
                    }
                }
            } else {
                req.map(RequestBody::original)
            };
            let Some(format) = format else {
                return Ok(inner.call(req).await?.map(ResponseBody::passed));
            };
            let decisions = req.extensions().get::<Decisions>().cloned();
            let hooks = Hooks::of(req.extensions_mut());
            hooks.attach(ReplyHook::new(layer.policy.clone(), format, decisions));
            match inner.call(req).await {
                Ok(response) => Ok(hooks
                    .view(response.map(CoreBody::inner))
                    .map(ResponseBody::new)),
                Err(e) => {
                    hooks.fail();
                    Err(e)
                }
            }
        };
        ResponseFuture::new(future)
    }
}
