//! The hooks layers attach, and the one body that runs them.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::CONTENT_LENGTH;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use serde_json::Value;

use super::event::{EventView, Slot, TextDelta};
use crate::sse::{SseDecoder, SseEvent};
use crate::usage::{BodyFormat, BodyOutcome, Usage, UsageReport, MAX_JSON_BYTES};

/// What a [`Hook`] needs of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Interest {
    read: bool,
    rewrite: bool,
    fail_closed: bool,
}

impl Interest {
    /// Only how the response ended: the body is not read.
    pub const END: Self = Self {
        read: false,
        rewrite: false,
        fail_closed: false,
    };
    /// Every event and the JSON reply, read (usage, deltas); bytes pass as they arrive.
    pub const OBSERVE: Self = Self {
        read: true,
        rewrite: false,
        fail_closed: false,
    };
    /// Every event and the JSON reply, to change: an event is held until it is complete.
    pub const REWRITE: Self = Self {
        read: true,
        rewrite: true,
        fail_closed: false,
    };

    /// Also: a reply that cannot be read whole (a JSON reply over the cap, an event over the
    /// decoder's cap) is cut off rather than passed unseen.
    #[must_use]
    pub const fn fail_closed(self) -> Self {
        Self {
            fail_closed: true,
            ..self
        }
    }

    fn join(self, other: Self) -> Self {
        Self {
            read: self.read || other.read,
            rewrite: self.rewrite || other.rewrite,
            fail_closed: self.fail_closed || other.fail_closed,
        }
    }
}

/// What a layer does with the response of a request it let through. Every method but
/// [`interest`](Hook::interest) has a default that does nothing.
pub trait Hook: Send + 'static {
    /// What the hook needs to see (default: only the end).
    fn interest(&self) -> Interest {
        Interest::END
    }

    /// Each streamed event, in order; hooks run innermost layer first.
    fn on_event(&mut self, event: &mut StreamEvent<'_>) {
        let _ = event;
    }

    /// The end of a stream, after its last event: bytes to send last (text still held).
    fn on_stream_end(&mut self, out: &mut BytesMut) {
        let _ = out;
    }

    /// A whole JSON reply.
    fn on_json(&mut self, reply: &mut JsonReply<'_>) {
        let _ = reply;
    }

    /// Exactly once: how the response ended and what it reported.
    fn on_end(self: Box<Self>, report: &UsageReport) {
        let _ = report;
    }
}

#[derive(Default)]
struct Registry {
    hooks: Vec<Box<dyn Hook>>,
    from_cache: bool,
}

impl Registry {
    fn end_all(&mut self, outcome: BodyOutcome) {
        let report = UsageReport::no_response(outcome);
        // Innermost first, as a response's hooks run: an outer hook (audit) then sees what the
        // inner ones recorded as they ended.
        for hook in self.hooks.drain(..).rev() {
            hook.on_end(&report);
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.end_all(BodyOutcome::Abandoned);
    }
}

/// The hooks of one request, shared by every layer handling it (through the request
/// extensions). Cloning is cheap.
#[derive(Clone, Default)]
pub struct Hooks {
    registry: Arc<Mutex<Registry>>,
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks")
            .field("attached", &self.lock().hooks.len())
            .finish()
    }
}

