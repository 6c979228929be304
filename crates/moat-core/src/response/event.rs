//! Reading one streamed event, typed and borrowed: what every provider's event says.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use serde_json::json;

use crate::lenient::{count, fold_objects, object, objects, text, TextSeed};
use crate::llm::WireFormat;
use crate::sse::SseEvent;
use crate::usage::{RawUsage, Usage};

/// What a streamed piece of text is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeltaKind {
    /// Text for the user (a refusal included).
    Content,
    /// A fragment of the JSON arguments of a tool call (OpenAI) or tool use (Anthropic), with the
    /// call's index.
    ToolArguments {
        /// The tool call's (or content block's, or output item's) index.
        index: u32,
    },
}

/// Where a delta's text sits in its event's JSON, to write an edited text back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// `choices[pos].delta.content`.
    Content(usize),
    /// `choices[pos].delta.refusal`.
    Refusal(usize),
    /// `choices[pos].text` (legacy completions).
    Text(usize),
    /// `choices[pos].delta.tool_calls[call].function.arguments`.
    Arguments(usize, usize),
    /// `delta` (Responses API).
    Delta,
    /// `delta.text` (Anthropic).
    DeltaText,
    /// `delta.partial_json` (Anthropic).
    DeltaJson,
}

/// One piece of streamed text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextDelta<'a> {
    /// The choice (OpenAI chat and completions) or output item (Responses); 0 for Anthropic.
    pub choice: u32,
    /// The content block (Anthropic) or content part (Responses) within it; 0 for OpenAI chat
    /// and completions.
    pub part: u32,
    /// What the text is.
    pub kind: DeltaKind,
    /// The text.
    pub text: Cow<'a, str>,
    pub(crate) slot: Slot,
    pub(crate) edited: bool,
    /// Where the text was in the event's data, when it was read without unescaping: an edit
    /// is then spliced in there, without rebuilding the event from a parsed document.
    pub(crate) origin: Option<(usize, usize)>,
}

/// Which streamed text a delta belongs to: the choice (or output item), the content block (or
/// part), and the tool call whose arguments it is, if any. Hooks that hold text per stream key
/// their state by it.
pub type StreamKey = (u32, u32, Option<u32>);

impl TextDelta<'_> {
    /// The streamed text it belongs to.
    pub fn stream_key(&self) -> StreamKey {
        let tool = match self.kind {
            DeltaKind::ToolArguments { index } => Some(index),
            DeltaKind::Content => None,
        };
        (self.choice, self.part, tool)
    }
}

/// An event of `format`'s stream carrying `text` for the stream `key`: how a hook sends text it
/// held back (OpenAI chat or completions chunks, Anthropic `content_block_delta`, Responses
/// `*.delta` events).
pub fn text_event(format: WireFormat, key: StreamKey, text: &str) -> SseEvent {
    let (choice, part, tool) = key;
    let (name, data) = match (format, tool) {
        (WireFormat::AnthropicMessages, None) => (
            Some("content_block_delta"),
            json!({"type": "content_block_delta", "index": part, "delta": {"type": "text_delta", "text": text}}),
        ),
        (WireFormat::AnthropicMessages, Some(_)) => (
            Some("content_block_delta"),
            json!({"type": "content_block_delta", "index": part, "delta": {"type": "input_json_delta", "partial_json": text}}),
        ),
        (WireFormat::Responses, None) => (
            Some("response.output_text.delta"),
            json!({"type": "response.output_text.delta", "output_index": choice, "content_index": part, "delta": text}),
        ),
        (WireFormat::Responses, Some(_)) => (
            Some("response.function_call_arguments.delta"),
            json!({"type": "response.function_call_arguments.delta", "output_index": choice, "delta": text}),
        ),
        (WireFormat::Completions, _) => (
            None,
            json!({"object": "text_completion", "choices": [{"index": choice, "text": text, "finish_reason": null}]}),
        ),
        (_, None) => (
            None,
            json!({"object": "chat.completion.chunk", "choices": [{"index": choice, "delta": {"content": text}, "finish_reason": null}]}),
        ),
        (_, Some(call)) => (
            None,
            json!({"object": "chat.completion.chunk", "choices": [{"index": choice, "delta": {"tool_calls": [{"index": call, "function": {"arguments": text}}]}, "finish_reason": null}]}),
        ),
    };
    SseEvent::new(name, &data.to_string())
}

