//! [`RedactLayer`]: placeholders out, originals back.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use moat_core::body::{RequestBody, DEFAULT_BODY_LIMIT};
use moat_core::decision::{Decision, Decisions, Mode, Outcome};
use moat_core::kit::{Policies, Scope};
use moat_core::llm::{LlmRequest, UnknownPolicy};
use moat_core::reject::{Protocol, Rejection};
use moat_core::request::{read_llm_request, LlmBody};
use moat_core::response::Hooks;
use tower_layer::Layer;
use tower_service::Service;

use crate::redactor::Redactor;
use crate::reply::Rewriter;
use crate::session::{lock, Sessions, SharedVault, MAX_CONVERSATION_ID};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Redacts prompts and restores replies. Clones share one [`Redactor`] and one [`Sessions`].
#[derive(Debug, Clone)]
#[must_use]
pub struct RedactLayer {
    policies: Policies<RedactPolicy>,
    /// Whether replies are scrubbed (with the chosen policy's detector).
    reply_side: bool,
    sessions: Option<Sessions>,
    restore: bool,
    mode: Mode,
    unknown: UnknownPolicy,
    body_limit: usize,
    /// The requests it applies to; `None`: every request.
    scope: Option<Scope>,
}

impl RedactLayer {
    /// Redacts with `redactor` and restores replies.
    pub fn new(redactor: Redactor) -> Self {
        Self {
            policies: Policies::new(RedactPolicy::new(redactor)),
            reply_side: false,
            sessions: None,
            restore: true,
            mode: Mode::Enforce,
            unknown: UnknownPolicy::default(),
            body_limit: DEFAULT_BODY_LIMIT,
            scope: None,
        }
    }

    /// Redacts only the requests `scope` admits: its routes and methods, the caller's tier
    /// (moat-core's [`Caller`](moat_core::Caller) in the extensions) and the request's model. Other requests
    /// pass untouched, their replies unrestored. Its key and mode are not used.
    pub fn with_scope(mut self, scope: Scope) -> Self {
        self.scope = Some(scope);
        self
    }

    /// Whether placeholders in replies are replaced by the originals (default yes).
    pub fn with_restore(mut self, restore: bool) -> Self {
        self.restore = restore;
        self
    }

    /// Whether replies are also scrubbed: personal data the model writes that was not in the
    /// prompt (it never went into the vault) is replaced by `[EMAIL]`-style labels before the
    /// client sees it, streamed replies with a bounded carry ([`MAX_CARRY`](crate::MAX_CARRY)).
    /// Default no.
    pub fn with_reply_side(mut self, scrub: bool) -> Self {
        self.reply_side = scrub;
        self
    }

    /// Redacts the requests `scope` admits (its routes, methods, caller tiers and models; its
    /// key and mode are not used) with `redactor` instead of the default: the first such
    /// scope that admits a request chooses. Within the layer's own
    /// [scope](Self::with_scope), if it has one; restoring, reply-side scrubbing, the mode and
    /// the conversation vaults are the layer's.
    pub fn with_policy_for(mut self, scope: Scope, redactor: Redactor) -> Self {
        self.policies = self.policies.with(scope, RedactPolicy::new(redactor));
        self
    }

    /// In [`Mode::Shadow`], values are found, counted and recorded as a decision, but the request
    /// goes out unchanged (to measure what redaction would do before turning it on).
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Keeps one vault per conversation (see [`Sessions`]) instead of one per request, so the
    /// same value gets the same placeholder in every turn.
    pub fn with_sessions(mut self, sessions: Sessions) -> Self {
        self.sessions = Some(sessions);
        self
    }

    /// Takes over `previous`'s conversation vaults (when both keep [`Sessions`]): a layer
    /// rebuilt from a new configuration (a reload) still restores what the old one replaced.
    pub fn with_state_from(mut self, previous: &RedactLayer) -> Self {
        if let (Some(sessions), Some(old)) = (self.sessions.take(), &previous.sessions) {
            self.sessions = Some(sessions.with_state_from(old));
        }
        self
    }

    /// What to do with text in parts of a request the parser does not know (a content part of a
    /// new type, an undocumented field): scan it like any other text (the default), refuse the
    /// request with 400, or send it unscanned. See [`UnknownPolicy`].
    pub fn with_unknown(mut self, policy: UnknownPolicy) -> Self {
        self.unknown = policy;
        self
    }

    /// The largest request body read (default 4 MiB; 413 past it).
    pub fn with_body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }
}

impl<S> Layer<S> for RedactLayer {
    type Service = Redact<S>;

    fn layer(&self, inner: S) -> Redact<S> {
        Redact {
            inner,
            layer: Arc::new(self.clone()),
        }
    }
}

/// A service whose prompts are redacted and replies restored.
#[derive(Debug, Clone)]
pub struct Redact<S> {
    inner: S,
    // Shared: a service is cloned for every request (and with every layer around it).
    layer: Arc<RedactLayer>,
}

