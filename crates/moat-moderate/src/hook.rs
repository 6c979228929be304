//! Moderating one reply on the shared response path: streamed events as they pass, or the
//! whole JSON reply.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use moat_core::decision::{Decision, Decisions, Outcome};
use moat_core::llm::WireFormat;
use moat_core::response::{text_event, Hook, Interest, JsonReply, StreamEvent, StreamKey};
use moat_core::sse::SseEvent;
use moat_core::usage::UsageReport;
use serde_json::{json, Value};

use crate::category::Scores;
use crate::output::{output_texts, NOT_OUTPUT};
use crate::policy::{Action, Policy, StreamMode};
use crate::scan::{check_text, mask_spans, Flag, Scan};

/// What one reply went through, for the decision and metrics at its end.
#[derive(Debug, Default)]
struct Findings {
    flags: Vec<Flag>,
    scores: Scores,
    blocked: bool,
    masked: usize,
}

impl Findings {
    fn take(&mut self, scan: &Scan) {
        self.scores.merge(&scan.scores());
        for flag in scan.flags() {
            if !self.flags.iter().any(|f| f.category == flag.category) {
                self.flags.push(flag.clone());
            }
        }
    }
}

/// What a reply said, kept for an external moderator asked once the reply is whole.
#[derive(Debug, Default)]
pub(crate) struct Capture {
    /// Each text of the reply as the model wrote it: a whole reply's strings, or a stream's
    /// texts.
    pub(crate) texts: Vec<String>,
    /// For a stream's closing events: its first event (OpenAI) or its `response` object.
    pub(crate) head: Option<Value>,
    pub(crate) choices: Vec<u32>,
    /// The local classifier blocked it already.
    pub(crate) blocked: bool,
    /// Windows of streamed text ready to be asked about while the stream flows (modes other
    /// than buffered).
    pub(crate) ready: Vec<String>,
}

/// The size of a window of streamed text an external moderator is asked about while the
/// stream flows: what may reach the client before a verdict on it, beside the verdict's wait.
pub const STREAM_WINDOW_CHARS: usize = 1_000;

/// Shared between the hook and the service that asks the external moderator.
pub(crate) type SharedCapture = Arc<std::sync::Mutex<Capture>>;

/// Moderates one reply: the [`Hook`] a [`Moderate`](crate::Moderate) service attaches.
pub(crate) struct ReplyHook {
    policy: Arc<Policy>,
    format: WireFormat,
    streams: BTreeMap<StreamKey, Scan>,
    /// OpenAI choices seen and not finished.
    open_choices: BTreeSet<u32>,
    /// The Responses API's `response` object, from `response.created`.
    response: Option<Value>,
    findings: Findings,
    decisions: Option<Decisions>,
    /// Texts kept for an external moderator, per stream.
    capture: Option<(SharedCapture, BTreeMap<StreamKey, String>)>,
}

impl ReplyHook {
    pub(crate) fn new(
        policy: Arc<Policy>,
        format: WireFormat,
        decisions: Option<Decisions>,
        capture: Option<SharedCapture>,
    ) -> Self {
        Self {
            policy,
            format,
            streams: BTreeMap::new(),
            open_choices: BTreeSet::new(),
            response: None,
            findings: Findings::default(),
            decisions,
            capture: capture.map(|c| (c, BTreeMap::new())),
        }
    }

    /// Ends a text stream: what it still holds, and whether it blocked.
    fn finish(&mut self, key: StreamKey) -> (String, bool) {
        let Some(mut scan) = self.streams.remove(&key) else {
            return (String::new(), false);
        };
        let rest = scan.finish(&self.policy);
        let blocked = scan.is_blocked();
        // Kept: a Responses `*.done` event repeats the text, masked the same way.
        self.streams.insert(key, scan);
        (rest, blocked)
    }

    /// The event that carries text a stream still held, in the reply's protocol.
    fn held_event(&self, key: StreamKey, text: &str) -> Bytes {
        text_event(self.format, key, text).raw().clone()
    }

    /// Ends the text streams `keys` before `event`: what they held goes out first (appended to
    /// the event's own delta for that stream when it has one). Whether one blocked.
    fn finish_before(&mut self, event: &mut StreamEvent<'_>, keys: Vec<StreamKey>) -> bool {
        for key in keys {
            let (rest, blocked) = self.finish(key);
            if !rest.is_empty() {
                let own = event.deltas().iter().position(|d| d.stream_key() == key);
                match own {
                    Some(i) => {
                        let text = format!("{}{rest}", event.deltas()[i].text);
                        event.set_delta(i, text);
                    }
                    None => {
                        let held = self.held_event(key, &rest);
                        event.insert_before(&held);
                    }
                }
            }
            if blocked {
                return true;
            }
        }
        false
    }

