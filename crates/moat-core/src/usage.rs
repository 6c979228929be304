//! Token usage: its shapes, and a response body that reports it exactly once.
//!
//! [`Usage::find`] reads `usage` in every shape a provider sends: OpenAI chat and completions
//! (`prompt_tokens`, `completion_tokens`, cached and reasoning details), the Responses API
//! (`input_tokens`, `output_tokens`, `response.usage` in `response.completed`), and Anthropic
//! (`message.usage` in `message_start`, cumulative `usage` in `message_delta`, cache reads and
//! writes). [`Usage::input_tokens`] always counts every prompt token, cached or not.
//!
//! [`UsageBody`] wraps a JSON or SSE response body, passes every byte through untouched, and calls
//! its [`OnUsage`] exactly once: when the body ends, when it fails, or when it is dropped early (a
//! client that went away), then as [`BodyOutcome::Interrupted`] with what was streamed so far.
//! Quotas and token rate limits settle through it.
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use moat_core::usage::{BodyOutcome, UsageBody, UsageReport};
//! use std::sync::{Arc, Mutex};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let seen = Arc::new(Mutex::new(None));
//! let sink = seen.clone();
//! let json = r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}"#;
//! let body = UsageBody::json(Full::new(Bytes::from(json)), move |report: UsageReport| {
//!     *sink.lock().unwrap() = Some(report);
//! });
//! body.collect().await.unwrap();
//! let report = seen.lock().unwrap().take().unwrap();
//! assert_eq!(report.outcome, BodyOutcome::Completed);
//! assert_eq!(report.usage.unwrap().output_tokens, 5);
//! # }
//! ```

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::sse::{text_deltas, SseDecoder, SseEvent};

/// Token counts of one response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Usage {
    /// Every prompt token, including those read from or written to a cache.
    pub input_tokens: u64,
    /// Generated tokens, reasoning included.
    pub output_tokens: u64,
    /// Input plus output, as the provider reported it (or computed when it did not).
    pub total_tokens: u64,
    /// Prompt tokens served from the provider's cache.
    pub cached_input_tokens: u64,
    /// Prompt tokens written to the provider's cache (Anthropic).
    pub cache_creation_input_tokens: u64,
    /// Output tokens spent on reasoning.
    pub reasoning_tokens: u64,
}

fn count(value: &Value, pointer: &str) -> Option<u64> {
    value.pointer(pointer).and_then(Value::as_u64)
}

impl Usage {
    /// Usage with just input and output counts.
    pub fn new(input_tokens: u64, output_tokens: u64) -> Self {
        Self {
            input_tokens,
            output_tokens,
            total_tokens: input_tokens + output_tokens,
            ..Self::default()
        }
    }

    /// Reads a `usage` object in any provider's shape; `None` if it has no known count.
    pub fn from_object(usage: &Value) -> Option<Self> {
        if !usage.is_object() {
            return None;
        }
        // OpenAI chat and completions.
        if let Some(prompt) = count(usage, "/prompt_tokens") {
            let output = count(usage, "/completion_tokens").unwrap_or(0);
            return Some(Self {
                input_tokens: prompt,
                output_tokens: output,
                total_tokens: count(usage, "/total_tokens").unwrap_or(prompt + output),
                cached_input_tokens: count(usage, "/prompt_tokens_details/cached_tokens")
                    .unwrap_or(0),
                cache_creation_input_tokens: 0,
                reasoning_tokens: count(usage, "/completion_tokens_details/reasoning_tokens")
                    .unwrap_or(0),
            });
        }
        let input = count(usage, "/input_tokens");
        let output = count(usage, "/output_tokens");
        if input.is_none() && output.is_none() {
            return None;
        }
        let (input, output) = (input.unwrap_or(0), output.unwrap_or(0));
        // Anthropic counts cache reads and writes apart from `input_tokens`.
        let cache_read = count(usage, "/cache_read_input_tokens");
        let cache_write = count(usage, "/cache_creation_input_tokens").unwrap_or(0);
        if cache_read.is_some() || usage.get("cache_creation_input_tokens").is_some() {
            let cache_read = cache_read.unwrap_or(0);
            let input = input + cache_read + cache_write;
            return Some(Self {
                input_tokens: input,
                output_tokens: output,
                total_tokens: input + output,
                cached_input_tokens: cache_read,
                cache_creation_input_tokens: cache_write,
                reasoning_tokens: 0,
            });
        }
        // Responses API (and Anthropic without cache fields).
        Some(Self {
            input_tokens: input,
            output_tokens: output,
            total_tokens: count(usage, "/total_tokens").unwrap_or(input + output),
            cached_input_tokens: count(usage, "/input_tokens_details/cached_tokens").unwrap_or(0),
            cache_creation_input_tokens: 0,
            reasoning_tokens: count(usage, "/output_tokens_details/reasoning_tokens").unwrap_or(0),
        })
    }

