//! A body that must keep arriving: an idle deadline between frames and an optional total one.
//!
//! Used on client request bodies (a body that never ends must not hold a connection, a worker and
//! a buffer for minutes) and on upstream replies (a stream that stalls must not hold the client
//! forever). A missed deadline ends the body with an `io::Error` of kind `TimedOut`, which
//! moat-core's buffering turns into a 408 and the client connection into a cut-off reply.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{sleep, Instant, Sleep};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project! {
    /// `inner`, ended with a `TimedOut` error when a deadline passes.
    pub(crate) struct DeadlineBody<B> {
        #[pin]
        inner: B,
        idle: Duration,
        #[pin]
        idle_timer: Sleep,
        #[pin]
        total_timer: Option<Sleep>,
        what: &'static str,
        done: bool,
    }
}

impl<B> DeadlineBody<B> {
    /// Each frame must come within `idle` of the last (or of now), and the whole body within
    /// `total`. `what` names the body in the error.
    pub(crate) fn new(
        inner: B,
        idle: Duration,
        total: Option<Duration>,
        what: &'static str,
    ) -> Self {
        Self {
            inner,
            idle,
            idle_timer: sleep(idle),
            total_timer: total.map(sleep),
            what,
            done: false,
        }
    }
}

impl<B> Body for DeadlineBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(polled) = this.inner.as_mut().poll_frame(cx) {
            let deadline = Instant::now() + *this.idle;
            this.idle_timer.as_mut().reset(deadline);
            return Poll::Ready(polled.map(|r| r.map_err(Into::into)));
        }
        let idle = this.idle_timer.poll(cx).is_ready();
        let total = this
            .total_timer
            .as_pin_mut()
            .is_some_and(|t| t.poll(cx).is_ready());
        if idle || total {
            *this.done = true;
            let why = if total {
                format!("{} did not finish in time", this.what)
            } else {
                format!("{} sent nothing for {:?}", this.what, this.idle)
            };
            return Poll::Ready(Some(Err(Box::new(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                why,
            )))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A body that sends one frame, then nothing, ever.
    struct Stalls(bool);

    impl Body for Stalls {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            if std::mem::replace(&mut self.0, true) {
                Poll::Pending
            } else {
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
            }
        }
    }

    fn kind(err: &BoxError) -> std::io::ErrorKind {
        err.downcast_ref::<std::io::Error>().unwrap().kind()
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_times_out_after_its_first_frame() {
        let mut body = Box::pin(DeadlineBody::new(
            Stalls(false),
            Duration::from_secs(5),
            None,
            "the body",
        ));
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "x"
        );
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(kind(&err), std::io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("sent nothing for 5s"), "{err}");
        assert!(body.frame().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickling_body_meets_the_total_deadline() {
        // One byte every second never trips a 5 s idle deadline; the 2.5 s total does.
        let trickle = futures_util::stream::unfold((), |()| async {
            sleep(Duration::from_secs(1)).await;
            Some((
                Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"."))),
                (),
            ))
        });
        let body = http_body_util::StreamBody::new(trickle);
        let mut body = Box::pin(DeadlineBody::new(
            body,
            Duration::from_secs(5),
            Some(Duration::from_millis(2500)),
            "the body",
        ));
        let mut frames = 0;
        let err = loop {
            match body.frame().await.unwrap() {
                Ok(_) => frames += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(frames, 2);
        assert!(err.to_string().contains("did not finish in time"), "{err}");
    }
}
