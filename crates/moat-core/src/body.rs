//! Request and response bodies as layers hand them on.
//!
//! - [`buffer`] reads a request body under a byte cap: past it, a 413 [`Rejection`]; a body that
//!   fails to arrive, a 400.
//! - [`parse_json`] turns bytes into JSON, with 400 and a message naming line and column for
//!   malformed JSON, invalid UTF-8 and nesting deeper than the parser's recursion limit (128).
//! - [`RequestBody`] is what a layer that may have read or rewritten the body passes inward: the
//!   untouched original, bytes it buffered, or a parsed LLM request that is serialized when the
//!   inner service reads it (so every later edit is included). Trailers are kept.
//! - [`ResponseBody`] is either the inner service's body or a full body of the layer's own, such as
//!   a rejection.
//!
//! ```
//! use bytes::Bytes;
//! use moat_core::body::{buffer, parse_json};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let body = http_body_util::Full::new(Bytes::from_static(b"{\"model\":\"gpt-4o\"}"));
//! let buffered = buffer(body, 1024).await.unwrap();
//! let json = parse_json(&buffered.data).unwrap();
//! assert_eq!(json["model"], "gpt-4o");
//!
//! let too_big = http_body_util::Full::new(Bytes::from(vec![b' '; 2048]));
//! assert_eq!(buffer(too_big, 1024).await.unwrap_err().status(), 413);
//! # }
//! ```

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;

use crate::llm::LlmRequest;
use crate::reject::Rejection;

/// The default cap on a buffered request body: 4 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 4 * 1024 * 1024;

/// A request body read whole.
#[derive(Debug, Clone, Default)]
pub struct Buffered {
    /// The bytes.
    pub data: Bytes,
    /// The trailers, if the body had any.
    pub trailers: Option<HeaderMap>,
}

/// Reads `body` whole, refusing more than `limit` bytes with 413.
pub async fn buffer<B>(body: B, limit: usize) -> Result<Buffered, Rejection>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let too_large = || {
        Rejection::payload_too_large(format!(
            "request body is larger than the limit of {limit} bytes"
        ))
    };
    // A declared length over the cap is refused before reading anything.
    if body.size_hint().lower() > limit as u64 {
        return Err(too_large());
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => {
            let trailers = collected.trailers().cloned();
            Ok(Buffered {
                data: collected.to_bytes(),
                trailers,
            })
        }
        Err(err) if err.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(err) => Err(Rejection::bad_request(format!(
            "failed to read the request body: {err}"
        ))),
    }
}

/// Parses JSON, mapping every failure to a 400 that says what and where.
pub fn parse_json(bytes: &[u8]) -> Result<serde_json::Value, Rejection> {
    serde_json::from_slice(bytes).map_err(|err| {
        let what = if err.to_string().starts_with("recursion limit exceeded") {
            "request body is nested too deeply"
        } else {
            "request body is not valid JSON"
        };
        Rejection::bad_request(format!("{what}: {err}"))
    })
}

/// A parsed LLM request shared by every layer handling one request.
///
/// The first content layer that reads the body stores one in the request extensions and hands on
/// a [`RequestBody::Llm`] built from it; later layers find it there and edit it instead of
/// reading the body again. The body is serialized when the inner service first polls it.
#[derive(Debug, Clone)]
pub struct SharedLlmRequest(Arc<Mutex<LlmRequest>>);

impl SharedLlmRequest {
    /// Wraps a parsed request.
    pub fn new(request: LlmRequest) -> Self {
        Self(Arc::new(Mutex::new(request)))
    }

    /// Runs `f` with the request. Keep `f` short: do not await inside.
    pub fn with<R>(&self, f: impl FnOnce(&mut LlmRequest) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn to_bytes(&self) -> Bytes {
        self.with(|request| request.to_bytes())
    }
}

/// What [`read_llm_request`] found.
#[derive(Debug)]
pub enum LlmBody<B> {
    /// A JSON body, parsed (or parsed earlier by an outer layer) and shared.
    Parsed {
        /// The request to hand on; its body serializes the shared request.
        request: http::Request<RequestBody<B>>,
        /// The shared parsed request, also in the request extensions.
        llm: SharedLlmRequest,
    },
    /// Not an LLM request body: a method without one (`GET`, `HEAD`), a `content-type` that is
    /// not JSON (handed on unread), or an empty body.
    Unparsed(http::Request<RequestBody<B>>),
}

/// Reads and parses an LLM request body once per request.
///
/// If an outer layer already did, returns its [`SharedLlmRequest`] and the body untouched.
/// `GET` and `HEAD` requests, and bodies whose `content-type` is present and not JSON, are left
/// unread. Otherwise the body is buffered under `limit` (413 past it) and, unless empty, parsed
/// (400 when malformed).
pub async fn read_llm_request<B>(
    request: http::Request<B>,
    limit: usize,
) -> Result<LlmBody<B>, Rejection>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if let Some(llm) = request.extensions().get::<SharedLlmRequest>().cloned() {
        let request = request.map(RequestBody::original);
        return Ok(LlmBody::Parsed { request, llm });
    }
    let bodiless = matches!(*request.method(), http::Method::GET | http::Method::HEAD);
    if bodiless || !is_json(request.headers()) {
        return Ok(LlmBody::Unparsed(request.map(RequestBody::original)));
    }
    let (mut parts, body) = request.into_parts();
    let buffered = buffer(body, limit).await?;
    if buffered.data.is_empty() {
        let body = RequestBody::full(buffered.data, buffered.trailers);
        return Ok(LlmBody::Unparsed(http::Request::from_parts(parts, body)));
    }
    let llm = LlmRequest::parse(buffered.data, parts.uri.path())?;
    let llm = SharedLlmRequest::new(llm);
    parts.extensions.insert(llm.clone());
    parts.headers.remove(http::header::CONTENT_LENGTH);
    let body = RequestBody::llm(llm.clone(), buffered.trailers);
    Ok(LlmBody::Parsed {
        request: http::Request::from_parts(parts, body),
        llm,
    })
}

