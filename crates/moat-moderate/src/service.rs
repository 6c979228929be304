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

use crate::body::{ResponseBody, Watch};
use crate::category::Category;
use crate::category::Scores;
use crate::external::External;
use crate::hook::{blocked_tail, lock, replace_reply, Capture, ReplyHook, SharedCapture};
use crate::policy::{Action, Policy, StreamMode};
use crate::scan::check_text;
use http_body_util::BodyExt;
use moat_core::kit::{OnError, Policies, Scope};
use moat_core::usage::BodyFormat;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Moderates replies (and, when asked, prompts) by a [`Policy`]. Clones share it.
#[derive(Debug, Clone)]
#[must_use]
pub struct ModerateLayer {
    policies: Policies<Policy>,
    input: bool,
    body_limit: usize,
    external: Option<External>,
    /// The requests it applies to (routes, methods, models, tiers); `None`: every LLM route.
    scope: Option<Scope>,
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
            policies: Policies::new(policy),
            input: false,
            body_limit: DEFAULT_BODY_LIMIT,
            external: None,
            scope: None,
        }
    }

    /// The default policy.
    pub fn policy(&self) -> &Policy {
        self.policies.default_policy()
    }

    /// Moderates the requests `scope` admits (its routes, methods, caller tiers and models;
    /// its key and mode are not used) by `policy` instead of the default: the first such
    /// scope that admits a request chooses its policy. Within the layer's own
    /// [scope](Self::with_scope), if it has one.
    pub fn with_policy_for(mut self, scope: Scope, policy: Policy) -> Self {
        self.policies = self.policies.with(scope, policy);
        self
    }

    /// The default policy and the scoped ones.
    pub fn policies(&self) -> &Policies<Policy> {
        &self.policies
    }

    /// Also moderates the prompt (default off): a flagged prompt is refused with 400
    /// `content_filter` (gRPC `INVALID_ARGUMENT`) under [`Action::Block`], masked under
    /// [`Action::Mask`], and recorded under the others.
    pub fn with_input(mut self, input: bool) -> Self {
        self.input = input;
        self
    }

    /// Also asks an external moderator ([`External`], e.g. [`OpenAiModerations`](crate::OpenAiModerations)):
    /// about the prompt when [input](Self::with_input) is moderated, about whole (JSON)
    /// replies, and about streamed replies in [`StreamMode::Buffered`](crate::StreamMode::Buffered),
    /// each before any of it reaches the client. Streams in the other modes flow as the local
    /// classifier lets them, and their text is asked about in windows of
    /// [`STREAM_WINDOW_CHARS`](crate::STREAM_WINDOW_CHARS) (or less, where a text ends): the
    /// frame that completes a window waits for its verdict, and a flagged window ends the
    /// stream there, in the client's protocol. So up to a window's text, less its last frame,
    /// may reach the client before the verdict on it; the end of the stream always waits for
    /// the last verdict. Its scores have no spans: a flagged category whose action is mask
    /// blocks. When it fails or is late, [`OnError::Open`](moat_core::kit::OnError)
    /// goes on with the local verdict; `Closed` withholds the reply (a prompt gets 503
    /// `moderation_unavailable`).
    pub fn with_external(mut self, external: External) -> Self {
        self.external = Some(external);
        self
    }

    /// Moderates only the requests `scope` admits: its routes and methods, the caller's tier
    /// (moat-core's [`Caller`](moat_core::Caller) in the extensions), and the request's model
    /// (read from the body, parsed once for every layer). Other requests pass untouched. Its
    /// key and mode are not used.
    pub fn with_scope(mut self, scope: Scope) -> Self {
        self.scope = Some(scope);
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
            layer: Arc::new(self.clone()),
        }
    }
}

