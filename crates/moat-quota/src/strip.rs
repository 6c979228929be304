//! Removing the usage chunk a client did not ask for from an OpenAI stream.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use moat_core::sse::{SseDecoder, SseEvent};
use pin_project_lite::pin_project;

pin_project! {
    /// A response body that, when enabled, drops OpenAI's final usage chunk (`"choices": []` with
    /// a `usage`) from an SSE stream and passes every other event through byte for byte. Events
    /// are held only until they are complete.
    pub struct StripUsageChunk<B> {
        #[pin]
        inner: B,
        decoder: Option<Box<SseDecoder>>,
        done: bool,
    }
}

impl<B> StripUsageChunk<B> {
    pub(crate) fn new(inner: B, enabled: bool) -> Self {
        Self {
            inner,
            decoder: enabled.then(Box::default),
            done: false,
        }
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for StripUsageChunk<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripUsageChunk")
            .field("inner", &self.inner)
            .field("enabled", &self.decoder.is_some())
            .finish()
    }
}

/// Whether an event is the usage-only chunk: no choices, and a usage object.
fn is_usage_chunk(event: &SseEvent) -> bool {
    let Some(data) = event.data() else {
        return false;
    };
    if !data.contains("\"usage\"") {
        return false;
    }
    serde_json::from_str::<serde_json::Value>(data).is_ok_and(|v| {
        v.get("choices")
            .and_then(serde_json::Value::as_array)
            .is_some_and(Vec::is_empty)
            && v.get("usage").is_some_and(serde_json::Value::is_object)
    })
}

fn keep(events: Vec<SseEvent>) -> Bytes {
    let mut out = BytesMut::new();
    for event in events.iter().filter(|e| !is_usage_chunk(e)) {
        out.extend_from_slice(event.raw());
    }
    out.freeze()
}

impl<B> Body for StripUsageChunk<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        loop {
            let this = self.as_mut().project();
            let Some(decoder) = this.decoder.as_mut() else {
                return this.inner.poll_frame(cx);
            };
            if *this.done {
                return Poll::Ready(None);
            }
            match ready!(this.inner.poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        // An oversized event: stop filtering, pass the rest through as is.
                        let Ok(events) = decoder.decode(&data) else {
                            let mut rest = BytesMut::from(
                                &decoder
                                    .finish()
                                    .iter()
                                    .flat_map(|e| e.raw().to_vec())
                                    .collect::<Vec<u8>>()[..],
                            );
                            rest.extend_from_slice(&data);
                            *this.decoder = None;
                            return Poll::Ready(Some(Ok(Frame::data(rest.freeze()))));
                        };
                        let out = keep(events);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    *this.done = true;
                    let out = keep(decoder.finish());
                    return Poll::Ready((!out.is_empty()).then(|| Ok(Frame::data(out))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.decoder.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Some(_) => SizeHint::default(),
            None => self.inner.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    const STREAM: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1,\"total_tokens\":4}}\n\n\
data: [DONE]\n\n";

    async fn run(chunks: Vec<&'static str>, enabled: bool) -> String {
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = chunks
            .into_iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        let body =
            StripUsageChunk::new(StreamBody::new(futures_util::stream::iter(frames)), enabled);
        String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn drops_only_the_usage_chunk_for_every_split() {
        let usage_at = STREAM.find("data: {\"choices\":[],").unwrap();
        let usage_end = STREAM[usage_at..].find("\n\n").unwrap() + usage_at + 2;
        let expected = format!("{}{}", &STREAM[..usage_at], &STREAM[usage_end..]);
        for cut in 0..=STREAM.len() {
            assert_eq!(
                run(vec![&STREAM[..cut], &STREAM[cut..]], true).await,
                expected,
                "cut at {cut}"
            );
        }
        assert_eq!(
            run(vec![STREAM], false).await,
            STREAM,
            "disabled: untouched"
        );
    }
}