    /// The stream is blocked at `event`: it ends here, in the client's protocol.
    fn block(&mut self, event: &mut StreamEvent<'_>) {
        self.findings.blocked = true;
        let head = match self.format {
            WireFormat::ChatCompletions | WireFormat::Completions => event.sse().json(),
            _ => self.response.clone(),
        };
        let choices: Vec<u32> = self.open_choices.iter().copied().collect();
        let tail = blocked_tail(self.format, &self.policy.message, head.as_ref(), &choices);
        event.end_stream(tail);
    }

    /// Whether `text` has nothing to record or change.
    fn clean(&self, text: &str) -> bool {
        let (out, scan) = check_text(text, &self.policy);
        scan.flags().is_empty() && !scan.is_blocked() && scan.masked().is_empty() && out == text
    }

    /// Every output string of `value` checked as a whole text: masked in place, or blocked.
    fn check_json(&mut self, value: &mut Value) -> bool {
        let mut changed = false;
        match value {
            Value::String(text) => {
                if let Some((capture, _)) = &self.capture {
                    lock(capture).texts.push(text.clone());
                }
                let (out, scan) = check_text(text, &self.policy);
                self.findings.take(&scan);
                self.findings.masked += scan.masked().len();
                if scan.is_blocked() {
                    self.findings.blocked = true;
                } else if out != *text {
                    *text = out;
                    changed = true;
                }
            }
            Value::Array(items) => {
                for item in items {
                    changed |= self.check_json(item);
                }
            }
            Value::Object(map) => {
                for (key, item) in map.iter_mut() {
                    if !NOT_OUTPUT.contains(&key.as_str()) {
                        changed |= self.check_json(item);
                    }
                }
            }
            _ => {}
        }
        changed
    }

    /// Keeps what the event says for an external moderator: its texts, cut into windows as
    /// they grow (all of them when the reply or one of its texts ends), and the stream's head.
    fn capture_event(&mut self, event: &StreamEvent<'_>) {
        let Some((capture, texts)) = &mut self.capture else {
            return;
        };
        let windows = self.policy.stream_mode != StreamMode::Buffered;
        let mut capture = lock(capture);
        for delta in event.deltas() {
            let text = texts.entry(delta.stream_key()).or_default();
            text.push_str(&delta.text);
            if windows && text.len() >= STREAM_WINDOW_CHARS {
                // Cut after the last space, so no word is split between two windows.
                let cut = text
                    .rfind(char::is_whitespace)
                    .map_or(text.len(), |i| i + 1);
                capture.ready.push(text.drain(..cut).collect());
            }
        }
        let ends = event.is_done()
            || event.view().finish_reasons().next().is_some()
            || matches!(
                event.view().kind(),
                Some(
                    "content_block_stop"
                        | "message_delta"
                        | "response.output_text.done"
                        | "response.function_call_arguments.done"
                        | "response.completed"
                )
            );
        if windows && ends {
            let rest: Vec<String> = texts
                .values_mut()
                .filter(|t| !t.is_empty())
                .map(std::mem::take)
                .collect();
            capture.ready.extend(rest);
        }
        let openai = matches!(
            self.format,
            WireFormat::ChatCompletions | WireFormat::Completions
        );
        if openai && capture.head.is_none() {
            capture.head = event.sse().json();
        }
        if event.view().kind() == Some("response.created") {
            capture.head = event
                .sse()
                .json()
                .and_then(|mut d| d.get_mut("response").map(Value::take));
        }
    }

    /// Strings of an event that repeats text already streamed (`*.done`, `response.completed`):
    /// masked as the stream was.
    fn mask_repeats(&mut self, event: &mut StreamEvent<'_>) {
        if self.streams.values().all(|s| s.masked().is_empty()) {
            return;
        }
        let policy = self.policy.clone();
        event.edit_json(|doc| {
            let mut changed = false;
            mask_strings(doc, &policy, &mut changed);
            changed
        });
    }
}