/// What one streamed event says, whatever the provider: text deltas, finish reasons, usage,
/// errors. Read once per event with a typed parser that borrows from the event's data.
#[derive(Debug, Clone, Default)]
pub struct EventView<'a> {
    pub(crate) kind: Option<Cow<'a, str>>,
    pub(crate) deltas: Vec<TextDelta<'a>>,
    pub(crate) finishes: Vec<(u32, Cow<'a, str>)>,
    pub(crate) usage: Option<Usage>,
    pub(crate) error: Option<Cow<'a, str>>,
    pub(crate) usage_only: bool,
    pub(crate) readable: bool,
    pub(crate) position: (u32, u32),
}

impl<'a> EventView<'a> {
    /// Reads an event's data. Data that is not JSON, or JSON whose known fields have shapes no
    /// provider sends, reads as an empty view with [`is_readable`](Self::is_readable) false.
    pub fn read(data: &'a str) -> Self {
        // Only an object is an event (a derived struct would also read an array).
        if !data.trim_start().starts_with('{') {
            return Self::default();
        }
        match serde_json::from_str::<RawEvent<'a>>(data) {
            Ok(raw) => raw.into_view(),
            Err(_) => Self::default(),
        }
    }

    /// Whether the data was read: JSON in a shape a provider sends.
    pub fn is_readable(&self) -> bool {
        self.readable
    }

    /// The data's `type` (Responses and Anthropic events), e.g. `content_block_delta`.
    pub fn kind(&self) -> Option<&str> {
        self.kind.as_deref()
    }

    /// The text pieces, in the order they appear.
    pub fn deltas(&self) -> &[TextDelta<'a>] {
        &self.deltas
    }

    /// Why choices ended: OpenAI's `finish_reason`, Anthropic's `stop_reason`, with the choice.
    pub fn finish_reasons(&self) -> impl Iterator<Item = (u32, &str)> + '_ {
        self.finishes.iter().map(|(c, r)| (*c, r.as_ref()))
    }

    /// The usage this event reports (streams report it cumulatively).
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// The message of an error event (`{"error": ...}` or Anthropic's `error` event).
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Whether this is OpenAI's usage-only chunk: no choices, and a usage object.
    pub fn is_usage_only(&self) -> bool {
        self.usage_only
    }

    /// What the event is about, for events without text: the output item and content part
    /// (Responses: `output_index`, `content_index`), or 0 and the content block (Anthropic:
    /// `index`, as in `content_block_stop`).
    pub fn position(&self) -> (u32, u32) {
        self.position
    }
}

/// Every field a provider's streamed event may carry that moat reads; unknown fields are
/// skipped without being built.
#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(rename = "type", default, borrow, deserialize_with = "text")]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "choices")]
    choices: Option<Choices<'a>>,
    // Boxed: a usage object is rare, and large, and events are moved while they are read.
    #[serde(default, deserialize_with = "object")]
    usage: Option<Box<RawUsage>>,
    #[serde(default, borrow)]
    delta: Option<Box<RawDelta<'a>>>,
    #[serde(default, deserialize_with = "count")]
    index: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    output_index: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    content_index: Option<u64>,
    /// Anthropic `message_start`: `message.usage`.
    #[serde(default, deserialize_with = "object")]
    message: Option<Box<Holder>>,
    /// Responses `response.completed` and friends: `response.usage`.
    #[serde(default, deserialize_with = "object")]
    response: Option<Box<Holder>>,
    #[serde(default, borrow)]
    error: Option<Box<RawError<'a>>>,
}

/// `choices`, read straight into text deltas and finish reasons as each choice is read.
#[derive(Default)]
struct Choices<'a> {
    count: usize,
    deltas: Vec<TextDelta<'a>>,
    finishes: Vec<(u32, Cow<'a, str>)>,
}