    /// Finds usage in a response body or streamed event: `usage`, `response.usage`
    /// (Responses events) or `message.usage` (Anthropic `message_start`).
    pub fn find(document: &Value) -> Option<Self> {
        ["usage", "response", "message"].iter().find_map(|key| {
            let value = document.get(*key)?;
            if *key == "usage" {
                Self::from_object(value)
            } else {
                Self::from_object(value.get("usage")?)
            }
        })
    }

    /// Folds a later report of the same response in: streams report counts cumulatively, so each
    /// field keeps its largest value.
    pub fn merge(&mut self, later: &Usage) {
        self.input_tokens = self.input_tokens.max(later.input_tokens);
        self.output_tokens = self.output_tokens.max(later.output_tokens);
        self.cached_input_tokens = self.cached_input_tokens.max(later.cached_input_tokens);
        self.cache_creation_input_tokens = self
            .cache_creation_input_tokens
            .max(later.cache_creation_input_tokens);
        self.reasoning_tokens = self.reasoning_tokens.max(later.reasoning_tokens);
        self.total_tokens = later
            .total_tokens
            .max(self.total_tokens)
            .max(self.input_tokens + self.output_tokens);
    }
}

/// How a watched body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BodyOutcome {
    /// Read to the end.
    Completed,
    /// The inner body failed.
    Errored,
    /// Dropped before its end, e.g. the client disconnected.
    Interrupted,
}

/// What a [`UsageBody`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UsageReport {
    /// The usage the provider reported, if it did.
    pub usage: Option<Usage>,
    /// How the body ended.
    pub outcome: BodyOutcome,
    /// Bytes of generated text streamed so far (SSE only): the basis for charging a stream that
    /// was cut short before its usage arrived.
    pub streamed_text_bytes: u64,
    /// Body bytes passed through.
    pub body_bytes: u64,
}

/// Receives a [`UsageReport`], exactly once. Closures implement it.
pub trait OnUsage: Send + 'static {
    /// Called once, at the body's end, failure or drop.
    fn on_usage(self, report: UsageReport);
}

impl<F> OnUsage for F
where
    F: FnOnce(UsageReport) + Send + 'static,
{
    fn on_usage(self, report: UsageReport) {
        self(report)
    }
}

/// How to read a response body for usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// One JSON document.
    Json,
    /// A `text/event-stream`.
    Sse,
    /// Anything else: nothing to read, but the outcome is still reported.
    Other,
}

impl BodyFormat {
    /// The format named by a response's `content-type`.
    pub fn of(headers: &HeaderMap) -> Self {
        let ct = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if ct.starts_with("text/event-stream") {
            Self::Sse
        } else if ct.starts_with("application/json") || ct.contains("+json") {
            Self::Json
        } else {
            Self::Other
        }
    }
}

/// The cap on a JSON response kept for reading its usage: 8 MiB. Larger bodies pass through
/// untouched and report no usage.
pub const MAX_JSON_BYTES: usize = 8 * 1024 * 1024;

enum Reader {
    Json { buf: Vec<u8>, overflow: bool },
    Sse(Box<SseDecoder>),
    Other,
}