/// A service whose replies are moderated.
#[derive(Debug, Clone)]
pub struct Moderate<S> {
    inner: S,
    // Shared: a service is cloned for every request (and with every layer around it).
    layer: Arc<ModerateLayer>,
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

moat_core::layer_response_future! {
    /// The response future of [`Moderate`].
}

/// The most bytes of a reply read whole for an external moderator (as much as a JSON reply
/// the response view reads whole).
const MAX_WHOLE: usize = moat_core::usage::MAX_JSON_BYTES;

/// A body read to its end; `None` when it fails or is larger than [`MAX_WHOLE`].
async fn read_whole<B>(body: B) -> Option<Bytes>
where
    B: Body<Data = Bytes>,
{
    let mut body = std::pin::pin!(body);
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.as_mut().frame().await {
        if let Ok(data) = frame.ok()?.into_data() {
            out.extend_from_slice(&data);
            if out.len() > MAX_WHOLE {
                return None;
            }
        }
    }
    Some(out.freeze())
}

/// What an external verdict means under the policy: the categories it flags, and whether they
/// withhold (block, or mask, which has no spans to mask).
fn external_flags(policy: &Policy, scores: &Scores) -> (Vec<Category>, bool) {
    let flagged: Vec<Category> = policy.flagged(scores).collect();
    let withhold = flagged
        .iter()
        .any(|&c| matches!(policy.action_of(c), Action::Block | Action::Mask));
    (flagged, withhold)
}

/// Records what the external moderator said of a prompt or reply (`what`), or that it gave
/// no verdict; whether to withhold.
fn judge_external(
    external: &External,
    policy: &Policy,
    verdict: Result<Scores, String>,
    what: &'static str,
    record: impl FnOnce(Decision),
) -> Result<bool, ()> {
    let scores = match verdict {
        Ok(scores) => scores,
        Err(why) => {
            let closed = external.on_error == OnError::Closed;
            metrics::counter!("moat_moderate_external_errors_total", "on_error" => if closed { "closed" } else { "open" })
                .increment(1);
            tracing::warn!(target: "moat::moderate", closed, what, "{why}");
            if closed {
                record(
                    Decision::new(
                        "moderate",
                        Outcome::Rejected {
                            status: if what == "input" { 503 } else { 200 },
                            code: "moderation_unavailable".into(),
                        },
                    )
                    .with_rule(format!("external_{what}"))
                    .with_detail(why),
                );
                return Err(());
            }
            return Ok(false);
        }
    };
    let (flagged, withhold) = external_flags(policy, &scores);
    if flagged.is_empty() {
        return Ok(false);
    }
    let detail = flagged
        .iter()
        .map(|&c| format!("{c} {:.2}", scores.get(c)))
        .collect::<Vec<_>>()
        .join(", ");
    let shadow = flagged
        .iter()
        .all(|&c| policy.action_of(c) == Action::Shadow);
    let outcome = match (withhold, shadow) {
        (true, _) => Outcome::Rejected {
            status: if what == "input" { 400 } else { 200 },
            code: "content_filter".into(),
        },
        (false, true) => Outcome::ShadowRejected {
            code: "content_filter".into(),
        },
        (false, false) => Outcome::Allowed,
    };
    for category in &flagged {
        metrics::counter!("moat_moderate_external_flags_total", "category" => category.as_str(), "what" => what)
            .increment(1);
    }
    tracing::info!(target: "moat::moderate", withhold, what, categories = %detail, "flagged by the external moderator");
    record(
        Decision::new("moderate", outcome)
            .with_rule(format!("external_{what}"))
            .with_detail(detail),
    );
    Ok(withhold)
}

/// The refusal of a prompt the external moderator flagged, or could not judge (fail closed).
fn external_prompt_verdict(
    external: &External,
    policy: &Policy,
    verdict: Result<Scores, String>,
    extensions: &http::Extensions,
) -> Option<Rejection> {
    let flagged = verdict
        .as_ref()
        .map(|scores| external_flags(policy, scores).0)
        .unwrap_or_default();
    match judge_external(external, policy, verdict, "input", |d| Decisions::record(extensions, d)) {
        Ok(false) => None,
        Ok(true) => {
            let categories: Vec<&str> = flagged.iter().map(|c| c.as_str()).collect();
            Some(
                Rejection::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    format!(
                        "The prompt was flagged by content moderation ({}). Rephrase it and try again.",
                        categories.join(", ")
                    ),
                )
                .with_code("content_filter"),
            )
        }
        Err(()) => Some(
            Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "The prompt could not be moderated right now; the request was not sent. Please try again shortly.",
            )
            .with_code("moderation_unavailable"),
        ),
    }
}

/// Whether a whole reply is withheld on the external moderator's verdict.
pub(crate) fn withhold_reply(
    external: &External,
    policy: &Policy,
    verdict: Result<Scores, String>,
    decisions: Option<&Decisions>,
) -> bool {
    let record = |d| {
        if let Some(decisions) = decisions {
            decisions.push(d);
        }
    };
    judge_external(external, policy, verdict, "output", record).unwrap_or(true)
}