impl<'a> Choices<'a> {
    /// Takes in the choice at `pos` of the array.
    fn push(&mut self, pos: usize, choice: Option<RawChoice<'a>>) {
        self.count += 1;
        let Some(choice) = choice else { return };
        let i = index(choice.index);
        let deltas = &mut self.deltas;
        let mut push = |kind, text: Option<Cow<'a, str>>, slot| {
            if let Some(text) = text.filter(|t| !t.is_empty()) {
                deltas.push(TextDelta {
                    choice: i,
                    part: 0,
                    kind,
                    text,
                    slot,
                    edited: false,
                    origin: None,
                });
            }
        };
        if let Some(delta) = choice.delta {
            push(DeltaKind::Content, delta.content, Slot::Content(pos));
            push(DeltaKind::Content, delta.refusal, Slot::Refusal(pos));
            let calls = delta.tool_calls.into_iter().flatten().enumerate();
            for (call, tool) in calls.filter_map(|(c, t)| Some((c, t?))) {
                let kind = DeltaKind::ToolArguments {
                    index: index(tool.index),
                };
                let args = tool.function.and_then(|f| f.arguments);
                push(kind, args, Slot::Arguments(pos, call));
            }
        } else {
            push(DeltaKind::Content, choice.text, Slot::Text(pos));
        }
        if let Some(reason) = choice.finish_reason {
            self.finishes.push((i, reason));
        }
    }
}

fn choices<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Choices<'de>>, D::Error> {
    fold_objects(d, Choices::default(), Choices::push)
}

#[derive(Deserialize)]
struct Holder {
    #[serde(default, deserialize_with = "object")]
    usage: Option<Box<RawUsage>>,
}

#[derive(Deserialize)]
struct RawChoice<'a> {
    #[serde(default, deserialize_with = "count")]
    index: Option<u64>,
    #[serde(default, borrow, deserialize_with = "object")]
    delta: Option<RawChatDelta<'a>>,
    #[serde(default, borrow, deserialize_with = "text")]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct RawChatDelta<'a> {
    #[serde(default, borrow, deserialize_with = "text")]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    refusal: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "objects")]
    tool_calls: Option<Vec<Option<RawToolCall<'a>>>>,
}

#[derive(Deserialize)]
struct RawToolCall<'a> {
    #[serde(default, deserialize_with = "count")]
    index: Option<u64>,
    #[serde(default, borrow, deserialize_with = "object")]
    function: Option<RawFunction<'a>>,
}

#[derive(Deserialize)]
struct RawFunction<'a> {
    #[serde(default, borrow, deserialize_with = "text")]
    arguments: Option<Cow<'a, str>>,
}

/// `delta`: a string (Responses) or an object (Anthropic).
enum RawDelta<'a> {
    Text(Cow<'a, str>),
    Object {
        text: Option<Cow<'a, str>>,
        partial_json: Option<Cow<'a, str>>,
        stop_reason: Option<Cow<'a, str>>,
    },
    Other,
}

/// `error`: an object with a `message`, or a string.
struct RawError<'a>(Option<Cow<'a, str>>);

fn index(n: Option<u64>) -> u32 {
    n.and_then(|n| u32::try_from(n).ok()).unwrap_or(0)
}