impl Hooks {
    /// The request's hooks: those in the extensions, or a new list put there.
    pub fn of(extensions: &mut http::Extensions) -> Self {
        extensions.get_or_insert_default::<Self>().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Attaches a hook. Attach before calling the inner service: the view takes the hooks
    /// attached by then.
    pub fn attach(&self, hook: impl Hook) {
        self.lock().hooks.push(Box::new(hook));
    }

    /// The response is a cache's, not the provider's: the report every hook gets at the end
    /// says so ([`UsageReport::from_cache`]), so budgets and token rates charge nothing.
    pub fn mark_from_cache(&self) {
        self.lock().from_cache = true;
    }

    /// The inner service failed: every hook still attached ends with
    /// [`BodyOutcome::Failed`].
    pub fn fail(&self) {
        self.lock().end_all(BodyOutcome::Failed);
    }

    /// Awaits the inner service's response (`call`) and puts it under the view of the hooks a
    /// layer attached (`None`: it attached none, and the body passes through); if the service
    /// fails, those hooks end as failed.
    pub async fn serve<B: Body<Data = Bytes>, E>(
        hooks: Option<Hooks>,
        call: impl Future<Output = Result<http::Response<B>, E>>,
    ) -> Result<http::Response<ViewBody<crate::body::ResponseBody<B>>>, E> {
        match call.await {
            Ok(response) => {
                let response = response.map(crate::body::ResponseBody::inner);
                Ok(match hooks {
                    Some(hooks) => hooks.view(response),
                    None => response.map(ViewBody::plain),
                })
            }
            Err(e) => {
                if let Some(hooks) = hooks {
                    hooks.fail();
                }
                Err(e)
            }
        }
    }

    /// Wraps a response's body in the view, if it is the first layer to see it (the hooks are
    /// then taken); later (outer) layers get their body passed through.
    pub fn view<B: Body>(&self, response: http::Response<B>) -> http::Response<ViewBody<B>> {
        let (mut hooks, from_cache) = {
            let mut registry = self.lock();
            (std::mem::take(&mut registry.hooks), registry.from_cache)
        };
        if hooks.is_empty() {
            return response.map(ViewBody::plain);
        }
        // Attached outermost first; run innermost first.
        hooks.reverse();
        let (mut parts, body) = response.into_parts();
        let interest = hooks
            .iter()
            .fold(Interest::END, |all, h| all.join(h.interest()));
        let reader = match (interest.read, BodyFormat::of(&parts.headers)) {
            (true, BodyFormat::Sse) => Reader::Sse(Box::default()),
            (true, BodyFormat::Json) => Reader::Json {
                buf: Vec::new(),
                overflow: false,
            },
            _ => Reader::Other,
        };
        if interest.rewrite && !matches!(reader, Reader::Other) {
            parts.headers.remove(CONTENT_LENGTH);
        }
        let mut pipeline = Box::new(Pipeline {
            hooks,
            reader,
            interest,
            out: BytesMut::new(),
            events: Vec::new(),
            usage: None,
            streamed_text_bytes: 0,
            body_bytes: 0,
            status: parts.status.as_u16(),
            from_cache,
            ended: false,
            ending: None,
            decoded: metrics::counter!("moat_response_events_total"),
        });
        // An empty body is never polled: it is complete already.
        if body.is_end_stream() {
            pipeline.end(BodyOutcome::Completed);
        }
        http::Response::from_parts(
            parts,
            ViewBody {
                inner: body,
                pipeline: Some(pipeline),
            },
        )
    }
}

/// One streamed event as a hook sees it: what it says ([`EventView`]), and ways to change it.
pub struct StreamEvent<'a> {
    sse: &'a SseEvent,
    view: EventView<'a>,
    doc: Option<Value>,
    edited: bool,
    removed: bool,
    rewritable: bool,
    out: &'a mut BytesMut,
    ending: &'a mut Option<Bytes>,
}

impl fmt::Debug for StreamEvent<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamEvent")
            .field("sse", self.sse)
            .field("view", &self.view)
            .field("edited", &self.edited)
            .field("removed", &self.removed)
            .finish()
    }
}

impl<'a> StreamEvent<'a> {
    /// The event as it came (its fields and exact bytes).
    pub fn sse(&self) -> &SseEvent {
        self.sse
    }

    /// What it says (text deltas as edited so far).
    pub fn view(&self) -> &EventView<'a> {
        &self.view
    }

    /// Its text deltas, as edited so far.
    pub fn deltas(&self) -> &[TextDelta<'a>] {
        &self.view.deltas
    }

    /// Whether it is OpenAI's end marker, `data: [DONE]`.
    pub fn is_done(&self) -> bool {
        self.sse.is_done()
    }

    fn check_rewritable(&self) -> bool {
        debug_assert!(
            self.rewritable,
            "a hook that changes events must declare Interest::REWRITE"
        );
        self.rewritable
    }

    /// Replaces the text of delta `index` (a no-op if there is none).
    pub fn set_delta(&mut self, index: usize, text: String) {
        if !self.check_rewritable() {
            return;
        }
        if let Some(delta) = self.view.deltas.get_mut(index) {
            if delta.text != text {
                if !delta.edited {
                    delta.origin = self.sse.data().and_then(|data| origin(data, &delta.text));
                }
                delta.text = text.into();
                delta.edited = true;
                self.edited = true;
            }
        }
    }

    /// Changes anything else in the event's JSON (read on first use; `f` is not called when the
    /// data is not JSON). `f` says whether it changed something; if so, the event is
    /// re-encoded.
    pub fn edit_json(&mut self, f: impl FnOnce(&mut Value) -> bool) {
        if !self.check_rewritable() {
            return;
        }
        if self.doc.is_none() {
            self.doc = self.sse.json();
        }
        if let Some(doc) = self.doc.as_mut() {
            self.edited |= f(doc);
        }
    }

    /// Sends `bytes` before this event (for instance an event of the hook's own).
    pub fn insert_before(&mut self, bytes: &[u8]) {
        if self.check_rewritable() {
            self.out.extend_from_slice(bytes);
        }
    }

    /// Drops this event from what is sent (later hooks still see it).
    pub fn remove(&mut self) {
        if self.check_rewritable() {
            self.removed = true;
        }
    }

    /// Whether a hook removed it.
    pub fn is_removed(&self) -> bool {
        self.removed
    }

    /// Ends the stream after this event: nothing more is read from the body (the upstream is
    /// dropped with it), every hook's [`on_stream_end`](Hook::on_stream_end) runs, and `tail`
    /// is sent last (e.g. a closing event in the client's protocol). Hooks outer to this one
    /// still see this event. The hooks are told the response [`Completed`](BodyOutcome::Completed)
    /// with the usage seen so far. The first hook to end the stream decides the tail.
    pub fn end_stream(&mut self, tail: Bytes) {
        if self.check_rewritable() && self.ending.is_none() {
            *self.ending = Some(tail);
        }
    }

    /// Whether a hook ended the stream at this event.
    pub fn is_ending(&self) -> bool {
        self.ending.is_some()
    }

    /// Sends the event: as it came, re-encoded with its edits, or not at all.
    fn send(mut self) {
        if self.removed {
            return;
        }
        if !self.edited {
            self.out.extend_from_slice(self.sse.raw());
            return;
        }
        if let Some(data) = self.spliced() {
            self.out.extend_from_slice(self.sse.with_data(&data).raw());
            return;
        }
        let mut doc = match self.doc.take().or_else(|| self.sse.json()) {
            Some(doc) => doc,
            None => return self.out.extend_from_slice(self.sse.raw()),
        };
        for delta in self.view.deltas.iter().filter(|d| d.edited) {
            write_slot(&mut doc, delta.slot, &delta.text);
        }
        self.out
            .extend_from_slice(self.sse.with_data(&doc.to_string()).raw());
    }
}