struct Watch<R: OnUsage> {
    reader: Reader,
    usage: Option<Usage>,
    streamed_text_bytes: u64,
    body_bytes: u64,
    on_usage: Option<R>,
}

impl<R: OnUsage> Watch<R> {
    fn data(&mut self, data: &[u8]) {
        self.body_bytes += data.len() as u64;
        match &mut self.reader {
            Reader::Json { buf, overflow } => {
                if *overflow || buf.len() + data.len() > MAX_JSON_BYTES {
                    *overflow = true;
                    buf.clear();
                } else {
                    buf.extend_from_slice(data);
                }
            }
            Reader::Sse(decoder) => match decoder.decode(data) {
                Ok(events) => events.iter().for_each(|e| self.event(e)),
                // An oversized event: stop reading, keep passing bytes through.
                Err(_) => self.reader = Reader::Other,
            },
            Reader::Other => {}
        }
    }

    fn event(&mut self, event: &SseEvent) {
        if event.is_done() {
            return;
        }
        let Some(json) = event.json() else { return };
        if let Some(found) = Usage::find(&json) {
            self.usage.get_or_insert_with(Usage::default).merge(&found);
        }
        self.streamed_text_bytes += text_deltas(&json)
            .iter()
            .map(|d| d.text.len() as u64)
            .sum::<u64>();
    }

    fn finish(&mut self, outcome: BodyOutcome) {
        let Some(on_usage) = self.on_usage.take() else {
            return;
        };
        match std::mem::replace(&mut self.reader, Reader::Other) {
            Reader::Json {
                buf,
                overflow: false,
            } if outcome == BodyOutcome::Completed => {
                self.usage = serde_json::from_slice::<Value>(&buf)
                    .ok()
                    .and_then(|v| Usage::find(&v));
            }
            Reader::Sse(mut decoder) => {
                for event in decoder.finish() {
                    self.event(&event);
                }
            }
            _ => {}
        }
        on_usage.on_usage(UsageReport {
            usage: self.usage,
            outcome,
            streamed_text_bytes: self.streamed_text_bytes,
            body_bytes: self.body_bytes,
        });
    }
}

impl<R: OnUsage> Drop for Watch<R> {
    fn drop(&mut self) {
        self.finish(BodyOutcome::Interrupted);
    }
}

pin_project! {
    /// A response body that reports its usage once; see the [module docs](self).
    pub struct UsageBody<B, R: OnUsage> {
        #[pin]
        inner: B,
        watch: Watch<R>,
    }
}

impl<B, R: OnUsage> UsageBody<B, R> {
    /// Watches `inner`, read as `format`.
    pub fn new(inner: B, format: BodyFormat, on_usage: R) -> Self
    where
        B: Body,
    {
        let reader = match format {
            BodyFormat::Json => Reader::Json {
                buf: Vec::new(),
                overflow: false,
            },
            BodyFormat::Sse => Reader::Sse(Box::default()),
            BodyFormat::Other => Reader::Other,
        };
        let mut watch = Watch {
            reader,
            usage: None,
            streamed_text_bytes: 0,
            body_bytes: 0,
            on_usage: Some(on_usage),
        };
        // An empty body is never polled: it is complete already.
        if inner.is_end_stream() {
            watch.finish(BodyOutcome::Completed);
        }
        Self { inner, watch }
    }

    /// Watches a JSON body.
    pub fn json(inner: B, on_usage: R) -> Self
    where
        B: Body,
    {
        Self::new(inner, BodyFormat::Json, on_usage)
    }

    /// Watches an SSE body.
    pub fn sse(inner: B, on_usage: R) -> Self
    where
        B: Body,
    {
        Self::new(inner, BodyFormat::Sse, on_usage)
    }

    /// Watches a response's body, read as its `content-type` says.
    pub fn wrap_response(response: http::Response<B>, on_usage: R) -> http::Response<Self>
    where
        B: Body,
    {
        let format = BodyFormat::of(response.headers());
        response.map(|body| Self::new(body, format, on_usage))
    }
}