impl<'a> RawEvent<'a> {
    fn into_view(self) -> EventView<'a> {
        let mut view = EventView {
            readable: true,
            ..EventView::default()
        };
        let usage = self
            .usage
            .or_else(|| self.message.and_then(|m| m.usage))
            .or_else(|| self.response.and_then(|r| r.usage));
        view.usage = usage.and_then(|u| u.into_usage());
        view.error = self.error.and_then(|e| e.0);
        if let Some(choices) = self.choices {
            view.usage_only = choices.count == 0 && view.usage.is_some();
            view.deltas = choices.deltas;
            view.finishes = choices.finishes;
            view.kind = self.kind;
            return view;
        }
        let kind = self.kind.as_deref();
        let (output, block) = (index(self.output_index), index(self.index));
        view.position = match self.output_index {
            Some(_) => (output, index(self.content_index)),
            None => (0, block),
        };
        let (choice, part) = view.position;
        let delta = |view: &mut EventView<'a>, kind, text: Cow<'a, str>, slot| {
            if !text.is_empty() {
                view.deltas.push(TextDelta {
                    choice,
                    part,
                    kind,
                    text,
                    slot,
                    edited: false,
                    origin: None,
                });
            }
        };
        match (kind, self.delta.map(|d| *d)) {
            (
                Some("response.output_text.delta" | "response.refusal.delta"),
                Some(RawDelta::Text(text)),
            ) => delta(&mut view, DeltaKind::Content, text, Slot::Delta),
            (Some("response.function_call_arguments.delta"), Some(RawDelta::Text(text))) => {
                let kind = DeltaKind::ToolArguments { index: output };
                delta(&mut view, kind, text, Slot::Delta)
            }
            (
                Some("content_block_delta"),
                Some(RawDelta::Object {
                    text, partial_json, ..
                }),
            ) => {
                if let Some(text) = text {
                    delta(&mut view, DeltaKind::Content, text, Slot::DeltaText);
                } else if let Some(json) = partial_json {
                    let kind = DeltaKind::ToolArguments { index: block };
                    delta(&mut view, kind, json, Slot::DeltaJson);
                }
            }
            (
                Some("message_delta"),
                Some(RawDelta::Object {
                    stop_reason: Some(reason),
                    ..
                }),
            ) => view.finishes.push((0, reason)),
            _ => {}
        }
        view.kind = self.kind;
        view
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for RawDelta<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct DeltaVisitor;
        impl<'de> Visitor<'de> for DeltaVisitor {
            type Value = RawDelta<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an object")
            }

            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(RawDelta::Text(Cow::Borrowed(v)))
            }

            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(RawDelta::Text(Cow::Owned(v.to_owned())))
            }

            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(RawDelta::Text(Cow::Owned(v)))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut text, mut partial_json, mut stop_reason) = (None, None, None);
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    let slot = match &*key {
                        "text" => &mut text,
                        "partial_json" => &mut partial_json,
                        "stop_reason" => &mut stop_reason,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    *slot = map.next_value_seed(TextSeed)?;
                }
                Ok(RawDelta::Object {
                    text,
                    partial_json,
                    stop_reason,
                })
            }

            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(RawDelta::Other)
            }

            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(RawDelta::Other)
            }

            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(RawDelta::Other)
            }

            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(RawDelta::Other)
            }

            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(RawDelta::Other)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(RawDelta::Other)
            }
        }
        d.deserialize_any(DeltaVisitor)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for RawError<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ErrorVisitor;
        impl<'de> Visitor<'de> for ErrorVisitor {
            type Value = RawError<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an error")
            }

            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(RawError(Some(Cow::Borrowed(v))))
            }

            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(RawError(Some(Cow::Owned(v.to_owned()))))
            }

            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(RawError(Some(Cow::Owned(v))))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut message = None;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == "message" {
                        message = map.next_value_seed(TextSeed)?;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                // An error object without a message still is one.
                Ok(RawError(Some(message.unwrap_or(Cow::Borrowed("error")))))
            }

            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(RawError(None))
            }

            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(RawError(None))
            }

            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(RawError(None))
            }

            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(RawError(None))
            }

            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(RawError(None))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(RawError(None))
            }
        }
        d.deserialize_any(ErrorVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deltas(data: &str) -> Vec<(u32, DeltaKind, String)> {
        EventView::read(data)
            .deltas()
            .iter()
            .map(|d| (d.choice * 100 + d.part, d.kind, d.text.to_string()))
            .collect()
    }

    #[test]
    fn openai_chat_and_completion_deltas() {
        let chunk = r#"{"object":"chat.completion.chunk","choices":[
            {"index":0,"delta":{"content":"Hel"}},
            {"index":1,"delta":{"tool_calls":[{"index":2,"function":{"arguments":"{\"a\""}}]}},
            {"index":2,"delta":{"content":""},"finish_reason":"stop"}],"usage":null}"#;
        assert_eq!(
            deltas(chunk),
            [
                (0, DeltaKind::Content, "Hel".to_owned()),
                (
                    100,
                    DeltaKind::ToolArguments { index: 2 },
                    "{\"a\"".to_owned()
                ),
            ]
        );
        let view = EventView::read(chunk);
        assert_eq!(view.finish_reasons().collect::<Vec<_>>(), [(2, "stop")]);
        assert!(view.usage().is_none() && !view.is_usage_only() && view.is_readable());
        assert_eq!(
            deltas(r#"{"choices":[{"index":0,"text":"abc"}]}"#),
            [(0, DeltaKind::Content, "abc".to_owned())]
        );
        assert_eq!(
            deltas(r#"{"choices":[{"index":0,"delta":{"refusal":"no"}}]}"#),
            [(0, DeltaKind::Content, "no".to_owned())]
        );
        let usage = EventView::read(
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#,
        );
        assert!(usage.is_usage_only());
        assert_eq!(usage.usage(), Some(Usage::new(3, 2)));
    }

    #[test]
    fn responses_and_anthropic_deltas() {
        assert_eq!(
            deltas(
                r#"{"type":"response.output_text.delta","output_index":1,"content_index":2,"delta":"hi"}"#
            ),
            [(102, DeltaKind::Content, "hi".to_owned())]
        );
        assert_eq!(
            deltas(
                r#"{"type":"response.function_call_arguments.delta","output_index":3,"delta":"{}"}"#
            ),
            [(300, DeltaKind::ToolArguments { index: 3 }, "{}".to_owned())]
        );
        assert_eq!(
            deltas(
                r#"{"type":"content_block_delta","index":2,"delta":{"type":"text_delta","text":"yo"}}"#
            ),
            [(2, DeltaKind::Content, "yo".to_owned())]
        );
        assert_eq!(
            deltas(
                r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"c"}}"#
            ),
            [(1, DeltaKind::ToolArguments { index: 1 }, "{\"c".to_owned())]
        );
        let stop = EventView::read(
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15}}"#,
        );
        assert_eq!(stop.finish_reasons().collect::<Vec<_>>(), [(0, "end_turn")]);
        assert_eq!(stop.usage().unwrap().output_tokens, 15);
        let start = EventView::read(
            r#"{"type":"message_start","message":{"id":"m","usage":{"input_tokens":25,"output_tokens":1}}}"#,
        );
        assert_eq!(start.usage().unwrap().input_tokens, 25);
        let done = EventView::read(
            r#"{"type":"response.completed","response":{"output":[{"content":[{"text":"x"}]}],"usage":{"input_tokens":1,"output_tokens":2}}}"#,
        );
        assert_eq!(done.kind(), Some("response.completed"));
        assert_eq!(done.usage(), Some(Usage::new(1, 2)));
        assert!(deltas(r#"{"type":"message_stop"}"#).is_empty());
        assert_eq!(
            EventView::read(r#"{"type":"content_block_stop","index":4}"#).position(),
            (0, 4)
        );
        assert_eq!(
            EventView::read(r#"{"type":"response.output_text.done","output_index":2,"content_index":1,"text":"x"}"#).position(),
            (2, 1)
        );
    }

    #[test]
    fn errors_in_every_shape() {
        for data in [
            r#"{"error":{"message":"overloaded","type":"server_error"}}"#,
            r#"{"type":"error","error":{"type":"overloaded_error","message":"overloaded"}}"#,
            r#"{"error":"overloaded"}"#,
        ] {
            assert_eq!(EventView::read(data).error(), Some("overloaded"), "{data}");
        }
        assert_eq!(EventView::read(r#"{"error":{}}"#).error(), Some("error"));
        assert_eq!(EventView::read(r#"{"error":null}"#).error(), None);
    }

    #[test]
    fn escaped_text_is_decoded_and_odd_shapes_are_tolerated() {
        let escaped = r#"{"choices":[{"index":0,"delta":{"content":"a\"b\u00e9\n"}}]}"#;
        assert_eq!(deltas(escaped)[0].2, "a\"b\u{e9}\n");
        // Fields of unexpected types read as absent, not as an unreadable event.
        let odd = r#"{"choices":[1,{"index":"x","delta":{"content":5,"tool_calls":"no"}},{"index":2,"text":"t"}],
            "usage":{"prompt_tokens":3.0,"completion_tokens":"many"},"message":"hello","index":-1}"#;
        let view = EventView::read(odd);
        assert!(view.is_readable());
        assert_eq!(
            view.deltas()
                .iter()
                .map(|d| (d.choice, &*d.text))
                .collect::<Vec<_>>(),
            [(2, "t")]
        );
        assert_eq!(view.usage(), Some(Usage::new(3, 0)));
        for unreadable in ["not json", "[1,2]", "\"s\""] {
            assert!(!EventView::read(unreadable).is_readable(), "{unreadable}");
        }
    }
}