impl StreamEvent<'_> {
    /// The event's data with its edited texts written where they were, when every edit is of a
    /// text read in place and nothing else changed: no document is built, the rest of the
    /// event stays byte for byte.
    fn spliced(&self) -> Option<String> {
        if self.doc.is_some() {
            return None;
        }
        let data = self.sse.data()?;
        let mut edits: Vec<((usize, usize), &str)> = Vec::new();
        for delta in self.view.deltas.iter().filter(|d| d.edited) {
            edits.push((delta.origin?, &delta.text));
        }
        edits.sort_unstable_by_key(|(span, _)| *span);
        let mut out = String::with_capacity(data.len() + 16);
        let mut copied = 0;
        for ((start, end), text) in edits {
            if start < copied {
                return None;
            }
            out.push_str(&data[copied..start]);
            let quoted = serde_json::to_string(text).ok()?;
            out.push_str(&quoted[1..quoted.len() - 1]);
            copied = end;
        }
        out.push_str(&data[copied..]);
        Some(out)
    }
}

/// Where `text` lies in `data`, when it was borrowed from it (a JSON string read without
/// unescaping, between its quotes).
#[allow(clippy::ptr_arg)] // Only a borrowed text lies in `data`: the `Cow` says which.
fn origin(data: &str, text: &std::borrow::Cow<'_, str>) -> Option<(usize, usize)> {
    let std::borrow::Cow::Borrowed(text) = text else {
        return None;
    };
    let start = (text.as_ptr() as usize).checked_sub(data.as_ptr() as usize)?;
    let end = start.checked_add(text.len())?;
    let bytes = data.as_bytes();
    let quoted = start > 0 && bytes.get(start - 1) == Some(&b'"') && bytes.get(end) == Some(&b'"');
    (quoted && data.get(start..end) == Some(*text)).then_some((start, end))
}

fn write_slot(doc: &mut Value, slot: Slot, text: &str) {
    let target = match slot {
        Slot::Content(pos) => doc
            .pointer_mut(&format!("/choices/{pos}/delta"))
            .and_then(Value::as_object_mut)
            .map(|d| d.entry("content").or_insert(Value::Null)),
        Slot::Refusal(pos) => doc.pointer_mut(&format!("/choices/{pos}/delta/refusal")),
        Slot::Text(pos) => doc.pointer_mut(&format!("/choices/{pos}/text")),
        Slot::Arguments(pos, call) => doc.pointer_mut(&format!(
            "/choices/{pos}/delta/tool_calls/{call}/function/arguments"
        )),
        Slot::Delta => doc.get_mut("delta"),
        Slot::DeltaText => doc.pointer_mut("/delta/text"),
        Slot::DeltaJson => doc.pointer_mut("/delta/partial_json"),
    };
    if let Some(target) = target {
        *target = Value::String(text.to_owned());
    }
}

/// A whole JSON reply as a hook sees it.
pub struct JsonReply<'a> {
    bytes: &'a [u8],
    /// Parsed on first use: observers only read the usage, which is read without it.
    doc: &'a mut Option<Option<Value>>,
    usage: Option<Usage>,
    modified: &'a mut bool,
    rewritable: bool,
}

