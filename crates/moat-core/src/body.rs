//! Request and response bodies as layers hand them on.
//!
//! - [`buffer`] reads a request body under a byte cap: past it, [`BodyError::TooLarge`]; a body
//!   that stops arriving in time (an `io::Error` of kind `TimedOut` from a server's read
//!   deadline), [`BodyError::TimedOut`]; a body that fails, [`BodyError::Failed`]. Each turns into
//!   a [`Rejection`](crate::Rejection) of the right status (413, 408, 400).
//! - [`RequestBody`] is what a layer that may have read or rewritten the body passes inward: the
//!   untouched original, bytes it buffered, or bytes made when the inner service first polls it
//!   (a parsed request serialized then, so every later edit is included). Trailers are kept.
//! - [`ResponseBody`] is either the inner service's body or a full body of the layer's own, such as
//!   a rejection.
//!
//! ```
//! use bytes::Bytes;
//! use moat_core::body::{buffer, BodyError};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let body = http_body_util::Full::new(Bytes::from_static(b"{\"model\":\"gpt-4o\"}"));
//! let buffered = buffer(body, 1024).await.unwrap();
//! assert_eq!(buffered.data, "{\"model\":\"gpt-4o\"}");
//!
//! let too_big = http_body_util::Full::new(Bytes::from(vec![b' '; 2048]));
//! assert_eq!(buffer(too_big, 1024).await.unwrap_err(), BodyError::TooLarge { limit: 1024 });
//! # }
//! ```

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;

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

/// Why a request body could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BodyError {
    /// It is larger than the cap (declared or sent).
    TooLarge {
        /// The cap in bytes.
        limit: usize,
    },
    /// It stopped arriving: the server's read deadline passed.
    TimedOut,
    /// It failed, e.g. the client reset the connection or sent a malformed chunk.
    Failed(String),
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge { limit } => {
                write!(f, "request body is larger than the limit of {limit} bytes")
            }
            Self::TimedOut => f.write_str("the request body did not arrive in time"),
            Self::Failed(why) => write!(f, "failed to read the request body: {why}"),
        }
    }
}

impl std::error::Error for BodyError {}

/// Whether an error, or any error it was caused by, is an `io::Error` of kind `TimedOut`.
fn is_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(err) = next {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        next = err.source();
    }
    false
}

/// Reads `body` whole, refusing more than `limit` bytes.
pub async fn buffer<B>(body: B, limit: usize) -> Result<Buffered, BodyError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // A declared length over the cap is refused before reading anything.
    if body.size_hint().lower() > limit as u64 {
        return Err(BodyError::TooLarge { limit });
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => {
            let trailers = collected.trailers().cloned();
            Ok(Buffered {
                data: collected.to_bytes(),
                trailers,
            })
        }
        Err(err) if err.is::<http_body_util::LengthLimitError>() => {
            Err(BodyError::TooLarge { limit })
        }
        Err(err) if is_timeout(&*err) => Err(BodyError::TimedOut),
        Err(err) => Err(BodyError::Failed(err.to_string())),
    }
}

pin_project! {
    /// The request body a layer hands on after it may have read or rewritten the original.
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

type MakeBytes = Box<dyn FnOnce() -> Bytes + Send>;

pin_project! {
    #[project = RequestKindProj]
    enum RequestKind<B> {
        Original { #[pin] body: B },
        Full { data: Option<Bytes>, trailers: Option<HeaderMap> },
        Deferred { make: Option<MakeBytes>, trailers: Option<HeaderMap> },
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

    /// Bytes made by `make` when the body is first polled (a parsed request is serialized then,
    /// with every edit made before), with the original trailers.
    pub fn deferred(
        make: impl FnOnce() -> Bytes + Send + 'static,
        trailers: Option<HeaderMap>,
    ) -> Self {
        Self {
            kind: RequestKind::Deferred {
                make: Some(Box::new(make)),
                trailers,
            },
        }
    }
}

impl<B: fmt::Debug> fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            RequestKind::Original { body } => f.debug_tuple("Original").field(body).finish(),
            RequestKind::Full { data, .. } => f.debug_tuple("Full").field(data).finish(),
            RequestKind::Deferred { .. } => f.write_str("Deferred"),
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
            RequestKindProj::Deferred { make, trailers } => {
                let mut data = make.take().map(|make| make()).filter(|d| !d.is_empty());
                poll_owned(&mut data, trailers)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Original { body } => body.is_end_stream(),
            RequestKind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            RequestKind::Deferred { make, trailers } => make.is_none() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Original { body } => body.size_hint(),
            RequestKind::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            RequestKind::Deferred { make: Some(_), .. } => SizeHint::default(),
            RequestKind::Deferred { make: None, .. } => SizeHint::with_exact(0),
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

impl<B: fmt::Debug> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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

    #[tokio::test]
    async fn over_the_cap_is_too_large_even_when_streamed_without_a_length() {
        let chunks =
            (0..10).map(|_| Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![b'a'; 100]))));
        let body = StreamBody::new(futures_stream(chunks.collect()));
        let err = buffer(body, 999).await.unwrap_err();
        assert_eq!(err, BodyError::TooLarge { limit: 999 });
        assert!(err.to_string().contains("999"));
    }

    #[tokio::test]
    async fn a_failing_body_and_a_timed_out_body_are_told_apart() {
        let chunks = vec![
            Ok(Frame::data(Bytes::from_static(b"{"))),
            Err(std::io::Error::other("connection reset")),
        ];
        let err = buffer(StreamBody::new(futures_stream(chunks)), 100)
            .await
            .unwrap_err();
        assert!(matches!(&err, BodyError::Failed(why) if why.contains("connection reset")));
        let chunks = vec![
            Ok(Frame::data(Bytes::from_static(b"{"))),
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no data for 10s",
            )),
        ];
        let err = buffer(StreamBody::new(futures_stream(chunks)), 100)
            .await
            .unwrap_err();
        assert_eq!(err, BodyError::TimedOut);
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

    #[tokio::test]
    async fn deferred_bytes_are_made_when_first_polled() {
        let made = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = made.clone();
        let body: RequestBody<Full<Bytes>> = RequestBody::deferred(
            move || {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                Bytes::from_static(b"late")
            },
            None,
        );
        assert!(!made.load(std::sync::atomic::Ordering::SeqCst));
        assert!(!body.is_end_stream());
        assert_eq!(body.collect().await.unwrap().to_bytes(), "late");
        assert!(made.load(std::sync::atomic::Ordering::SeqCst));
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