/// Whether a `content-type` is absent or names JSON (`application/json`, `*+json`).
fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(http::header::CONTENT_TYPE) else {
        return true;
    };
    let Ok(ct) = ct.to_str() else { return false };
    let essence = ct.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.len() > 5 && essence[essence.len() - 5..].eq_ignore_ascii_case("+json")
}

pin_project! {
    /// The request body a layer hands on after it may have read or rewritten the original.
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

pin_project! {
    #[project = RequestKindProj]
    enum RequestKind<B> {
        Original { #[pin] body: B },
        Full { data: Option<Bytes>, trailers: Option<HeaderMap> },
        Llm { llm: Option<SharedLlmRequest>, trailers: Option<HeaderMap> },
    }
}

impl<B> RequestBody<B> {
    /// The original body, untouched.
    pub fn original(body: B) -> Self {
        Self {
            kind: RequestKind::Original { body },
        }
    }

    /// Bytes the layer buffered or produced, with the original trailers.
    pub fn full(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        let data = (!data.is_empty()).then_some(data);
        Self {
            kind: RequestKind::Full { data, trailers },
        }
    }

    /// A parsed LLM request, serialized when first polled.
    pub fn llm(llm: SharedLlmRequest, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: RequestKind::Llm {
                llm: Some(llm),
                trailers,
            },
        }
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            RequestKind::Original { body } => f.debug_tuple("Original").field(body).finish(),
            RequestKind::Full { data, .. } => f.debug_tuple("Full").field(data).finish(),
            RequestKind::Llm { .. } => f.write_str("Llm"),
        }
    }
}

fn poll_owned<E>(
    data: &mut Option<Bytes>,
    trailers: &mut Option<HeaderMap>,
) -> Poll<Option<Result<Frame<Bytes>, E>>> {
    if let Some(data) = data.take() {
        return Poll::Ready(Some(Ok(Frame::data(data))));
    }
    Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            RequestKindProj::Original { body } => body.poll_frame(cx),
            RequestKindProj::Full { data, trailers } => poll_owned(data, trailers),
            RequestKindProj::Llm { llm, trailers } => {
                let mut data = llm.take().map(|llm| llm.to_bytes());
                poll_owned(&mut data, trailers)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Original { body } => body.is_end_stream(),
            RequestKind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            RequestKind::Llm { llm, trailers } => llm.is_none() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Original { body } => body.size_hint(),
            RequestKind::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            RequestKind::Llm { llm: Some(_), .. } => SizeHint::default(),
            RequestKind::Llm { llm: None, .. } => SizeHint::with_exact(0),
        }
    }
}

pin_project! {
    /// The response body of a layer: the inner service's, or one the layer made (a rejection).
    pub struct ResponseBody<B> {
        #[pin]
        kind: ResponseKind<B>,
    }
}