impl fmt::Debug for JsonReply<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonReply")
            .field("bytes", &self.bytes.len())
            .field("usage", &self.usage)
            .finish()
    }
}

impl JsonReply<'_> {
    /// The reply's bytes as they came.
    pub fn bytes(&self) -> &[u8] {
        self.bytes
    }

    fn doc(&mut self) -> Option<&mut Value> {
        let bytes = self.bytes;
        self.doc
            .get_or_insert_with(|| serde_json::from_slice(bytes).ok())
            .as_mut()
    }

    /// The reply, parsed once for every hook that asks (`None` when it is not JSON).
    pub fn value(&mut self) -> Option<&Value> {
        self.doc().map(|doc| &*doc)
    }

    /// Changes the reply (`f` is not called when it is not JSON). `f` says whether it changed
    /// something; if so, the reply is re-encoded.
    pub fn edit(&mut self, f: impl FnOnce(&mut Value) -> bool) {
        debug_assert!(
            self.rewritable,
            "a hook that changes replies must declare Interest::REWRITE"
        );
        if !self.rewritable {
            return;
        }
        if let Some(doc) = self.doc() {
            *self.modified |= f(doc);
        }
    }

    /// The usage it reports.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }
}

enum Reader {
    Sse(Box<SseDecoder>),
    Json { buf: Vec<u8>, overflow: bool },
    Other,
}

struct Pipeline {
    /// Innermost layer's first.
    hooks: Vec<Box<dyn Hook>>,
    reader: Reader,
    interest: Interest,
    /// What to send next (when rewriting).
    out: BytesMut,
    /// Decoded events, reused from chunk to chunk.
    events: Vec<SseEvent>,
    usage: Option<Usage>,
    streamed_text_bytes: u64,
    body_bytes: u64,
    status: u16,
    /// A cache answered: said in the report.
    from_cache: bool,
    ended: bool,
    /// A hook ended the stream: the tail to send last.
    ending: Option<Bytes>,
    decoded: metrics::Counter,
}

impl Pipeline {
    /// Reads one event: every hook sees it, then (when rewriting) it is sent.
    fn event(&mut self, sse: &SseEvent) {
        self.decoded.increment(1);
        let view = match sse.data() {
            Some(data) if !sse.is_done() => EventView::read(data),
            _ => EventView::default(),
        };
        if let Some(usage) = view.usage {
            self.usage.get_or_insert_with(Usage::default).merge(&usage);
        }
        self.streamed_text_bytes += view.deltas.iter().map(|d| d.text.len() as u64).sum::<u64>();
        let mut event = StreamEvent {
            sse,
            view,
            doc: None,
            edited: false,
            removed: false,
            rewritable: self.interest.rewrite,
            out: &mut self.out,
            ending: &mut self.ending,
        };
        for hook in &mut self.hooks {
            hook.on_event(&mut event);
        }
        if self.interest.rewrite {
            event.send();
        }
    }

    /// Takes a chunk. `Some` when the bytes go on as they came (nothing rewrites them).
    fn data(&mut self, data: Bytes) -> Option<Bytes> {
        self.body_bytes += data.len() as u64;
        match &mut self.reader {
            Reader::Other => Some(data),
            Reader::Sse(decoder) => {
                let mut events = std::mem::take(&mut self.events);
                if decoder.decode_into(&data, &mut events).is_err() {
                    // An event over the cap: stop reading; pass it on, or cut the reply off.
                    let held = decoder.take_buffered();
                    self.reader = Reader::Other;
                    if self.interest.fail_closed {
                        self.cut("a streamed event larger than the decoder's cap");
                        return None;
                    }
                    // When rewriting, the event's earlier bytes were held: they go on too.
                    return Some(if self.interest.rewrite { held } else { data });
                }
                for event in events.drain(..) {
                    self.event(&event);
                    if self.ending.is_some() {
                        break;
                    }
                }
                events.clear();
                self.events = events;
                if self.ending.is_some() {
                    self.end(BodyOutcome::Completed);
                    return None;
                }
                (!self.interest.rewrite).then_some(data)
            }
            Reader::Json { buf, overflow } => {
                if *overflow {
                    return Some(data);
                }
                if buf.len() + data.len() <= MAX_JSON_BYTES {
                    buf.extend_from_slice(&data);
                    return (!self.interest.rewrite).then_some(data);
                }
                if self.interest.fail_closed {
                    self.cut("a JSON reply larger than can be read whole");
                    return None;
                }
                // Too large to read: what was held goes out, then the rest as it comes.
                *overflow = true;
                if !self.interest.rewrite {
                    buf.clear();
                    return Some(data);
                }
                let mut all = std::mem::take(buf);
                all.extend_from_slice(&data);
                Some(Bytes::from(all))
            }
        }
    }

