//! The response body of [`Moderate`](crate::Moderate): the inner service's under the response
//! view, and, when an external moderator judges a stream as it goes, the windows of text it is
//! asked about.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http_body::{Body, Frame, SizeHint};
use moat_core::body::ResponseBody as CoreBody;
use moat_core::decision::Decisions;
use moat_core::llm::WireFormat;
use moat_core::response::ViewBody;
use pin_project_lite::pin_project;

use crate::category::Scores;
use crate::external::External;
use crate::hook::{blocked_tail, lock, SharedCapture};
use crate::policy::Policy;

type Verdict = Pin<Box<dyn Future<Output = Result<Scores, String>> + Send>>;

/// A stream judged by an external moderator as it goes: each window of its text is asked
/// about when it is complete (or its text ends), the frame that completed it waits for the
/// verdict, and a flagged window ends the stream there instead. Text of a window still filling
/// flows: that is what may reach the client before its verdict.
pub(crate) struct Watch {
    pub(crate) policy: Arc<Policy>,
    pub(crate) external: External,
    pub(crate) capture: SharedCapture,
    pub(crate) format: WireFormat,
    pub(crate) decisions: Option<Decisions>,
    pending: FuturesUnordered<Verdict>,
    /// A frame held until every window asked about before it is judged.
    held: Option<Frame<Bytes>>,
    /// The stream was withheld: its ending, then nothing.
    tail: Option<Bytes>,
    /// The inner body ended.
    inner_done: bool,
    done: bool,
}

impl Watch {
    pub(crate) fn new(
        policy: Arc<Policy>,
        external: External,
        capture: SharedCapture,
        format: WireFormat,
        decisions: Option<Decisions>,
    ) -> Self {
        Self {
            policy,
            external,
            capture,
            format,
            decisions,
            pending: FuturesUnordered::new(),
            held: None,
            tail: None,
            inner_done: false,
            done: false,
        }
    }

    /// Asks about every window the hook finished since the last frame.
    fn ask(&mut self) {
        let windows = std::mem::take(&mut lock(&self.capture).ready);
        for window in windows {
            let external = self.external.clone();
            self.pending
                .push(Box::pin(async move { external.check(&[window]).await }));
        }
    }

    /// Polls the verdicts; `true` when one withholds the stream (its ending is then ready).
    fn judged(&mut self, cx: &mut Context<'_>) -> bool {
        while let Poll::Ready(Some(verdict)) = self.pending.poll_next_unpin(cx) {
            let decisions = self.decisions.clone();
            let withhold = crate::service::withhold_reply(
                &self.external,
                &self.policy,
                verdict,
                decisions.as_ref(),
            );
            if withhold {
                let capture = lock(&self.capture);
                self.tail = Some(blocked_tail(
                    self.format,
                    &self.policy.message,
                    capture.head.as_ref(),
                    &capture.choices,
                ));
                self.pending = FuturesUnordered::new();
                self.held = None;
                return true;
            }
        }
        false
    }
}

pin_project! {
    /// The response body of [`Moderate`](crate::Moderate): the inner service's (moderated), or
    /// a refusal.
    pub struct ResponseBody<B> {
        #[pin]
        inner: ViewBody<CoreBody<B>>,
        watch: Option<Box<Watch>>,
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn new(inner: ViewBody<CoreBody<B>>) -> Self {
        Self { inner, watch: None }
    }

    pub(crate) fn watched(inner: ViewBody<CoreBody<B>>, watch: Watch) -> Self {
        Self {
            inner,
            watch: Some(Box::new(watch)),
        }
    }

    /// The layer's own response (a refusal, a reply judged whole).
    pub(crate) fn plain(body: CoreBody<B>) -> Self {
        Self::new(ViewBody::plain(body))
    }

    /// The inner service's body, passed through untouched.
    pub(crate) fn passed(body: B) -> Self {
        Self::plain(CoreBody::inner(body))
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("inner", &self.inner)
            .field("watched", &self.watch.is_some())
            .finish()
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
        let mut this = self.project();
        let Some(watch) = this.watch.as_deref_mut() else {
            return this.inner.poll_frame(cx);
        };
        loop {
            if watch.done {
                return Poll::Ready(None);
            }
            if let Some(tail) = watch.tail.take() {
                watch.done = true;
                return Poll::Ready(Some(Ok(Frame::data(tail))));
            }
            if watch.judged(cx) {
                continue;
            }
            if let Some(frame) = watch.held.take() {
                if watch.pending.is_empty() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                // The upstream waits too: nothing more is read meanwhile.
                watch.held = Some(frame);
                return Poll::Pending;
            }
            if watch.inner_done {
                if watch.pending.is_empty() {
                    watch.done = true;
                    return Poll::Ready(None);
                }
                return Poll::Pending;
            }
            match this.inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    watch.ask();
                    if watch.pending.is_empty() {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    // A frame that completed a window waits for its verdict.
                    watch.held = Some(frame);
                }
                Poll::Ready(None) => {
                    // Nothing left to send but what the verdicts say.
                    watch.ask();
                    watch.inner_done = true;
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                // Verdicts polled above wake this task too.
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.watch {
            None => self.inner.is_end_stream(),
            Some(w) => w.done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.watch {
            None => self.inner.size_hint(),
            Some(_) => SizeHint::default(),
        }
    }
}