impl<B: std::fmt::Debug, R: OnUsage> std::fmt::Debug for UsageBody<B, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageBody")
            .field("inner", &self.inner)
            .field("usage", &self.watch.usage)
            .finish()
    }
}

impl<B, R> Body for UsageBody<B, R>
where
    B: Body<Data = Bytes>,
    R: OnUsage,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let polled = std::task::ready!(this.inner.as_mut().poll_frame(cx));
        match &polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.watch.data(data);
                }
                // Servers stop polling once a body says it has ended, so finish here.
                if this.inner.is_end_stream() {
                    this.watch.finish(BodyOutcome::Completed);
                }
            }
            Some(Err(_)) => this.watch.finish(BodyOutcome::Errored),
            None => this.watch.finish(BodyOutcome::Completed),
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};
    use serde_json::json;
    use std::sync::{Arc, Mutex};

    type Reports = Arc<Mutex<Vec<UsageReport>>>;

    fn sink() -> (Reports, impl OnUsage + Clone) {
        let reports: Reports = Arc::default();
        let r = reports.clone();
        (reports, move |report| r.lock().unwrap().push(report))
    }

    #[test]
    fn every_usage_shape() {
        let chat = json!({"usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
            "prompt_tokens_details": {"cached_tokens": 64}, "completion_tokens_details": {"reasoning_tokens": 8}}});
        assert_eq!(
            Usage::find(&chat),
            Some(Usage {
                input_tokens: 100,
                output_tokens: 20,
                total_tokens: 120,
                cached_input_tokens: 64,
                cache_creation_input_tokens: 0,
                reasoning_tokens: 8
            })
        );
        let responses = json!({"type": "response.completed", "response": {"usage": {"input_tokens": 10, "output_tokens": 4,
            "total_tokens": 14, "input_tokens_details": {"cached_tokens": 2}, "output_tokens_details": {"reasoning_tokens": 1}}}});
        assert_eq!(
            Usage::find(&responses),
            Some(Usage {
                input_tokens: 10,
                output_tokens: 4,
                total_tokens: 14,
                cached_input_tokens: 2,
                cache_creation_input_tokens: 0,
                reasoning_tokens: 1
            })
        );
        let anthropic = json!({"usage": {"input_tokens": 5, "output_tokens": 7, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20}});
        assert_eq!(
            Usage::find(&anthropic),
            Some(Usage {
                input_tokens: 125,
                output_tokens: 7,
                total_tokens: 132,
                cached_input_tokens: 100,
                cache_creation_input_tokens: 20,
                reasoning_tokens: 0
            })
        );
        let start = json!({"type": "message_start", "message": {"usage": {"input_tokens": 9, "output_tokens": 1}}});
        assert_eq!(Usage::find(&start).unwrap().input_tokens, 9);
        assert_eq!(Usage::find(&json!({"usage": null})), None);
        assert_eq!(Usage::find(&json!({"usage": {"foo": 1}})), None);
    }

    #[test]
    fn merge_keeps_cumulative_maxima() {
        let mut u = Usage::new(25, 1);
        u.merge(&Usage::new(0, 15));
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.total_tokens),
            (25, 15, 40)
        );
    }

    type Chunks = StreamBody<
        futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>,
    >;

    fn chunked(chunks: Vec<&'static str>) -> Chunks {
        StreamBody::new(futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
                .collect::<Vec<_>>(),
        ))
    }

    const OPENAI_STREAM: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}],\"usage\":null}\n\n\
data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" world\"}}],\"usage\":null}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n\
data: [DONE]\n\n";

    #[tokio::test]
    async fn streamed_usage_is_reported_once_at_the_end_for_any_split() {
        for cut in 0..OPENAI_STREAM.len() {
            let (reports, on_usage) = sink();
            let body = UsageBody::sse(
                chunked(vec![&OPENAI_STREAM[..cut], &OPENAI_STREAM[cut..]]),
                on_usage,
            );
            let bytes = body.collect().await.unwrap().to_bytes();
            assert_eq!(
                bytes,
                OPENAI_STREAM.as_bytes(),
                "bytes pass through untouched"
            );
            let reports = reports.lock().unwrap();
            assert_eq!(reports.len(), 1);
            assert_eq!(reports[0].outcome, BodyOutcome::Completed);
            assert_eq!(reports[0].usage, Some(Usage::new(3, 2)));
            assert_eq!(reports[0].streamed_text_bytes, 11);
        }
    }

    #[tokio::test]
    async fn anthropic_stream_merges_start_and_delta_usage() {
        let stream = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n";
        let (reports, on_usage) = sink();
        UsageBody::sse(chunked(vec![stream]), on_usage)
            .collect()
            .await
            .unwrap();
        let report = reports.lock().unwrap()[0].clone();
        assert_eq!(
            report.usage.map(|u| (u.input_tokens, u.output_tokens)),
            Some((25, 15))
        );
        assert_eq!(report.streamed_text_bytes, 2);
    }

    #[tokio::test]
    async fn dropped_mid_stream_reports_interrupted_with_partial_text() {
        let (reports, on_usage) = sink();
        let mut body = UsageBody::sse(
            chunked(vec![&OPENAI_STREAM[..80], &OPENAI_STREAM[80..]]),
            on_usage,
        );
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.is_data());
        drop(body);
        let reports = reports.lock().unwrap();
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].outcome, BodyOutcome::Interrupted);
        assert_eq!(reports[0].usage, None);
        assert_eq!(reports[0].streamed_text_bytes, 5);
    }

    #[tokio::test]
    async fn body_error_reports_errored_once() {
        let (reports, on_usage) = sink();
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(
                b"data: {\"choices\":[{\"delta\":{\"content\":\"abc\"}}]}\n\n",
            ))),
            Err(std::io::Error::other("reset")),
        ];
        let body = UsageBody::sse(
            StreamBody::new(futures_util::stream::iter(frames)),
            on_usage,
        );
        assert!(body.collect().await.is_err());
        let reports = reports.lock().unwrap();
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].outcome, BodyOutcome::Errored);
        assert_eq!(reports[0].streamed_text_bytes, 3);
    }

    #[tokio::test]
    async fn json_body_that_ends_with_its_last_frame_is_completed_not_interrupted() {
        // `Full` says it has ended right after its one frame; servers then stop polling and drop.
        let (reports, on_usage) = sink();
        let json = r#"{"usage":{"input_tokens":1,"output_tokens":2}}"#;
        let mut body = UsageBody::json(Full::new(Bytes::from(json)), on_usage);
        let _ = body.frame().await;
        drop(body);
        let r = reports.lock().unwrap();
        assert_eq!((r.len(), r[0].outcome), (1, BodyOutcome::Completed));
        assert_eq!(r[0].usage, Some(Usage::new(1, 2)));
    }

    #[tokio::test]
    async fn empty_and_unknown_bodies_still_report() {
        let (reports, on_usage) = sink();
        drop(UsageBody::json(Full::new(Bytes::new()), on_usage.clone()));
        let response = http::Response::builder()
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap();
        let wrapped = UsageBody::wrap_response(response, on_usage);
        wrapped.into_body().collect().await.unwrap();
        let r = reports.lock().unwrap();
        assert_eq!(r.len(), 2);
        assert!(r
            .iter()
            .all(|r| r.outcome == BodyOutcome::Completed && r.usage.is_none()));
    }

    #[test]
    fn body_format_from_content_type() {
        let mut h = HeaderMap::new();
        h.insert(
            "content-type",
            "text/event-stream; charset=utf-8".parse().unwrap(),
        );
        assert_eq!(BodyFormat::of(&h), BodyFormat::Sse);
        h.insert("content-type", "application/json".parse().unwrap());
        assert_eq!(BodyFormat::of(&h), BodyFormat::Json);
        assert_eq!(BodyFormat::of(&HeaderMap::new()), BodyFormat::Other);
    }
}