    /// Ends the reply here, sending nothing more.
    fn cut(&mut self, why: &'static str) {
        tracing::warn!(target: "moat::response", why, "reply cut off");
        self.out.clear();
        self.reader = Reader::Other;
        self.end(BodyOutcome::Interrupted);
        self.out.clear();
    }

    /// The body ended (or failed, or was dropped): the rest is read and every hook told, once.
    fn end(&mut self, outcome: BodyOutcome) {
        if self.ended {
            return;
        }
        self.ended = true;
        let sending = outcome == BodyOutcome::Completed;
        match std::mem::replace(&mut self.reader, Reader::Other) {
            Reader::Sse(mut decoder) => {
                if self.ending.is_none() {
                    for event in decoder.finish() {
                        self.event(&event);
                        if self.ending.is_some() {
                            break;
                        }
                    }
                }
                if self.interest.rewrite && sending {
                    for hook in &mut self.hooks {
                        hook.on_stream_end(&mut self.out);
                    }
                    if let Some(tail) = self.ending.take() {
                        self.out.extend_from_slice(&tail);
                    }
                }
            }
            Reader::Json {
                buf,
                overflow: false,
            } if sending && !buf.is_empty() => self.json(buf),
            _ => {}
        }
        if !sending {
            self.out.clear();
        }
        let report = UsageReport {
            usage: self.usage,
            outcome,
            status: self.status,
            streamed_text_bytes: self.streamed_text_bytes,
            body_bytes: self.body_bytes,
            from_cache: self.from_cache,
        };
        for hook in self.hooks.drain(..) {
            hook.on_end(&report);
        }
    }

    /// A whole JSON reply: parsed once, shown to every hook, sent (re-encoded if changed).
    fn json(&mut self, buf: Vec<u8>) {
        let mut doc = None;
        self.usage = Usage::of_reply(&buf);
        let mut modified = false;
        for hook in &mut self.hooks {
            hook.on_json(&mut JsonReply {
                bytes: &buf,
                doc: &mut doc,
                usage: self.usage,
                modified: &mut modified,
                rewritable: self.interest.rewrite,
            });
        }
        if self.interest.rewrite {
            match doc.flatten().filter(|_| modified) {
                // Serializing a `Value` cannot fail.
                Some(doc) => self
                    .out
                    .extend_from_slice(&serde_json::to_vec(&doc).unwrap_or_default()),
                None => self.out.extend_from_slice(&buf),
            }
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.end(BodyOutcome::Interrupted);
    }
}

pin_project! {
    /// A response body under the view: read once for every hook, or passed through untouched
    /// by the layers outside the one that installed it.
    pub struct ViewBody<B> {
        #[pin]
        inner: B,
        pipeline: Option<Box<Pipeline>>,
    }
}

impl<B> ViewBody<B> {
    /// `body`, passed through untouched.
    pub fn plain(body: B) -> Self {
        Self {
            inner: body,
            pipeline: None,
        }
    }
}

impl<B> fmt::Debug for ViewBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ViewBody")
            .field("viewed", &self.pipeline.is_some())
            .finish()
    }
}

