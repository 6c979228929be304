//! An external moderator, asked beside the local classifier: OpenAI's `/v1/moderations`, or
//! any service that answers its shape, under a latency budget, failing open or closed, with a
//! verdict cache so a text is asked about once.
//!
//! [`OpenAiModerations`] speaks the API over any tower HTTP client (a hyper-util `Client`, or a
//! client already wrapped in a rate limit or a circuit breaker), and is itself a tower
//! [`Service`] (texts in, results out), so the moderator can be wrapped in tower layers too.
//! Any such service is a [`Moderator`].

use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri};
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};
use moat_core::kit::OnError;
use serde_json::{json, Value};
use tower_service::Service;

use crate::category::{Category, Scores};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The most characters of one window of text sent to a moderator: longer texts go in windows
/// (OpenAI's own limit per input is far higher; shorter windows keep verdicts local).
pub const WINDOW_CHARS: usize = 4_000;

/// The most verdicts cached.
const CACHE_ENTRIES: usize = 10_000;

/// The largest moderator reply read.
const MAX_REPLY_BYTES: usize = 1 << 20;

/// The future a [`Moderator`] returns: one [`Scores`] per text, in order.
pub type ModerateFuture = Pin<Box<dyn Future<Output = Result<Vec<Scores>, BoxError>> + Send>>;

/// A service that scores texts in OpenAI's moderation categories.
pub trait Moderator: fmt::Debug + Send + Sync + 'static {
    /// Scores each of `texts`.
    fn moderate(&self, texts: Vec<String>) -> ModerateFuture;
}

/// Any tower service from texts to scores is a moderator (e.g. [`OpenAiModerations`] behind a
/// rate limit or a circuit breaker).
impl<S> Moderator for S
where
    S: Service<Vec<String>, Response = Vec<Scores>> + Clone + fmt::Debug + Send + Sync + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    fn moderate(&self, texts: Vec<String>) -> ModerateFuture {
        let mut service = self.clone();
        Box::pin(async move {
            std::future::poll_fn(|cx| service.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            service.call(texts).await.map_err(Into::into)
        })
    }
}

/// OpenAI's moderation API (`POST /v1/moderations`) over the HTTP client `S`.
///
/// Sends `{"model": ..., "input": [texts]}`; reads `results[i].category_scores` (and
/// `categories`, for servers that flag without scores). Categories it does not know are
/// ignored.
#[derive(Clone)]
pub struct OpenAiModerations<S> {
    client: S,
    uri: Uri,
    key: Option<HeaderValue>,
    model: Option<String>,
}

impl<S> fmt::Debug for OpenAiModerations<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiModerations")
            .field("uri", &self.uri)
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .field("model", &self.model)
            .finish()
    }
}

impl<S> OpenAiModerations<S> {
    /// Posts to `uri` (e.g. `https://api.openai.com/v1/moderations`) with `client`.
    pub fn new(client: S, uri: Uri) -> Self {
        Self {
            client,
            uri,
            key: None,
            model: None,
        }
    }

    /// Sends `authorization` (e.g. `Bearer sk-...`), marked sensitive.
    #[must_use]
    pub fn key(mut self, authorization: HeaderValue) -> Self {
        let mut key = authorization;
        key.set_sensitive(true);
        self.key = Some(key);
        self
    }

    /// Asks for `model` (e.g. `omni-moderation-latest`).
    #[must_use]
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }
}

/// Reads a moderation API reply: one [`Scores`] per result.
pub fn read_results(reply: &Value) -> Result<Vec<Scores>, BoxError> {
    let results = reply
        .get("results")
        .and_then(Value::as_array)
        .ok_or("no results in the moderation reply")?;
    Ok(results
        .iter()
        .map(|result| {
            let mut scores = Scores::zero();
            let named = |field: &str| {
                result
                    .get(field)
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                    .filter_map(|(name, v)| Some((name.parse::<Category>().ok()?, v)))
            };
            for (category, score) in named("category_scores") {
                #[allow(clippy::cast_possible_truncation)]
                scores.raise(category, score.as_f64().unwrap_or(0.0) as f32);
            }
            for (category, flagged) in named("categories") {
                if flagged.as_bool() == Some(true) && scores.get(category) == 0.0 {
                    scores.raise(category, 1.0);
                }
            }
            scores
        })
        .collect())
}