/// A withheld whole reply: the JSON reply replaced, or a stream that is only its ending.
fn withheld(
    format: WireFormat,
    message: &str,
    sse: bool,
    reply: &[u8],
    captured: &Capture,
) -> Bytes {
    if sse {
        return blocked_tail(format, message, captured.head.as_ref(), &captured.choices);
    }
    let mut doc: serde_json::Value = serde_json::from_slice(reply).unwrap_or_default();
    replace_reply(format, message, &mut doc);
    Bytes::from(doc.to_string())
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
        let layer = Arc::clone(&self.layer);
        let admitted = layer.scope.as_ref().is_none_or(|s| s.matches_request(&req));
        let format = output_format(req.uri().path()).filter(|_| admitted);
        let by_model = layer
            .scope
            .as_ref()
            .filter(|s| !s.models().is_empty())
            .cloned();
        let future = async move {
            let protocol = Protocol::of(&req);
            let refuse = |rejection: Rejection| {
                let response = rejection
                    .with_layer("moderate")
                    .into_response::<ResBody>(protocol);
                Ok(response.map(ResponseBody::plain))
            };
            let reads_body = layer.input || by_model.is_some() || layer.policies.needs_model();
            // Requests this layer does not moderate leave the block and are passed on after
            // it: awaited inside a `match` arm, the matched value would be held in the future.
            let passed = 'moderated: {
                let (mut req, policy) = 'read: {
                    if !(reads_body && format.is_some()) {
                        let policy = layer.policies.select(&req, None).clone();
                        break 'read (req.map(RequestBody::original), policy);
                    }
                    let (request, llm) = match read_llm_request(req, layer.body_limit).await {
                        Ok(LlmBody::Parsed { request, llm }) => (request, llm),
                        Ok(LlmBody::Unparsed(request)) => {
                            let policy = layer.policies.select(&request, None).clone();
                            break 'read (request, policy);
                        }
                        Err(rejection) => return refuse(rejection),
                    };
                    let model = llm.with(|r| r.model().map(str::to_owned));
                    if by_model.is_some_and(|s| !s.matches_model(model.as_deref())) {
                        break 'moderated request;
                    }
                    let policy = layer.policies.select(&request, model.as_deref()).clone();
                    if layer.input {
                        let refused =
                            llm.with(|r| moderate_prompt(&policy, r, request.extensions()));
                        if let Some(rejection) = refused {
                            return refuse(rejection);
                        }
                        if let Some(external) = &layer.external {
                            let texts: Vec<String> =
                                llm.with(|r| r.texts().map(|(_, t)| t.to_owned()).collect());
                            let verdict = external.check(&texts).await;
                            if let Some(rejection) = external_prompt_verdict(
                                external,
                                &policy,
                                verdict,
                                request.extensions(),
                            ) {
                                return refuse(rejection);
                            }
                        }
                    }
                    (request, policy)
                };
                let Some(format) = format else {
                    break 'moderated req;
                };
                let decisions = req.extensions().get::<Decisions>().cloned();
                let capture: Option<SharedCapture> =
                    layer.external.as_ref().map(|_| Arc::default());
                let hooks = Hooks::of(req.extensions_mut());
                hooks.attach(ReplyHook::new(
                    policy.clone(),
                    format,
                    decisions.clone(),
                    capture.clone(),
                ));
                let response = Hooks::serve(Some(hooks), inner.call(req)).await?;
                let (Some(external), Some(capture)) = (&layer.external, capture) else {
                    return Ok(response.map(ResponseBody::new));
                };
                if !response.status().is_success() {
                    return Ok(response.map(ResponseBody::new));
                }
                match (BodyFormat::of(response.headers()), policy.stream_mode) {
                    (BodyFormat::Json, _) | (BodyFormat::Sse, StreamMode::Buffered) => {}
                    (BodyFormat::Sse, _) => {
                        // Judged in windows as it flows; a flagged window ends it.
                        let watch =
                            Watch::new(policy, external.clone(), capture, format, decisions);
                        return Ok(response.map(|body| ResponseBody::watched(body, watch)));
                    }
                    _ => return Ok(response.map(ResponseBody::new)),
                }
                // Read whole (the hooks run as it is read), then asked about before it is sent.
                let (mut parts, body) = response.into_parts();
                let Some(mut bytes) = read_whole(body).await else {
                    return refuse(Rejection::new(
                        StatusCode::BAD_GATEWAY,
                        "server_error",
                        "The provider's reply could not be read whole for moderation.",
                    ));
                };
                let captured = std::mem::take(&mut *lock(&capture));
                if !captured.blocked && !captured.texts.is_empty() {
                    let verdict = external.check(&captured.texts).await;
                    if withhold_reply(external, &policy, verdict, decisions.as_ref()) {
                        let sse = BodyFormat::of(&parts.headers) == BodyFormat::Sse;
                        bytes = withheld(format, &policy.message, sse, &bytes, &captured);
                    }
                }
                parts.headers.remove(http::header::CONTENT_LENGTH);
                return Ok(Response::from_parts(
                    parts,
                    ResponseBody::plain(CoreBody::full(bytes)),
                ));
            };
            Ok(inner.call(passed).await?.map(ResponseBody::passed))
        };
        ResponseFuture::new(future)
    }
}
