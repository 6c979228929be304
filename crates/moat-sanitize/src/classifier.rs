//! An external classifier, asked after the local screening: a service that judges the user's
//! prompt and the documents of a request, such as Azure AI Content Safety's Prompt Shields, or
//! your own model server. It runs under a latency budget; when it fails or is late, the request
//! is let through (fail open) or refused with 503 (fail closed), as configured.
//!
//! [`PromptShields`] speaks Prompt Shields' API over any tower HTTP client (a hyper-util
//! `Client`, or a client already wrapped in a rate limit or a circuit breaker): no model is
//! downloaded, no HTTP stack is bundled.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, Uri};
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};
use serde_json::{json, Value};
use tower_service::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What an external classifier is asked: the user's prompt and the documents (tool results and
/// retrieved text), each cut to [`MAX_CHARS`] characters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShieldInput {
    /// The user's text, joined by newlines.
    pub user_prompt: String,
    /// Each document.
    pub documents: Vec<String>,
}

/// The most characters of one text sent to a classifier (Prompt Shields' own limit is 10,000
/// for the prompt).
pub const MAX_CHARS: usize = 10_000;

/// What an external classifier found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShieldVerdict {
    /// An attack in the user's prompt.
    pub user_prompt: bool,
    /// Per document, in the order sent: an attack in it.
    pub documents: Vec<bool>,
}

impl ShieldVerdict {
    /// A verdict.
    pub fn new(user_prompt: bool, documents: Vec<bool>) -> Self {
        Self {
            user_prompt,
            documents,
        }
    }
}

/// The future a [`Classifier`] returns.
pub type ClassifyFuture = Pin<Box<dyn Future<Output = Result<ShieldVerdict, BoxError>> + Send>>;

/// A service that judges prompts and documents.
pub trait Classifier: fmt::Debug + Send + Sync + 'static {
    /// Judges `input`.
    fn classify(&self, input: ShieldInput) -> ClassifyFuture;
}

pub use moat_core::kit::OnError;

/// A classifier with its latency budget and failure policy, for
/// [`SanitizeLayer::with_classifier`](crate::SanitizeLayer::with_classifier).
#[derive(Debug, Clone)]
pub struct External {
    pub(crate) classifier: Arc<dyn Classifier>,
    pub(crate) budget: Duration,
    pub(crate) on_error: OnError,
}

impl External {
    /// Asks `classifier`, waiting at most 500 ms, failing open.
    pub fn new(classifier: impl Classifier) -> Self {
        Self {
            classifier: Arc::new(classifier),
            budget: Duration::from_millis(500),
            on_error: OnError::Open,
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

    /// The verdict, or why there is none.
    pub(crate) async fn ask(&self, input: ShieldInput) -> Result<ShieldVerdict, String> {
        match tokio::time::timeout(self.budget, self.classifier.classify(input)).await {
            Ok(Ok(verdict)) => Ok(verdict),
            Ok(Err(e)) => Err(format!("the classifier failed: {e}")),
            Err(_) => Err(format!(
                "the classifier gave no verdict within {:?}",
                self.budget
            )),
        }
    }
}

/// Azure AI Content Safety's Prompt Shields (`POST .../contentsafety/text:shieldPrompt`), or any
/// service that answers its shape, over the HTTP client `S`.
///
/// Sends `{"userPrompt": ..., "documents": [...]}`; reads
/// `{"userPromptAnalysis": {"attackDetected": bool}, "documentsAnalysis": [{"attackDetected": bool}]}`.
#[derive(Clone)]
pub struct PromptShields<S> {
    client: S,
    uri: Uri,
    key: Option<HeaderValue>,
}

impl<S> fmt::Debug for PromptShields<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PromptShields")
            .field("uri", &self.uri)
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The header Azure reads the resource key from.
static SUBSCRIPTION_KEY: HeaderName = HeaderName::from_static("ocp-apim-subscription-key");

/// The largest classifier reply read.
const MAX_REPLY_BYTES: usize = 64 * 1024;

impl<S> PromptShields<S> {
    /// Posts to `uri` (the full URL, `api-version` included) with `client`.
    pub fn new(client: S, uri: Uri) -> Self {
        Self {
            client,
            uri,
            key: None,
        }
    }

    /// Sends `key` in `Ocp-Apim-Subscription-Key`.
    #[must_use]
    pub fn key(mut self, key: HeaderValue) -> Self {
        let mut key = key;
        key.set_sensitive(true);
        self.key = Some(key);
        self
    }
}

impl<S, B> Classifier for PromptShields<S>
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    fn classify(&self, input: ShieldInput) -> ClassifyFuture {
        let mut client = self.client.clone();
        let mut request =
            Request::post(self.uri.clone()).header(http::header::CONTENT_TYPE, "application/json");
        if let Some(key) = &self.key {
            request = request.header(&SUBSCRIPTION_KEY, key.clone());
        }
        let body = json!({"userPrompt": input.user_prompt, "documents": input.documents});
        let request = request.body(Full::new(Bytes::from(body.to_string())));
        Box::pin(async move {
            let request = request?;
            std::future::poll_fn(|cx| client.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            let response = client.call(request).await.map_err(Into::into)?;
            let status = response.status();
            let bytes = Limited::new(response.into_body(), MAX_REPLY_BYTES)
                .collect()
                .await?
                .to_bytes();
            if !status.is_success() {
                return Err(format!("status {status}").into());
            }
            let reply: Value = serde_json::from_slice(&bytes)?;
            let attack = |v: &Value| v.get("attackDetected").and_then(Value::as_bool);
            let user_prompt = reply
                .get("userPromptAnalysis")
                .map_or(Some(false), attack)
                .ok_or("no userPromptAnalysis.attackDetected in the reply")?;
            let documents = reply
                .get("documentsAnalysis")
                .and_then(Value::as_array)
                .map(|docs| docs.iter().map(|d| attack(d).unwrap_or(false)).collect())
                .unwrap_or_default();
            Ok(ShieldVerdict {
                user_prompt,
                documents,
            })
        })
    }
}

/// `text`, cut to [`MAX_CHARS`] characters.
pub(crate) fn capped(text: &str) -> &str {
    text.char_indices()
        .nth(MAX_CHARS)
        .map_or(text, |(at, _)| &text[..at])
}