pin_project! {
    #[project = ResponseKindProj]
    enum ResponseKind<B> {
        Inner { #[pin] body: B },
        Full { data: Option<Bytes> },
    }
}

impl<B> ResponseBody<B> {
    /// The inner service's body.
    pub fn inner(body: B) -> Self {
        Self {
            kind: ResponseKind::Inner { body },
        }
    }

    /// A body of the layer's own.
    pub fn full(data: Bytes) -> Self {
        let data = (!data.is_empty()).then_some(data);
        Self {
            kind: ResponseKind::Full { data },
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        Self {
            kind: ResponseKind::Full { data: None },
        }
    }
}

impl<B> Default for ResponseBody<B> {
    fn default() -> Self {
        Self::empty()
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            ResponseKind::Inner { body } => f.debug_tuple("Inner").field(body).finish(),
            ResponseKind::Full { data } => f.debug_tuple("Full").field(data).finish(),
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            ResponseKindProj::Inner { body } => body.poll_frame(cx),
            ResponseKindProj::Full { data } => poll_owned(data, &mut None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Inner { body } => body.is_end_stream(),
            ResponseKind::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Inner { body } => body.size_hint(),
            ResponseKind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};

    fn json_request(body: &'static str) -> http::Request<Full<Bytes>> {
        http::Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .header("content-length", body.len())
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    }

    #[tokio::test]
    async fn over_the_cap_is_413_even_when_streamed_without_a_length() {
        let chunks =
            (0..10).map(|_| Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![b'a'; 100]))));
        let body = StreamBody::new(futures_stream(chunks.collect()));
        let err = buffer(body, 999).await.unwrap_err();
        assert_eq!(err.status(), 413);
        assert!(err.message().contains("999"));
    }

    #[tokio::test]
    async fn a_failing_body_is_400() {
        let chunks = vec![
            Ok(Frame::data(Bytes::from_static(b"{"))),
            Err(std::io::Error::other("connection reset")),
        ];
        let err = buffer(StreamBody::new(futures_stream(chunks)), 100)
            .await
            .unwrap_err();
        assert_eq!(err.status(), 400);
        assert!(err.message().contains("connection reset"));
    }

    #[tokio::test]
    async fn trailers_survive_buffering_and_rehanding() {
        let chunks = vec![
            Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::trailers({
                let mut t = HeaderMap::new();
                t.insert("x-checksum", "1".parse().unwrap());
                t
            })),
        ];
        let buffered = buffer(StreamBody::new(futures_stream(chunks)), 100)
            .await
            .unwrap();
        assert_eq!(buffered.data, "abc");
        let body: RequestBody<Full<Bytes>> = RequestBody::full(buffered.data, buffered.trailers);
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["x-checksum"], "1");
        assert_eq!(collected.to_bytes(), "abc");
    }

    #[test]
    fn malformed_and_deep_json_get_clear_400s() {
        let err = parse_json(b"{\"a\": }").unwrap_err();
        assert_eq!(err.status(), 400);
        assert!(
            err.message().starts_with("request body is not valid JSON"),
            "{}",
            err.message()
        );
        assert!(err.message().contains("line 1"));
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        let err = parse_json(deep.as_bytes()).unwrap_err();
        assert!(
            err.message()
                .starts_with("request body is nested too deeply"),
            "{}",
            err.message()
        );
        let err = parse_json(b"\"\xff\xfe\"").unwrap_err();
        assert_eq!(err.status(), 400);
    }

    #[tokio::test]
    async fn llm_request_is_parsed_once_and_edits_reach_the_body() {
        let request =
            json_request(r#"{"model":"m","messages":[{"role":"user","content":"hi there"}]}"#);
        let LlmBody::Parsed { request, llm } = read_llm_request(request, 1024).await.unwrap()
        else {
            panic!("json must parse");
        };
        assert!(request.headers().get("content-length").is_none());
        // An inner layer finds the same parse in the extensions and edits it.
        let LlmBody::Parsed {
            request,
            llm: again,
        } = read_llm_request(request, 1024).await.unwrap()
        else {
            panic!("second read must reuse");
        };
        again.with(|r| r.set_text(0, "HELLO".into()));
        assert_eq!(
            llm.with(|r| r.text(0).map(str::to_owned)).as_deref(),
            Some("HELLO")
        );
        let bytes = request.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["messages"][0]["content"], "HELLO");
    }

    #[tokio::test]
    async fn non_json_bodies_pass_unread() {
        let request = http::Request::builder()
            .header("content-type", "multipart/form-data; boundary=x")
            .body(Full::new(Bytes::from_static(b"--x--")))
            .unwrap();
        let LlmBody::Unparsed(request) = read_llm_request(request, 1).await.unwrap() else {
            panic!("multipart is not json");
        };
        assert_eq!(
            request.into_body().collect().await.unwrap().to_bytes(),
            "--x--"
        );
        let mut h = HeaderMap::new();
        h.insert(
            "content-type",
            "application/vnd.api+json; charset=utf-8".parse().unwrap(),
        );
        assert!(is_json(&h));
    }

    #[tokio::test]
    async fn requests_without_a_body_are_not_parsed() {
        let get = http::Request::get("/v1/models")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert!(matches!(
            read_llm_request(get, 1024).await.unwrap(),
            LlmBody::Unparsed(_)
        ));
        let empty_post = http::Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let LlmBody::Unparsed(request) = read_llm_request(empty_post, 1024).await.unwrap() else {
            panic!("an empty body has nothing to parse");
        };
        assert!(request
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .is_empty());
    }

    #[tokio::test]
    async fn response_body_full_and_inner() {
        let full: ResponseBody<Full<Bytes>> = ResponseBody::full(Bytes::from_static(b"x"));
        assert_eq!(full.size_hint().exact(), Some(1));
        assert_eq!(full.collect().await.unwrap().to_bytes(), "x");
        let inner = ResponseBody::inner(Full::new(Bytes::from_static(b"y")));
        assert_eq!(inner.collect().await.unwrap().to_bytes(), "y");
        assert!(ResponseBody::<Full<Bytes>>::default().is_end_stream());
    }

    fn futures_stream<T>(items: Vec<T>) -> futures_util::stream::Iter<std::vec::IntoIter<T>> {
        futures_util::stream::iter(items)
    }
}