impl<S> Redact<S> {
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
    /// The response body of [`Redact`]: placeholders restored (and, with reply-side redaction,
    /// new values scrubbed) as the reply passes, streamed or not.
}

moat_core::layer_response_future! {
    /// The response future of [`Redact`].
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Redact<S>
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
                    .with_layer("redact")
                    .into_response::<ResBody>(protocol);
                Ok(response.map(ResponseBody::plain))
            };
            // Requests of other models leave the block and are passed on after it: awaited
            // inside a `match` arm, the matched value would be held in the future.
            let passed = 'redacted: {
                let (mut req, vault, policy) = match read_llm_request(req, layer.body_limit).await {
                    Ok(LlmBody::Parsed { request, llm }) => {
                        let by_model = layer.scope.as_ref().filter(|s| !s.models().is_empty());
                        let model = (by_model.is_some() || layer.policies.needs_model())
                            .then(|| llm.with(|r| r.model().map(str::to_owned)))
                            .flatten();
                        if by_model.is_some_and(|s| !s.matches_model(model.as_deref())) {
                            break 'redacted request;
                        }
                        let policy = layer.policies.select(&request, model.as_deref()).clone();
                        if let Err(rejection) = llm.with(|r| layer.unknown.check(r)) {
                            return reject(rejection);
                        }
                        let vault = match &layer.sessions {
                            Some(sessions) => {
                                match sessions.vault_for(request.headers(), request.extensions()) {
                                Ok(vault) => vault,
                                Err(_) => {
                                    return reject(
                                        Rejection::bad_request(format!(
                                            "the conversation id must be 1 to {MAX_CONVERSATION_ID} visible ASCII characters"
                                        ))
                                        .with_code("invalid_conversation_id"),
                                    )
                                }
                            }
                            }
                            None => SharedVault::default(),
                        };
                        let spans = llm.with(|r| layer.redact(&policy.redactor, r, &vault));
                        if spans > 0 {
                            let shadow = layer.mode == Mode::Shadow;
                            let spans = u32::try_from(spans).unwrap_or(u32::MAX);
                            tracing::debug!(target: "moat::redact", spans, shadow, "redacted");
                            let decision = if shadow {
                                Decision::new("redact", Outcome::Allowed).with_detail(format!(
                                    "shadow: {spans} values would be redacted"
                                ))
                            } else {
                                Decision::new("redact", Outcome::Rewritten { spans })
                            };
                            Decisions::record(request.extensions(), decision);
                        }
                        (request, vault, policy)
                    }
                    Ok(LlmBody::Unparsed(request)) => {
                        let policy = layer.policies.select(&request, None).clone();
                        (request, SharedVault::default(), policy)
                    }
                    Err(rejection) => return reject(rejection),
                };
                let rewriter = Rewriter {
                    scrub: (layer.reply_side && layer.mode == Mode::Enforce)
                        .then(|| policy.scrub.clone()),
                    redactor: policy.redactor.clone(),
                    vault,
                    restore: layer.restore,
                };
                let hooks = (!rewriter.is_noop()).then(|| {
                    let hooks = Hooks::of(req.extensions_mut());
                    hooks.attach(rewriter.hook());
                    hooks
                });
                let response = Hooks::serve(hooks, inner.call(req)).await?;
                return Ok(response.map(ResponseBody::new));
            };
            Ok(inner.call(passed).await?.map(ResponseBody::passed))
        };
        ResponseFuture::new(future)
    }
}

/// What a request is redacted with: a redactor, and the same detector redacting everything,
/// for replies scrubbed on the way back.
#[derive(Debug)]
struct RedactPolicy {
    redactor: Arc<Redactor>,
    scrub: Arc<Redactor>,
}

impl RedactPolicy {
    fn new(redactor: Redactor) -> Self {
        Self {
            scrub: Arc::new(redactor.redacting()),
            redactor: Arc::new(redactor),
        }
    }
}

impl RedactLayer {
    /// Redacts every segment the unknown policy lets it scan, counting what it finds; the number
    /// of values found.
    fn redact(&self, redactor: &Redactor, request: &mut LlmRequest, vault: &SharedVault) -> usize {
        let shadow = self.mode == Mode::Shadow;
        let mode = if shadow { "shadow" } else { "enforce" };
        let mut vault = lock(vault);
        let mut spans = 0;
        for i in 0..request.segment_count() {
            if !request.segment(i).is_some_and(|s| self.unknown.scans(s)) {
                continue;
            }
            let Some(text) = request.text(i) else {
                continue;
            };
            let found = redactor.detector().find(text);
            for f in &found {
                metrics::counter!("moat_redact_values_total", "entity" => f.entity.name(), "mode" => mode)
                    .increment(1);
            }
            spans += found.len();
            if shadow || found.is_empty() {
                continue;
            }
            let text = redactor.replace(text, &found, &mut vault).text.into_owned();
            request.set_text(i, text);
        }
        spans
    }
}