/// The events that end a blocked stream in `format`'s protocol: for OpenAI a chunk with
/// `finish_reason: "content_filter"` for each open choice (`head`: an event of the stream, for
/// its `id`, `object`, `created` and `model`) and `[DONE]`; for Anthropic an `error` event; for
/// the Responses API `response.incomplete` (`head`: the stream's `response` object).
pub(crate) fn blocked_tail(
    format: WireFormat,
    message: &str,
    head: Option<&Value>,
    choices: &[u32],
) -> Bytes {
    let event =
        |name: Option<&str>, data: Value| SseEvent::new(name, &data.to_string()).raw().to_vec();
    let tail = match format {
        WireFormat::AnthropicMessages => event(
            Some("error"),
            json!({"type": "error", "error": {"type": "content_filter", "message": message}}),
        ),
        WireFormat::Responses => {
            let mut response = head
                .cloned()
                .unwrap_or_else(|| json!({"object": "response"}));
            if let Some(r) = response.as_object_mut() {
                r.insert("status".into(), json!("incomplete"));
                r.insert(
                    "incomplete_details".into(),
                    json!({"reason": "content_filter"}),
                );
                r.insert("output".into(), json!([]));
            }
            event(
                Some("response.incomplete"),
                json!({"type": "response.incomplete", "response": response}),
            )
        }
        _ => {
            let mut chunk = serde_json::Map::new();
            for field in ["id", "object", "created", "model"] {
                if let Some(v) = head.and_then(|h| h.get(field)) {
                    chunk.insert(field.into(), v.clone());
                }
            }
            let completions = format == WireFormat::Completions;
            let choices: Vec<Value> = choices
                .iter()
                .copied()
                .chain(choices.is_empty().then_some(0))
                .map(|index| {
                    if completions {
                        json!({"index": index, "text": "", "finish_reason": "content_filter"})
                    } else {
                        json!({"index": index, "delta": {}, "finish_reason": "content_filter"})
                    }
                })
                .collect();
            chunk.insert("choices".into(), Value::Array(choices));
            let mut out = event(None, Value::Object(chunk));
            out.extend_from_slice(b"data: [DONE]\n\n");
            out
        }
    };
    Bytes::from(tail)
}

