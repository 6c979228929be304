//! [`SanitizeLayer`]: every prompt screened before it is sent.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use moat_core::body::{RequestBody, DEFAULT_BODY_LIMIT};
use moat_core::decision::{Decision, Decisions, Outcome};
use moat_core::identity::Fingerprinter;
use moat_core::kit::{Policies, Scope};
use moat_core::llm::UnknownPolicy;
use moat_core::reject::{Protocol, Rejection};
use moat_core::request::{read_llm_request, LlmBody};
use moat_core::response::Hooks;
use tower_layer::Layer;
use tower_service::Service;

use crate::canary::Canary;
use crate::classifier::{External, OnError};
use crate::policy::{Action, Finding, FindingKind, Policy, Report, ShieldQuestion};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The header [`Action::Annotate`] sets: the highest injection score, two decimals.
pub static PROMPT_SCORE: HeaderName = HeaderName::from_static("x-moat-prompt-score");

/// At most this many reasons are named in a refusal.
const MAX_REASONS: usize = 5;

/// Screens prompts by a [`Policy`]. Clones share it.
#[derive(Debug, Clone)]
#[must_use]
pub struct SanitizeLayer {
    policies: Policies<Policy>,
    unknown: UnknownPolicy,
    body_limit: usize,
    /// The canary's secret, when the canary is on.
    canary: Option<Fingerprinter>,
    classifier: Option<External>,
    /// The requests it applies to; `None`: every request.
    scope: Option<Scope>,
}

impl Default for SanitizeLayer {
    fn default() -> Self {
        Self::new(Policy::new())
    }
}

impl SanitizeLayer {
    /// Screens by `policy`.
    pub fn new(policy: Policy) -> Self {
        Self {
            policies: Policies::new(policy),
            unknown: UnknownPolicy::default(),
            body_limit: DEFAULT_BODY_LIMIT,
            canary: None,
            classifier: None,
            scope: None,
        }
    }

    /// The default policy.
    pub fn policy(&self) -> &Policy {
        self.policies.default_policy()
    }

    /// Screens the requests `scope` admits (its routes, methods, caller tiers and models; its
    /// key and mode are not used) by `policy` instead of the default: the first such scope
    /// that admits a request chooses its policy. Within the layer's own
    /// [scope](Self::with_scope), if it has one.
    pub fn with_policy_for(mut self, scope: Scope, policy: Policy) -> Self {
        self.policies = self.policies.with(scope, policy);
        self
    }

    /// The default policy and the scoped ones.
    pub fn policies(&self) -> &Policies<Policy> {
        &self.policies
    }

    /// What to do with text in parts of a request the parser does not know: screen it like any
    /// other (the default), refuse the request with 400, or let it through unscreened.
    pub fn with_unknown(mut self, policy: UnknownPolicy) -> Self {
        self.unknown = policy;
        self
    }

    /// Screens only the requests `scope` admits: its routes and methods, the caller's tier
    /// (moat-core's [`Caller`](moat_core::Caller) in the extensions) and the request's model. Other requests
    /// pass unscreened. Its key and mode are not used.
    pub fn with_scope(mut self, scope: Scope) -> Self {
        self.scope = Some(scope);
        self
    }

    /// The largest request body read (default 4 MiB; 413 past it).
    pub fn with_body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// Also asks an external classifier (see [`External`]), after the local screening and only
    /// when that refused nothing. Its findings follow the [`Action`] like the local ones.
    pub fn with_classifier(mut self, classifier: External) -> Self {
        self.classifier = Some(classifier);
        self
    }

    /// Puts a secret marker (a keyed hash of the system prompt, the key drawn now) first in the
    /// system prompt (adding a system prompt where the format has one and the request none)
    /// and watches the reply for it: a
    /// model that repeats it is repeating its instructions, so the reply is withheld from the
    /// marker on (streamed: later text dropped and `finish_reason` set to `content_filter`;
    /// whole: the text cut there and a note put in its place), the leak counted in
    /// `moat_sanitize_canary_leaks_total`, logged as a warning and recorded as a decision.
    /// Not in [`Action::Shadow`], which changes nothing. Default off.
    pub fn with_canary(mut self, canary: bool) -> Self {
        self.canary = canary.then(crate::canary::random_key);
        self
    }