impl<B> Body for ViewBody<B>
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
        let Some(pipeline) = this.pipeline.as_deref_mut() else {
            return this.inner.poll_frame(cx);
        };
        loop {
            if !pipeline.out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(pipeline.out.split().freeze()))));
            }
            if pipeline.ended {
                return Poll::Ready(None);
            }
            match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let passed = pipeline.data(data);
                        // Servers stop polling once a body says it has ended, so end here.
                        if this.inner.is_end_stream() {
                            pipeline.end(BodyOutcome::Completed);
                        }
                        if let Some(data) = passed {
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                    }
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Some(Err(e)) => {
                    pipeline.end(BodyOutcome::Errored);
                    return Poll::Ready(Some(Err(e)));
                }
                None => pipeline.end(BodyOutcome::Completed),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.pipeline {
            None => self.inner.is_end_stream(),
            Some(p) => p.ended && p.out.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.pipeline {
            Some(p) if p.ended => SizeHint::with_exact(p.out.len() as u64),
            Some(p) if p.interest.rewrite && !matches!(p.reader, Reader::Other) => {
                SizeHint::default()
            }
            _ => self.inner.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    type Reports = Arc<Mutex<Vec<(&'static str, UsageReport)>>>;

    /// Records its reports, and (when `rewrite`) upper-cases text, removes usage chunks and says
    /// where it ran.
    struct Probe {
        name: &'static str,
        interest: Interest,
        reports: Reports,
        order: Arc<Mutex<Vec<&'static str>>>,
    }

    impl Hook for Probe {
        fn interest(&self) -> Interest {
            self.interest
        }

        fn on_event(&mut self, event: &mut StreamEvent<'_>) {
            self.order.lock().unwrap().push(self.name);
            if self.interest == Interest::REWRITE {
                for i in 0..event.deltas().len() {
                    let loud = event.deltas()[i].text.to_uppercase();
                    event.set_delta(i, loud);
                }
                if event.view().is_usage_only() {
                    event.remove();
                }
            }
        }

        fn on_json(&mut self, reply: &mut JsonReply<'_>) {
            self.order.lock().unwrap().push(self.name);
            if self.interest == Interest::REWRITE {
                let name = self.name;
                reply.edit(|doc| {
                    doc["seen_by"] = Value::from(name);
                    true
                });
            }
        }

        fn on_end(self: Box<Self>, report: &UsageReport) {
            self.reports
                .lock()
                .unwrap()
                .push((self.name, report.clone()));
        }
    }

    struct Harness {
        reports: Reports,
        order: Arc<Mutex<Vec<&'static str>>>,
        hooks: Hooks,
    }

    impl Harness {
        fn new() -> Self {
            Self {
                reports: Reports::default(),
                order: Arc::default(),
                hooks: Hooks::default(),
            }
        }

        fn attach(&self, name: &'static str, interest: Interest) -> &Self {
            self.hooks.attach(Probe {
                name,
                interest,
                reports: self.reports.clone(),
                order: self.order.clone(),
            });
            self
        }

        fn reports(&self) -> Vec<(&'static str, UsageReport)> {
            self.reports.lock().unwrap().clone()
        }
    }

    type Chunks = StreamBody<
        futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>,
    >;

    fn chunked(chunks: &[&[u8]]) -> Chunks {
        StreamBody::new(futures_util::stream::iter(
            chunks
                .iter()
                .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
                .collect::<Vec<_>>(),
        ))
    }

    fn response<B>(content_type: &str, body: B) -> http::Response<B> {
        http::Response::builder()
            .header("content-type", content_type)
            .body(body)
            .unwrap()
    }

    const OPENAI_STREAM: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}],\"usage\":null}\n\n\
data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" world\"}}],\"usage\":null}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n\
data: [DONE]\n\n";

    #[tokio::test]
    async fn observers_see_usage_once_at_the_end_for_any_split_and_bytes_pass_untouched() {
        for cut in 0..OPENAI_STREAM.len() {
            let h = Harness::new();
            h.attach("outer", Interest::OBSERVE)
                .attach("inner", Interest::END);
            let body = chunked(&[
                &OPENAI_STREAM.as_bytes()[..cut],
                &OPENAI_STREAM.as_bytes()[cut..],
            ]);
            let bytes = h
                .hooks
                .view(response("text/event-stream", body))
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes();
            assert_eq!(bytes, OPENAI_STREAM.as_bytes(), "cut at {cut}");
            let reports = h.reports();
            assert_eq!(
                reports.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
                ["inner", "outer"]
            );
            for (_, r) in &reports {
                assert_eq!(r.outcome, BodyOutcome::Completed);
                assert_eq!(r.usage, Some(Usage::new(3, 2)));
                assert_eq!((r.streamed_text_bytes, r.status), (11, 200));
            }
        }
    }

    #[tokio::test]
    async fn rewrites_are_the_same_for_every_split_and_untouched_events_keep_their_bytes() {
        let whole = {
            let h = Harness::new();
            h.attach("rewrite", Interest::REWRITE);
            let body = chunked(&[OPENAI_STREAM.as_bytes()]);
            h.hooks
                .view(response("text/event-stream", body))
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
        };
        let text = std::str::from_utf8(&whole).unwrap();
        assert!(
            text.contains("\"HELLO\"") && text.contains("\" WORLD\""),
            "{text}"
        );
        assert!(
            !text.contains("prompt_tokens"),
            "the usage chunk was removed: {text}"
        );
        assert!(text.ends_with("data: [DONE]\n\n"), "untouched: {text}");
        for cut in 0..OPENAI_STREAM.len() {
            let h = Harness::new();
            h.attach("rewrite", Interest::REWRITE);
            let body = chunked(&[
                &OPENAI_STREAM.as_bytes()[..cut],
                &OPENAI_STREAM.as_bytes()[cut..],
            ]);
            let response = h.hooks.view(response("text/event-stream", body));
            assert!(response.headers().get(CONTENT_LENGTH).is_none());
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(bytes, whole, "cut at {cut}");
            assert_eq!(
                h.reports()[0].1.usage,
                Some(Usage::new(3, 2)),
                "removed events still count"
            );
        }
    }

    /// Appends a quoted word to every delta; ends the stream at an event saying "stop".
    struct Splice;

    impl Hook for Splice {
        fn interest(&self) -> Interest {
            Interest::REWRITE
        }
        fn on_event(&mut self, event: &mut StreamEvent<'_>) {
            for i in 0..event.deltas().len() {
                let text = format!("{} \"q\"", event.deltas()[i].text);
                if text.starts_with("stop") {
                    event.end_stream(Bytes::from_static(b"data: [END]\n\n"));
                }
                event.set_delta(i, text);
            }
        }
    }

    #[tokio::test]
    async fn edited_texts_are_spliced_in_place_and_a_hook_can_end_the_stream() {
        let stream = "data: {\"id\":\"x\",  \"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"extra\":[1, 2]}]}\n\n\
data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\\nb\"}}]}\n\n\
data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"stop\"}}]}\n\n\
data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"never sent\"}}]}\n\n\
data: [DONE]\n\n";
        let hooks = Hooks::default();
        hooks.attach(Splice);
        let body = chunked(&[stream.as_bytes()]);
        let bytes = hooks
            .view(response("text/event-stream", body))
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        let text = std::str::from_utf8(&bytes).unwrap();
        // Read in place: only the text changed, the layout and unknown members kept.
        assert!(
            text.starts_with("data: {\"id\":\"x\",  \"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi \\\"q\\\"\"},\"extra\":[1, 2]}]}\n\n"),
            "{text}"
        );
        // Unescaped when read: rebuilt from the document, still right.
        assert!(text.contains("\"a\\nb \\\"q\\\"\""), "{text}");
        assert!(
            text.ends_with("\"stop \\\"q\\\"\"}}]}\n\ndata: [END]\n\n"),
            "{text}"
        );
        assert!(
            !text.contains("never sent") && !text.contains("[DONE]"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn hooks_run_innermost_first_and_each_event_is_read_once() {
        let h = Harness::new();
        // Attached as layers attach them: outermost first.
        h.attach("ratelimit", Interest::OBSERVE)
            .attach("quota", Interest::OBSERVE)
            .attach("redact", Interest::REWRITE);
        let body = chunked(&[OPENAI_STREAM.as_bytes()]);
        let view = h.hooks.view(response("text/event-stream", body));
        // Outer layers get their body passed through.
        let outer = h.hooks.view(view);
        outer.into_body().collect().await.unwrap();
        let order = h.order.lock().unwrap().clone();
        assert_eq!(
            order.len(),
            4 * 3,
            "four events, three hooks, one reading each"
        );
        assert_eq!(&order[..3], ["redact", "quota", "ratelimit"]);
    }

    #[tokio::test]
    async fn a_dropped_or_failing_body_reports_once_with_what_came() {
        let h = Harness::new();
        h.attach("a", Interest::OBSERVE);
        let mut body = h
            .hooks
            .view(response(
                "text/event-stream",
                chunked(&[
                    &OPENAI_STREAM.as_bytes()[..80],
                    &OPENAI_STREAM.as_bytes()[80..],
                ]),
            ))
            .into_body();
        assert!(body.frame().await.unwrap().unwrap().is_data());
        drop(body);
        let reports = h.reports();
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].1.outcome, BodyOutcome::Interrupted);
        assert_eq!(
            (reports[0].1.usage, reports[0].1.streamed_text_bytes),
            (None, 5)
        );

        let h = Harness::new();
        h.attach("a", Interest::REWRITE);
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(
                b"data: {\"choices\":[{\"delta\":{\"content\":\"abc\"}}]}\n\n",
            ))),
            Err(std::io::Error::other("reset")),
        ];
        let body = StreamBody::new(futures_util::stream::iter(frames));
        assert!(h
            .hooks
            .view(response("text/event-stream", body))
            .into_body()
            .collect()
            .await
            .is_err());
        let reports = h.reports();
        assert_eq!(
            (reports.len(), reports[0].1.outcome),
            (1, BodyOutcome::Errored)
        );
        assert_eq!(reports[0].1.streamed_text_bytes, 3);
    }

    #[tokio::test]
    async fn no_response_is_reported_as_failed_or_abandoned() {
        let h = Harness::new();
        h.attach("a", Interest::OBSERVE);
        h.hooks.fail();
        h.hooks.fail();
        assert_eq!(h.reports().len(), 1);
        assert_eq!(h.reports()[0].1.outcome, BodyOutcome::Failed);
        let h = Harness::new();
        h.attach("a", Interest::END);
        let reports = h.reports.clone();
        drop(h);
        let reports = reports.lock().unwrap();
        assert_eq!(
            (reports.len(), reports[0].1.outcome),
            (1, BodyOutcome::Abandoned)
        );
    }

    #[tokio::test]
    async fn a_json_reply_is_parsed_once_and_rewritten_once() {
        let json = r#"{"choices":[],"usage":{"input_tokens":1,"output_tokens":2}}"#;
        let h = Harness::new();
        h.attach("outer", Interest::REWRITE)
            .attach("inner", Interest::REWRITE);
        // `Full` says it has ended right after its one frame; servers then stop polling and drop.
        let mut body = h
            .hooks
            .view(response("application/json", Full::new(Bytes::from(json))))
            .into_body();
        let bytes = body.frame().await.unwrap().unwrap().into_data().unwrap();
        drop(body);
        let doc: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(doc["seen_by"], "outer", "the outer layer's hook runs last");
        assert_eq!(h.order.lock().unwrap().clone(), ["inner", "outer"]);
        let reports = h.reports();
        assert_eq!(reports.len(), 2);
        assert!(
            reports
                .iter()
                .all(|(_, r)| r.outcome == BodyOutcome::Completed
                    && r.usage == Some(Usage::new(1, 2)))
        );
    }

    #[tokio::test]
    async fn empty_other_and_oversized_bodies() {
        let h = Harness::new();
        h.attach("a", Interest::OBSERVE);
        drop(
            h.hooks
                .view(response("application/json", Full::new(Bytes::new()))),
        );
        let h2 = Harness::new();
        h2.attach("a", Interest::REWRITE);
        let text = h2
            .hooks
            .view(response("text/plain", Full::new(Bytes::from_static(b"x"))));
        assert_eq!(text.into_body().collect().await.unwrap().to_bytes(), "x");
        for r in h.reports().into_iter().chain(h2.reports()) {
            assert_eq!((r.1.outcome, r.1.usage), (BodyOutcome::Completed, None));
        }

        // Over the cap: passed on unread, or (fail closed) cut off.
        let big = Bytes::from(vec![b' '; MAX_JSON_BYTES + 10]);
        let h = Harness::new();
        h.attach("a", Interest::REWRITE);
        let body = chunked(&[&big[..MAX_JSON_BYTES - 5], &big[MAX_JSON_BYTES - 5..]]);
        let out = h
            .hooks
            .view(response("application/json", body))
            .into_body()
            .collect()
            .await
            .unwrap();
        assert_eq!(out.to_bytes().len(), big.len());
        let h = Harness::new();
        h.attach("a", Interest::REWRITE.fail_closed());
        let body = chunked(&[&big[..MAX_JSON_BYTES - 5], &big[MAX_JSON_BYTES - 5..]]);
        let out = h
            .hooks
            .view(response("application/json", body))
            .into_body()
            .collect()
            .await
            .unwrap();
        assert!(out.to_bytes().is_empty());
        assert_eq!(h.reports()[0].1.outcome, BodyOutcome::Interrupted);
    }

    #[tokio::test]
    async fn an_event_over_the_cap_passes_whole_when_not_failing_closed() {
        let huge = format!(
            "data: {}\n\ndata: [DONE]\n\n",
            "x".repeat(crate::sse::DEFAULT_MAX_EVENT_BYTES + 10)
        );
        let h = Harness::new();
        h.attach("a", Interest::REWRITE);
        let pieces: Vec<&[u8]> = huge.as_bytes().chunks(4096).collect();
        let out = h
            .hooks
            .view(response("text/event-stream", chunked(&pieces)))
            .into_body()
            .collect()
            .await
            .unwrap();
        assert_eq!(out.to_bytes(), huge.as_bytes());
    }

    #[tokio::test]
    async fn held_text_goes_out_before_an_event_and_at_the_end() {
        struct Hold(String);
        impl Hook for Hold {
            fn interest(&self) -> Interest {
                Interest::REWRITE
            }
            fn on_event(&mut self, event: &mut StreamEvent<'_>) {
                if event.is_done() {
                    event.insert_before(b"data: held\n\n");
                }
                event.edit_json(|doc| {
                    doc["n"] = Value::from(1);
                    true
                });
            }
            fn on_stream_end(&mut self, out: &mut BytesMut) {
                out.extend_from_slice(self.0.as_bytes());
            }
        }
        let hooks = Hooks::default();
        hooks.attach(Hold(": bye\n\n".into()));
        let body = chunked(&[b"event: x\nid: 7\ndata: {\"a\":1}\n\ndata: [DONE]\n\n"]);
        let out = hooks
            .view(response("text/event-stream", body))
            .into_body()
            .collect()
            .await
            .unwrap();
        assert_eq!(
            out.to_bytes(),
            "event: x\nid: 7\ndata: {\"a\":1,\"n\":1}\n\ndata: held\n\ndata: [DONE]\n\n: bye\n\n"
        );
    }
}