/// A whole reply replaced by `message`, in its API's shape (`finish_reason: "content_filter"`,
/// Anthropic's `stop_reason: "refusal"`, a Responses object `incomplete`).
pub(crate) fn replace_reply(format: WireFormat, message: &str, doc: &mut Value) {
    match format {
        WireFormat::AnthropicMessages => {
            doc["content"] = json!([{"type": "text", "text": message}]);
            doc["stop_reason"] = json!("refusal");
        }
        WireFormat::Responses => {
            doc["output"] = json!([{"type": "message", "id": "msg_moderated", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": message, "annotations": []}]}]);
            doc["status"] = json!("incomplete");
            doc["incomplete_details"] = json!({"reason": "content_filter"});
            if doc.get("output_text").is_some() {
                doc["output_text"] = json!(message);
            }
        }
        format => {
            let Some(choices) = doc.get_mut("choices").and_then(Value::as_array_mut) else {
                *doc = json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": message}, "finish_reason": "content_filter"}]});
                return;
            };
            for choice in choices {
                if format == WireFormat::Completions {
                    choice["text"] = json!(message);
                } else {
                    choice["message"] = json!({"role": "assistant", "content": message});
                }
                choice["finish_reason"] = json!("content_filter");
            }
        }
    }
}

pub(crate) fn lock(capture: &SharedCapture) -> std::sync::MutexGuard<'_, Capture> {
    capture
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn mask_strings(value: &mut Value, policy: &Policy, changed: &mut bool) {
    match value {
        Value::String(text) => {
            let (_, scan) = check_text(text, policy);
            if !scan.masked().is_empty() {
                *text = mask_spans(text, scan.masked());
                *changed = true;
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|v| mask_strings(v, policy, changed)),
        Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                if !NOT_OUTPUT.contains(&key.as_str()) {
                    mask_strings(item, policy, changed);
                }
            }
        }
        _ => {}
    }
}

impl Hook for ReplyHook {
    fn interest(&self) -> Interest {
        // Output too large to read must not reach the client unchecked.
        Interest::REWRITE.fail_closed()
    }

    fn on_event(&mut self, event: &mut StreamEvent<'_>) {
        self.capture_event(event);
        if event.is_done() {
            let keys: Vec<StreamKey> = self.streams.keys().copied().collect();
            if self.finish_before(event, keys) {
                self.block(event);
            }
            return;
        }
        if event.view().kind() == Some("response.created") {
            self.response = event
                .sse()
                .json()
                .and_then(|mut d| d.get_mut("response").map(Value::take));
        }
        for i in 0..event.deltas().len() {
            let delta = &event.deltas()[i];
            self.open_choices.insert(delta.choice);
            let mode = self.policy.stream_mode;
            let scan = self
                .streams
                .entry(delta.stream_key())
                .or_insert_with(|| Scan::new(mode));
            // Read in place: the event keeps its text until the scan says what to send.
            let out = scan.push(&delta.text, &self.policy);
            let blocked = scan.is_blocked();
            event.set_delta(i, out);
            if blocked {
                return self.block(event);
            }
        }
        let kind = event.view().kind().map(str::to_owned);
        let (output, part) = event.view().position();
        let blocked = match kind.as_deref() {
            None => {
                let finished: Vec<u32> = event.view().finish_reasons().map(|(c, _)| c).collect();
                let keys: Vec<StreamKey> = self
                    .streams
                    .keys()
                    .copied()
                    .filter(|k| finished.contains(&k.0))
                    .collect();
                for c in &finished {
                    self.open_choices.remove(c);
                }
                self.finish_before(event, keys)
            }
            Some("content_block_stop") => {
                self.finish_before(event, vec![(0, part, None), (0, part, Some(part))])
            }
            Some("response.output_text.done") => {
                let blocked = self.finish_before(event, vec![(output, part, None)]);
                self.mask_repeats(event);
                blocked
            }
            Some("response.function_call_arguments.done") => {
                let blocked = self.finish_before(event, vec![(output, 0, Some(output))]);
                self.mask_repeats(event);
                blocked
            }
            Some(
                "response.content_part.done" | "response.output_item.done" | "response.completed",
            ) => {
                self.mask_repeats(event);
                false
            }
            _ => false,
        };
        if blocked {
            self.block(event);
        }
    }

    fn on_stream_end(&mut self, out: &mut BytesMut) {
        if self.findings.blocked {
            return;
        }
        let keys: Vec<StreamKey> = self.streams.keys().copied().collect();
        for key in keys {
            let (rest, blocked) = self.finish(key);
            if blocked {
                // No event left to end on: what was held is withheld.
                self.findings.blocked = true;
                return;
            }
            if !rest.is_empty() {
                out.extend_from_slice(&self.held_event(key, &rest));
            }
        }
    }

    fn on_json(&mut self, reply: &mut JsonReply<'_>) {
        // Most replies hold nothing to moderate: their strings are checked where they lie, and
        // only a reply where something is found (or one an external moderator will read) is
        // parsed into a document, checked again there and rewritten.
        if self.capture.is_none() {
            match output_texts(reply.bytes()) {
                None => return,
                Some(texts) if texts.iter().all(|text| self.clean(text)) => return,
                Some(_) => {}
            }
        }
        reply.edit(|doc| {
            if doc.get("error").is_some() {
                return false;
            }
            let changed = self.check_json(doc);
            if self.findings.blocked {
                replace_reply(self.format, &self.policy.message, doc);
                return true;
            }
            changed
        });
    }

    fn on_end(mut self: Box<Self>, _report: &UsageReport) {
        for scan in std::mem::take(&mut self.streams).values() {
            self.findings.take(scan);
            self.findings.masked += scan.masked().len();
        }
        if let Some((capture, texts)) = self.capture.take() {
            let mut capture = lock(&capture);
            let choices: BTreeSet<u32> = texts.keys().map(|k| k.0).collect();
            capture.choices = choices.into_iter().collect();
            let rest = texts.into_values().filter(|t| !t.is_empty());
            if self.policy.stream_mode == StreamMode::Buffered {
                capture.texts.extend(rest);
            } else {
                capture.ready.extend(rest);
            }
            capture.blocked = self.findings.blocked;
            if self.format == WireFormat::Responses {
                capture.head = self.response.take();
            }
        }
        let findings = &self.findings;
        if findings.flags.is_empty() {
            return;
        }
        let action = if findings.blocked {
            Action::Block
        } else if findings.masked > 0 {
            Action::Mask
        } else {
            findings.flags[0].action
        };
        let categories: Vec<&str> = findings.flags.iter().map(|f| f.category.as_str()).collect();
        for flag in &findings.flags {
            metrics::counter!("moat_moderate_flags_total", "category" => flag.category.as_str(), "action" => flag.action.as_str())
                .increment(1);
        }
        let detail = findings
            .flags
            .iter()
            .map(|f| format!("{} {:.2}", f.category, f.score))
            .collect::<Vec<_>>()
            .join(", ");
        tracing::info!(target: "moat::moderate", action = action.as_str(), categories = %detail, "reply moderated");
        if let Some(decisions) = &self.decisions {
            let outcome = match action {
                Action::Block => Outcome::Rejected {
                    status: 200,
                    code: "content_filter".into(),
                },
                Action::Mask => Outcome::Rewritten {
                    spans: u32::try_from(findings.masked).unwrap_or(u32::MAX),
                },
                Action::Shadow => Outcome::ShadowRejected {
                    code: "content_filter".into(),
                },
                _ => Outcome::Allowed,
            };
            decisions.push(
                Decision::new("moderate", outcome)
                    .with_rule(categories.join(","))
                    .with_detail(detail),
            );
        }
    }
}