    /// What `policy` makes of the request, counted in metrics and recorded as a decision;
    /// the refusal, if any.
    fn judge(policy: &Policy, extensions: &http::Extensions, report: &Report) -> Option<Rejection> {
        let action = policy.current_action();
        for finding in &report.findings {
            metrics::counter!("moat_sanitize_findings_total", "finding" => finding.kind.name(), "action" => action.as_str())
                .increment(1);
        }
        let refusals: Vec<&Finding> = report.refusals(action).collect();
        let score = || format!("{:.2}", report.score);
        let Some(first) = refusals.first() else {
            let decision = match report.findings.first() {
                // The common case: nothing to say but the score, and only if someone records.
                None if !Decisions::is_recording(extensions) => return None,
                None => Decision::new("sanitize", Outcome::Allowed)
                    .with_detail(format!("score {}", score())),
                Some(first) => {
                    let outcome = match action {
                        Action::Shadow => Outcome::ShadowRejected {
                            code: code_of(report.findings.iter()).into(),
                        },
                        _ if report.stripped > 0 => Outcome::Rewritten {
                            spans: u32::try_from(report.stripped).unwrap_or(u32::MAX),
                        },
                        _ => Outcome::Allowed,
                    };
                    let why = reasons(report.findings.iter());
                    tracing::info!(target: "moat::sanitize", action = action.as_str(), score = %score(), findings = %why, "prompt let through with findings");
                    Decision::new("sanitize", outcome)
                        .with_rule(first.kind.name())
                        .with_detail(why)
                }
            };
            Decisions::record(extensions, decision);
            return None;
        };
        let code = code_of(refusals.iter().copied());
        let why = reasons(refusals.iter().copied());
        tracing::info!(target: "moat::sanitize", score = %score(), reasons = %why, "prompt rejected");
        Decisions::record(
            extensions,
            Decision::new(
                "sanitize",
                Outcome::Rejected {
                    status: 400,
                    code: code.into(),
                },
            )
            .with_rule(first.kind.name())
            .with_detail(why.clone()),
        );
        let rejection = Rejection::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("The prompt was rejected: {why}. Remove it, or rephrase the request."),
        )
        .with_code(code);
        Some(match &first.pointer {
            Some(pointer) => rejection.with_param(pointer.clone()),
            None => rejection,
        })
    }
}

/// `prompt_too_large` when every refusal is a cap, else `prompt_rejected`.
fn code_of<'a>(mut findings: impl Iterator<Item = &'a Finding>) -> &'static str {
    if findings.all(|f| matches!(f.kind, FindingKind::TooLarge { .. })) {
        "prompt_too_large"
    } else {
        "prompt_rejected"
    }
}

/// The first few reasons, joined.
fn reasons<'a>(findings: impl Iterator<Item = &'a Finding>) -> String {
    let mut out = Vec::new();
    let mut more = 0;
    for finding in findings {
        if out.len() < MAX_REASONS {
            out.push(finding.to_string());
        } else {
            more += 1;
        }
    }
    let mut joined = out.join("; ");
    if more > 0 {
        joined.push_str(&format!("; and {more} more"));
    }
    joined
}

impl<S> Layer<S> for SanitizeLayer {
    type Service = Sanitize<S>;

    fn layer(&self, inner: S) -> Sanitize<S> {
        Sanitize {
            inner,
            layer: Arc::new(self.clone()),
        }
    }
}

/// A service whose prompts are screened first.
#[derive(Debug, Clone)]
pub struct Sanitize<S> {
    inner: S,
    // Shared: a service is cloned for every request (and with every layer around it).
    layer: Arc<SanitizeLayer>,
}

impl<S> Sanitize<S> {
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
    /// The response body of [`Sanitize`]: the inner service's, or a refusal.
}