impl<S, B> Service<Vec<String>> for OpenAiModerations<S>
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Vec<Scores>;
    type Error = BoxError;
    type Future = ModerateFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.client.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, texts: Vec<String>) -> ModerateFuture {
        let clone = self.client.clone();
        let mut client = std::mem::replace(&mut self.client, clone);
        let mut request =
            Request::post(self.uri.clone()).header(http::header::CONTENT_TYPE, "application/json");
        if let Some(key) = &self.key {
            request = request.header(http::header::AUTHORIZATION, key.clone());
        }
        let count = texts.len();
        let body = match &self.model {
            Some(model) => json!({"model": model, "input": texts}),
            None => json!({"input": texts}),
        };
        let request = request.body(Full::new(Bytes::from(body.to_string())));
        Box::pin(async move {
            let response = client.call(request?).await.map_err(Into::into)?;
            let status = response.status();
            let bytes = Limited::new(response.into_body(), MAX_REPLY_BYTES)
                .collect()
                .await?
                .to_bytes();
            if !status.is_success() {
                return Err(format!("the moderator answered {status}").into());
            }
            let results = read_results(&serde_json::from_slice(&bytes)?)?;
            if results.len() != count {
                return Err(format!("{} results for {count} inputs", results.len()).into());
            }
            Ok(results)
        })
    }
}

/// A moderator with its latency budget, failure policy and verdict cache, for
/// [`ModerateLayer::with_external`](crate::ModerateLayer::with_external).
#[derive(Clone)]
pub struct External {
    moderator: Arc<dyn Moderator>,
    pub(crate) budget: Duration,
    pub(crate) on_error: OnError,
    cache: Arc<quick_cache::sync::Cache<(u64, usize), Scores>>,
    hasher: std::collections::hash_map::RandomState,
}

impl fmt::Debug for External {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("External")
            .field("moderator", &self.moderator)
            .field("budget", &self.budget)
            .field("on_error", &self.on_error)
            .field("cached", &self.cache.len())
            .finish()
    }
}

impl External {
    /// Asks `moderator`, waiting at most 1 s, failing open, remembering 10,000 verdicts.
    pub fn new(moderator: impl Moderator) -> Self {
        Self {
            moderator: Arc::new(moderator),
            budget: Duration::from_secs(1),
            on_error: OnError::Open,
            cache: Arc::new(quick_cache::sync::Cache::new(CACHE_ENTRIES)),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// The longest wait for a verdict.
    #[must_use]
    pub fn budget(mut self, budget: Duration) -> Self {
        self.budget = budget;
        self
    }

    /// What a failure or a late verdict means.
    #[must_use]
    pub fn on_error(mut self, on_error: OnError) -> Self {
        self.on_error = on_error;
        self
    }

    fn key(&self, text: &str) -> (u64, usize) {
        (self.hasher.hash_one(text), text.len())
    }

    /// The highest scores over `texts` (sent in windows of [`WINDOW_CHARS`], each asked about
    /// once while it is cached), or why there are none.
    pub async fn check(&self, texts: &[String]) -> Result<Scores, String> {
        let mut scores = Scores::zero();
        let mut ask = Vec::new();
        for window in texts.iter().flat_map(|t| windows(t)) {
            match self.cache.get(&self.key(window)) {
                Some(cached) => scores.merge(&cached),
                None => ask.push(window.to_owned()),
            }
        }
        ask.sort_unstable();
        ask.dedup();
        if ask.is_empty() {
            return Ok(scores);
        }
        let asked = ask.clone();
        let verdicts = match tokio::time::timeout(self.budget, self.moderator.moderate(ask)).await {
            Ok(Ok(verdicts)) => verdicts,
            Ok(Err(e)) => return Err(format!("the moderator failed: {e}")),
            Err(_) => {
                return Err(format!(
                    "the moderator gave no verdict within {:?}",
                    self.budget
                ))
            }
        };
        for (text, verdict) in asked.iter().zip(&verdicts) {
            self.cache.insert(self.key(text), *verdict);
            scores.merge(verdict);
        }
        Ok(scores)
    }
}

/// `text` in windows of at most [`WINDOW_CHARS`] characters, cut after whitespace where one is
/// near.
fn windows(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let cut = match rest.char_indices().nth(WINDOW_CHARS) {
            None => rest.len(),
            Some((at, _)) => rest[..at]
                .rfind(char::is_whitespace)
                .filter(|&w| w > at / 2)
                .map_or(at, |w| w + 1),
        };
        let (window, tail) = rest.split_at(cut);
        rest = tail;
        Some(window)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_read_leniently() {
        let reply = json!({"results": [
            {"flagged": true, "categories": {"hate": true, "violence": false, "new-thing": true},
             "category_scores": {"hate": 0.91, "violence": 0.02}},
            {"flagged": true, "categories": {"self-harm/intent": true}}
        ]});
        let results = read_results(&reply).unwrap();
        assert!((results[0].get(Category::Hate) - 0.91).abs() < 1e-6);
        assert_eq!(results[1].get(Category::SelfHarmIntent), 1.0);
        assert!(read_results(&json!({"error": "x"})).is_err());
    }

    #[test]
    fn long_texts_go_in_windows() {
        let text = "word ".repeat(2000);
        let parts: Vec<&str> = windows(&text).collect();
        assert_eq!(parts.concat(), text);
        assert!(parts.iter().all(|p| p.chars().count() <= WINDOW_CHARS));
        assert!(parts[0].ends_with(' '));
        assert_eq!(windows("").count(), 0);
    }
}