moat_core::layer_response_future! {
    /// The response future of [`Sanitize`].
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Sanitize<S>
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
        if !admitted {
            return ResponseFuture::new(async move {
                Ok(inner
                    .call(req.map(RequestBody::original))
                    .await?
                    .map(ResponseBody::passed))
            });
        }
        let future = async move {
            let protocol = Protocol::of(&req);
            let reject = |rejection: Rejection| {
                let response = rejection
                    .with_layer("sanitize")
                    .into_response::<ResBody>(protocol);
                Ok(response.map(ResponseBody::plain))
            };
            // Requests this layer does not screen leave the block and are passed on after it:
            // awaited inside a `match` arm, the matched value would be held in the future.
            let passed = 'screened: {
                let (mut req, score, canary, action) = {
                    let (request, llm) = match read_llm_request(req, layer.body_limit).await {
                        Ok(LlmBody::Parsed { request, llm }) => (request, llm),
                        Ok(LlmBody::Unparsed(request)) => break 'screened request,
                        Err(rejection) => return reject(rejection),
                    };
                    let model = llm.with(|r| r.model().map(str::to_owned));
                    if let Some(scope) = &layer.scope {
                        if !scope.matches_model(model.as_deref()) {
                            break 'screened request;
                        }
                    }
                    let policy = layer.policies.select(&request, model.as_deref());
                    if let Err(rejection) = llm.with(|r| layer.unknown.check(r)) {
                        return reject(rejection);
                    }
                    let mut report = llm.with(|r| policy.inspect(r, layer.unknown));
                    policy.check_tokens(&mut report, || llm.input_tokens(true).tokens);
                    let action = policy.current_action();
                    if let Some(external) = layer
                        .classifier
                        .as_ref()
                        .filter(|_| report.refusals(action).next().is_none())
                    {
                        let question = llm.with(|r| ShieldQuestion::of(r, layer.unknown));
                        match external.ask(question.input.clone()).await {
                            Ok(verdict) => report.findings.extend(question.findings(&verdict)),
                            Err(why) => {
                                let closed = external.on_error == OnError::Closed;
                                metrics::counter!("moat_sanitize_classifier_errors_total", "on_error" => if closed { "closed" } else { "open" })
                                .increment(1);
                                tracing::warn!(target: "moat::sanitize", closed, "{why}");
                                if closed {
                                    return reject(
                                    Rejection::new(
                                        StatusCode::SERVICE_UNAVAILABLE,
                                        "server_error",
                                        "The prompt could not be screened right now; the request was not sent. Please try again shortly.",
                                    )
                                    .with_code("screening_unavailable"),
                                );
                                }
                            }
                        }
                    }
                    if let Some(rejection) =
                        SanitizeLayer::judge(policy, request.extensions(), &report)
                    {
                        return reject(rejection);
                    }
                    let canary = layer
                        .canary
                        .as_ref()
                        .filter(|_| action != Action::Shadow)
                        .and_then(|key| {
                            llm.with(|r| {
                                let canary = Canary::of(key, r);
                                canary.plant(r).then_some(canary)
                            })
                        });
                    (request, report.score, canary, action)
                };
                let annotation = (action == Action::Annotate)
                    .then(|| HeaderValue::try_from(format!("{score:.2}")).ok())
                    .flatten();
                if let Some(value) = &annotation {
                    req.headers_mut()
                        .insert(PROMPT_SCORE.clone(), value.clone());
                }
                let hooks = canary.map(|canary| {
                    let decisions = req.extensions().get::<Decisions>().cloned();
                    let hooks = Hooks::of(req.extensions_mut());
                    hooks.attach(canary.hook(decisions));
                    hooks
                });
                let mut response = Hooks::serve(hooks, inner.call(req)).await?;
                if let Some(value) = annotation {
                    response.headers_mut().insert(PROMPT_SCORE.clone(), value);
                }
                return Ok(response.map(ResponseBody::new));
            };
            Ok(inner.call(passed).await?.map(ResponseBody::passed))
        };
        ResponseFuture::new(future)
    }
}
