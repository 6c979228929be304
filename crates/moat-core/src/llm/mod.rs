//! A view over LLM wire formats, parsed once per request.
//!
//! [`LlmRequest::parse`] reads a request body of any supported format and lists its text
//! [`Segment`]s, each with the speaker's [`Role`] and where the text came from ([`Source`]):
//!
//! | format | text segments |
//! |---|---|
//! | OpenAI chat completions | `messages[].content` (string or parts), `name`, `refusal`, `tool_calls[].function.arguments` (every JSON string value inside), custom tool input, `tools[]` and `response_format` schemas, `prediction` |
//! | OpenAI completions | `prompt`, `suffix` |
//! | OpenAI Responses | `instructions`, `input` (string, messages, `function_call` arguments, `function_call_output`, reasoning summaries), prompt variables, `tools[]` and `text.format` schemas |
//! | OpenAI embeddings | `input` |
//! | Anthropic messages | `system` (string or blocks), `messages[].content` text, thinking, `tool_use.input`, `tool_result` content, documents and search results, `tools[]` schemas |
//!
//! and, as [`Source::Metadata`] and [`Source::Attachment`], the text that is not conversation
//! but still leaves with the request: `user`, `metadata`, stop sequences, image and file URLs
//! (not `data:` URLs) and file names.
//!
//! Segments can be rewritten in place with [`LlmRequest::set_text`]; every other field, known or
//! not, is kept. An unedited request serializes to exactly the bytes it was parsed from; an edit
//! changes only that string.
//!
//! # Failing closed
//!
//! A guard is only as good as its reading of the request: text it does not see reaches the
//! provider unscanned. So the parse is strict and the walk is complete:
//!
//! - The body is parsed with [`parse_strict`](crate::json::parse_strict): a key given twice (which
//!   parsers resolve differently) is refused, like malformed JSON, invalid UTF-8 and deep nesting.
//! - The walk knows every field of each format. What it does not know (a content part of a new
//!   type, `messages` that is a string, a field no API documents) is reported as an [`Unknown`],
//!   and every string inside it is a segment of [`Source::Unknown`]. Each content layer decides
//!   what to do with them by its [`UnknownPolicy`]: scan them like any other text (the default),
//!   refuse the request (400), or let them pass. The default scans rather than refuses because
//!   providers add fields often: refusing would break clients the day an SDK sends something
//!   new, while scanning gives the same guarantee, that nothing leaves unscanned.
//! - Controls (model, sampling parameters, ids, enums) and binary payloads (base64 images and
//!   audio) are not text and are not segments; unknown fields that hold no string are not
//!   reported.
//!
//! How a body reaches the parser (content types, encodings, which routes are LLM routes) is
//! [`request`](crate::request)'s part of the same policy.
//!
//! ```
//! use moat_core::llm::{LlmRequest, Role, Source, WireFormat};
//!
//! let body = br#"{"model":"gpt-4o","stream":true,"messages":[
//!     {"role":"system","content":"Be brief."},
//!     {"role":"user","content":[{"type":"text","text":"My email is a@b.co"}]}]}"#;
//! let mut request = LlmRequest::parse(body.to_vec().into(), "/v1/chat/completions").unwrap();
//! assert_eq!(request.format(), WireFormat::ChatCompletions);
//! assert_eq!(request.model(), Some("gpt-4o"));
//! assert!(request.stream());
//!
//! let (index, segment) = request.segments().enumerate().find(|(_, s)| s.role == Role::User).unwrap();
//! assert_eq!(segment.source, Source::Message);
//! assert_eq!(request.text(index), Some("My email is a@b.co"));
//! request.set_text(index, "My email is [EMAIL_1]".into());
//!
//! let out: serde_json::Value = serde_json::from_slice(&request.to_bytes()).unwrap();
//! assert_eq!(out["messages"][1]["content"][0]["text"], "My email is [EMAIL_1]");
//! ```

mod walk;

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use http::StatusCode;
use serde_json::{Map, Value};

use crate::json::{parse_strict, JsonError};
use crate::reject::Rejection;

/// Which API a request body belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireFormat {
    /// OpenAI `/v1/chat/completions`.
    ChatCompletions,
    /// OpenAI legacy `/v1/completions`.
    Completions,
    /// OpenAI `/v1/responses`.
    Responses,
    /// OpenAI `/v1/embeddings`.
    Embeddings,
    /// Anthropic `/v1/messages`.
    AnthropicMessages,
    /// JSON of no known format.
    Unknown,
}

impl WireFormat {
    /// The format an LLM route takes, by its path: `.../chat/completions`, `.../completions`,
    /// `.../responses`, `.../embeddings`, `/v1/messages` (and its `count_tokens`). `None` for
    /// any other path.
    pub fn for_path(path: &str) -> Option<Self> {
        let path = path.trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            Some(Self::ChatCompletions)
        } else if path.ends_with("/completions") {
            Some(Self::Completions)
        } else if path.ends_with("/responses") {
            Some(Self::Responses)
        } else if path.ends_with("/embeddings") {
            Some(Self::Embeddings)
        } else if path.ends_with("/v1/messages") || path.ends_with("/v1/messages/count_tokens") {
            Some(Self::AnthropicMessages)
        } else {
            None
        }
    }

    /// The format of a request to `path` with this body: by path, else by shape.
    pub fn detect(path: &str, json: &Value) -> Self {
        if let Some(format) = Self::for_path(path) {
            return format;
        }
        if json.get("messages").is_some() {
            Self::ChatCompletions
        } else if json.get("prompt").is_some() {
            Self::Completions
        } else if json.get("input").is_some() || json.get("instructions").is_some() {
            Self::Responses
        } else {
            Self::Unknown
        }
    }
}

/// Whether `model` matches any of `patterns` (exact names, or `prefix*` for a family); no
/// patterns match everything, and a request without a model matches only that.
pub fn model_matches(patterns: &[String], model: Option<&str>) -> bool {
    patterns.is_empty()
        || model.is_some_and(|model| {
            patterns.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => model.starts_with(prefix),
                None => p == model,
            })
        })
}

/// Who said a piece of text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Role {
    /// The system prompt.
    System,
    /// OpenAI's developer message.
    Developer,
    /// The end user. Unknown roles count as this: the least trusted.
    User,
    /// The model, in earlier turns.
    Assistant,
    /// A tool's output.
    Tool,
}

impl Role {
    fn parse(role: Option<&str>) -> Self {
        match role {
            Some("system") => Self::System,
            Some("developer") => Self::Developer,
            Some("assistant" | "model") => Self::Assistant,
            Some("tool" | "function") => Self::Tool,
            _ => Self::User,
        }
    }
}

/// Where a piece of text sits in the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Source {
    /// System or developer instructions.
    Instructions,
    /// Message text.
    Message,
    /// A participant's `name`.
    Name,
    /// A string value in the arguments of a tool call the model made.
    ToolCall,
    /// A tool's result, fed back to the model: third-party content.
    ToolResult,
    /// A tool's description or a descriptive string of its schema (or of a response format).
    ToolDefinition,
    /// A completions prompt or an embeddings input.
    Prompt,
    /// A document or search result handed to the model: third-party content.
    Document,
    /// Text sent with the request that the model does not read as conversation: `user`,
    /// `metadata`, stop sequences.
    Metadata,
    /// The URL or file name of an image or file.
    Attachment,
    /// A string inside something the walk does not know; see [`Unknown`].
    Unknown,
}

impl Source {
    /// Whether the model reads this text as part of its prompt (what token counts cover).
    pub fn is_prompt(self) -> bool {
        !matches!(self, Self::Metadata | Self::Attachment)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(Cow<'static, str>),
    Index(usize),
}

/// One piece of text in a request.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Segment {
    /// Who said it.
    pub role: Role,
    /// Where it sits.
    pub source: Source,
    path: Vec<Step>,
    /// Set when the text is inside a JSON document held in a string (tool-call arguments).
    embedded: Option<usize>,
}

impl Segment {
    /// The segment's location as a JSON pointer, e.g. `/messages/1/content`. Inside tool-call
    /// arguments, the pointer of the arguments string, `#`, then the pointer inside them.
    pub fn pointer(&self, request: &LlmRequest) -> String {
        request.pointer(self.embedded, &self.path)
    }
}

/// A place in a request the walk does not know, holding text: its strings are the segments of
/// [`Source::Unknown`].
#[derive(Debug, Clone)]
pub struct Unknown {
    path: Vec<Step>,
    embedded: Option<usize>,
    what: Cow<'static, str>,
}

impl Unknown {
    /// Where it is, as a JSON pointer (see [`Segment::pointer`]).
    pub fn pointer(&self, request: &LlmRequest) -> String {
        request.pointer(self.embedded, &self.path)
    }

    /// What it is, e.g. `a content part of unknown type "audio_url"`.
    pub fn what(&self) -> &str {
        &self.what
    }
}

fn push_pointer(out: &mut String, path: &[Step]) {
    for step in path {
        out.push('/');
        match step {
            Step::Key(k) => out.push_str(&k.replace('~', "~0").replace('/', "~1")),
            Step::Index(i) => out.push_str(&i.to_string()),
        }
    }
}

/// What a content layer does with text the walk does not know ([`Source::Unknown`] segments).
///
/// The gateway's `unknown = "scan_all" | "reject" | "pass"`. See the [module docs](self) for why
/// scanning is the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum UnknownPolicy {
    /// Scan it like any other text.
    #[default]
    ScanAll,
    /// Refuse the request with 400, naming what was not understood.
    Reject,
    /// Let it through unscanned (the behaviour of a layer that only knows the documented fields).
    Pass,
}

impl UnknownPolicy {
    /// Under [`Reject`](Self::Reject), a 400 naming the first unknown place, if there is one.
    pub fn check(self, request: &LlmRequest) -> Result<(), Rejection> {
        match (self, request.unknowns().first()) {
            (Self::Reject, Some(unknown)) => Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!(
                    "the request holds text this gateway does not understand, at {}: {}",
                    unknown.pointer(request),
                    unknown.what()
                ),
            )
            .with_code("unsupported_content")
            .with_param(unknown.pointer(request))),
            _ => Ok(()),
        }
    }

    /// Whether a segment is to be scanned: all of them, except unknown text under
    /// [`Pass`](Self::Pass).
    pub fn scans(self, segment: &Segment) -> bool {
        self != Self::Pass || segment.source != Source::Unknown
    }
}

/// A JSON document held in a string field, such as `tool_calls[].function.arguments`.
#[derive(Debug, Clone)]
struct Embedded {
    path: Vec<Step>,
    value: Value,
}

/// Why a body is not an LLM request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParseError {
    /// Not strict JSON.
    Json(JsonError),
    /// JSON, but its top level is not an object.
    NotAnObject,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Json(JsonError::DuplicateKey { key }) => write!(
                f,
                "request body names the key {key:?} twice in one object; send each key once"
            ),
            Self::Json(e) => write!(f, "request body is {e}"),
            Self::NotAnObject => f.write_str("request body must be a JSON object"),
        }
    }
}

impl std::error::Error for ParseError {}

impl From<ParseError> for Rejection {
    fn from(err: ParseError) -> Self {
        let code = match &err {
            ParseError::Json(JsonError::DuplicateKey { .. }) => "duplicate_key",
            ParseError::Json(JsonError::TooDeep) => "nested_too_deeply",
            ParseError::Json(_) => "invalid_json",
            ParseError::NotAnObject => "invalid_request",
        };
        Rejection::bad_request(err.to_string()).with_code(code)
    }
}

/// A parsed LLM request.
#[derive(Debug, Clone)]
pub struct LlmRequest {
    format: WireFormat,
    original: Bytes,
    json: Value,
    segments: Vec<Segment>,
    embedded: Vec<Embedded>,
    unknowns: Vec<Unknown>,
    fields: Fields,
    dirty: bool,
}

/// The top-level fields every layer asks for, read once per parse or edit: each read of the
/// document is a hashed lookup, and a stack asks a dozen times per request.
#[derive(Debug, Clone, Default)]
struct Fields {
    model: Option<Box<str>>,
    stream: bool,
    include_usage: bool,
    max_output_tokens: Option<u64>,
}

impl Fields {
    /// One pass over the top-level members (a lookup per field would hash each name).
    fn of(format: WireFormat, json: &Value) -> Self {
        let mut fields = Fields::default();
        let Value::Object(root) = json else {
            return fields;
        };
        let (mut max_tokens, mut max_completion_tokens, mut max_output_tokens) = (None, None, None);
        for (name, value) in root {
            match name.as_str() {
                "model" => fields.model = value.as_str().map(Box::from),
                "stream" => fields.stream = value.as_bool().unwrap_or(false),
                "stream_options" => {
                    fields.include_usage = value
                        .get("include_usage")
                        .and_then(Value::as_bool)
                        .unwrap_or(false);
                }
                "max_tokens" => max_tokens = count(value),
                "max_completion_tokens" => max_completion_tokens = count(value),
                "max_output_tokens" => max_output_tokens = count(value),
                _ => {}
            }
        }
        fields.max_output_tokens = match format {
            WireFormat::ChatCompletions => max_completion_tokens.or(max_tokens),
            WireFormat::Responses => max_output_tokens,
            WireFormat::Embeddings => None,
            _ => max_tokens.or(max_completion_tokens).or(max_output_tokens),
        };
        fields
    }
}

/// A JSON count (`max_tokens` and the like): an integer, or a non-negative number rounded up
/// (`1e12` is a number too); anything else is no count.
fn count(value: &Value) -> Option<u64> {
    value.as_u64().or_else(|| {
        let f = value.as_f64()?;
        // Saturates at u64::MAX; NaN cannot come out of JSON.
        (f >= 0.0).then(|| f.ceil() as u64)
    })
}

impl LlmRequest {
    /// Parses a request body sent to `path` (strictly: see the [module docs](self)).
    pub fn parse(body: Bytes, path: &str) -> Result<Self, ParseError> {
        let json = parse_strict(&body).map_err(ParseError::Json)?;
        if !json.is_object() {
            return Err(ParseError::NotAnObject);
        }
        let format = WireFormat::detect(path, &json);
        let mut request = Self {
            format,
            original: body,
            json,
            segments: Vec::new(),
            embedded: Vec::new(),
            unknowns: Vec::new(),
            fields: Fields::default(),
            dirty: false,
        };
        request.index();
        Ok(request)
    }

    fn index(&mut self) {
        self.fields = Fields::of(self.format, &self.json);
        let Value::Object(root) = &self.json else {
            return;
        };
        let walked = walk::Collector::walk(self.format, root);
        self.segments = walked.segments;
        self.embedded = walked.embedded;
        self.unknowns = walked.unknowns;
    }

    fn pointer(&self, embedded: Option<usize>, path: &[Step]) -> String {
        let mut out = String::new();
        if let Some(e) = embedded {
            push_pointer(&mut out, &self.embedded[e].path);
            out.push('#');
        }
        push_pointer(&mut out, path);
        out
    }

    /// The wire format.
    pub fn format(&self) -> WireFormat {
        self.format
    }

    /// The whole JSON document.
    pub fn json(&self) -> &Value {
        &self.json
    }

    /// The places holding text the walk does not know (see the [module docs](self)).
    pub fn unknowns(&self) -> &[Unknown] {
        &self.unknowns
    }

    /// Edits the JSON document directly, then re-indexes the segments.
    pub fn edit_json<R>(&mut self, f: impl FnOnce(&mut Value) -> R) -> R {
        let out = f(&mut self.json);
        self.dirty = true;
        self.index();
        out
    }

    /// The `model` field.
    pub fn model(&self) -> Option<&str> {
        self.fields.model.as_deref()
    }

    /// Whether the response will be streamed (`stream: true`).
    pub fn stream(&self) -> bool {
        self.fields.stream
    }

    /// Whether `stream_options.include_usage` is on.
    pub fn include_usage(&self) -> bool {
        self.fields.include_usage
    }

    /// Turns `stream_options.include_usage` on or off, keeping other stream options.
    pub fn set_include_usage(&mut self, on: bool) {
        let Value::Object(root) = &mut self.json else {
            return;
        };
        let options = root
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Map::new()));
        if !options.is_object() {
            *options = Value::Object(Map::new());
        }
        if let Value::Object(options) = options {
            options.insert("include_usage".into(), Value::Bool(on));
        }
        self.fields.include_usage = on;
        self.dirty = true;
    }

    /// The field capping output tokens for this format, and its value if set:
    /// `max_completion_tokens` or `max_tokens` (chat), `max_tokens` (completions, Anthropic),
    /// `max_output_tokens` (Responses). A number written as a float (`1e12`) counts, rounded up.
    pub fn max_output_tokens(&self) -> Option<u64> {
        self.fields.max_output_tokens
    }

    /// Sets the output token cap in this format's field (for chat, the field already present,
    /// else `max_tokens`, which every OpenAI-compatible server understands).
    pub fn set_max_output_tokens(&mut self, tokens: u64) {
        let name = match self.format {
            WireFormat::ChatCompletions if self.json.get("max_completion_tokens").is_some() => {
                "max_completion_tokens"
            }
            WireFormat::Responses => "max_output_tokens",
            WireFormat::Embeddings => return,
            _ => "max_tokens",
        };
        if let Value::Object(root) = &mut self.json {
            root.insert(name.into(), Value::from(tokens));
            // The field written is the one this format reads first.
            self.fields.max_output_tokens = Some(tokens);
            self.dirty = true;
        }
    }

    /// The text segments, in document order.
    pub fn segments(&self) -> impl ExactSizeIterator<Item = &Segment> + '_ {
        self.segments.iter()
    }

    /// Segment `index`.
    pub fn segment(&self, index: usize) -> Option<&Segment> {
        self.segments.get(index)
    }

    /// How many text segments there are.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// The text of segment `index`.
    pub fn text(&self, index: usize) -> Option<&str> {
        let segment = self.segments.get(index)?;
        let root = match segment.embedded {
            Some(e) => &self.embedded[e].value,
            None => &self.json,
        };
        walk(root, &segment.path)?.as_str()
    }

    /// Every segment with its text.
    pub fn texts(&self) -> impl Iterator<Item = (&Segment, &str)> + '_ {
        (0..self.segments.len()).filter_map(|i| Some((&self.segments[i], self.text(i)?)))
    }

    /// Replaces the text of segment `index`; `false` if there is no such segment.
    pub fn set_text(&mut self, index: usize, text: String) -> bool {
        let Some(segment) = self.segments.get(index) else {
            return false;
        };
        match segment.embedded {
            None => match walk_mut(&mut self.json, &segment.path) {
                Some(slot @ Value::String(_)) => *slot = Value::String(text),
                _ => return false,
            },
            Some(e) => {
                let embedded = &mut self.embedded[e];
                match walk_mut(&mut embedded.value, &segment.path) {
                    Some(slot @ Value::String(_)) => *slot = Value::String(text),
                    _ => return false,
                }
                // Write the document back into its string at once, so the JSON is always current.
                let serialized = embedded.value.to_string();
                if let Some(slot) = walk_mut(&mut self.json, &embedded.path) {
                    *slot = Value::String(serialized);
                }
            }
        }
        self.dirty = true;
        true
    }

    /// Whether anything was changed since parsing.
    pub fn is_modified(&self) -> bool {
        self.dirty
    }

    /// The body to send: the original bytes if nothing changed, else the edited JSON.
    pub fn to_bytes(&self) -> Bytes {
        if !self.dirty {
            return self.original.clone();
        }
        // Serializing a `Value` to a Vec cannot fail.
        Bytes::from(serde_json::to_vec(&self.json).unwrap_or_default())
    }
}

fn walk<'a>(mut value: &'a Value, path: &[Step]) -> Option<&'a Value> {
    for step in path {
        value = match step {
            Step::Key(k) => value.get(&**k)?,
            Step::Index(i) => value.get(*i)?,
        };
    }
    Some(value)
}

fn walk_mut<'a>(mut value: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    for step in path {
        value = match step {
            Step::Key(k) => value.get_mut(&**k)?,
            Step::Index(i) => value.get_mut(*i)?,
        };
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(path: &str, v: &Value) -> LlmRequest {
        LlmRequest::parse(Bytes::from(serde_json::to_vec(v).unwrap()), path).unwrap()
    }

    fn listing(r: &LlmRequest) -> Vec<(Role, Source, String, String)> {
        r.segments()
            .enumerate()
            .map(|(i, s)| {
                (
                    s.role,
                    s.source,
                    s.pointer(r),
                    r.text(i).unwrap().to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn chat_completions_every_text_field() {
        let body = json!({
            "model": "gpt-4o", "unknown_field": {"kept": [1, 2]},
            "messages": [
                {"role": "system", "content": "sys"},
                {"role": "user", "name": "bob", "content": [
                    {"type": "text", "text": "hello"},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
                ]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "send", "arguments": "{\"to\":\"a@b.co\",\"n\":3,\"tags\":[\"x\"]}"}}
                ]},
                {"role": "tool", "tool_call_id": "c1", "content": "sent"}
            ],
            "tools": [{"type": "function", "function": {"name": "send", "description": "Send mail",
                "parameters": {"type": "object", "properties": {"to": {"type": "string", "description": "recipient"}}}}}]
        });
        let r = parse("/v1/chat/completions", &body);
        assert_eq!(r.format(), WireFormat::ChatCompletions);
        let l = listing(&r);
        let expect = vec![
            (
                Role::System,
                Source::Instructions,
                "/messages/0/content",
                "sys",
            ),
            (Role::User, Source::Name, "/messages/1/name", "bob"),
            (
                Role::User,
                Source::Message,
                "/messages/1/content/0/text",
                "hello",
            ),
            (
                Role::User,
                Source::Attachment,
                "/messages/1/content/1/image_url/url",
                "https://x/y.png",
            ),
            (
                Role::Assistant,
                Source::ToolCall,
                "/messages/2/tool_calls/0/function/arguments#/to",
                "a@b.co",
            ),
            (
                Role::Assistant,
                Source::ToolCall,
                "/messages/2/tool_calls/0/function/arguments#/tags/0",
                "x",
            ),
            (
                Role::Tool,
                Source::ToolResult,
                "/messages/3/content",
                "sent",
            ),
            (
                Role::System,
                Source::ToolDefinition,
                "/tools/0/function/description",
                "Send mail",
            ),
            (
                Role::System,
                Source::ToolDefinition,
                "/tools/0/function/parameters/properties/to/description",
                "recipient",
            ),
        ];
        let expect: Vec<_> = expect
            .into_iter()
            .map(|(a, b, c, d)| (a, b, c.to_owned(), d.to_owned()))
            .collect();
        assert_eq!(l, expect);
    }

    #[test]
    fn unedited_round_trip_is_byte_exact_and_edit_changes_one_string() {
        let raw = br#"{ "model" : "m", "z": 1.50, "messages": [ {"role":"user","content":"a\u00e9b"} ], "extra": [true, null] }"#;
        let mut r = LlmRequest::parse(Bytes::from_static(raw), "/v1/chat/completions").unwrap();
        assert_eq!(&r.to_bytes()[..], &raw[..]);
        assert!(!r.is_modified());
        assert_eq!(r.text(0), Some("aéb"));
        assert!(r.set_text(0, "new \"quoted\"".into()));
        let before: Value = serde_json::from_slice(raw).unwrap();
        let mut after: Value = serde_json::from_slice(&r.to_bytes()).unwrap();
        assert_eq!(after["messages"][0]["content"], "new \"quoted\"");
        after["messages"][0]["content"] = before["messages"][0]["content"].clone();
        assert_eq!(after, before, "only the edited string changed");
        assert!(!r.set_text(99, String::new()));
    }

    #[test]
    fn tool_call_arguments_are_rewritten_as_json_inside_the_string() {
        let body = json!({"messages": [{"role": "assistant", "tool_calls": [
            {"function": {"name": "f", "arguments": "{\"q\":\"secret\",\"k\":1}"}}]}]});
        let mut r = parse("/v1/chat/completions", &body);
        assert_eq!(r.text(0), Some("secret"));
        r.set_text(0, "[REDACTED] \"x\"".into());
        let out: Value = serde_json::from_slice(&r.to_bytes()).unwrap();
        let args: Value = serde_json::from_str(
            out["messages"][0]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(args, json!({"q": "[REDACTED] \"x\"", "k": 1}));
        // Arguments that are not JSON are one text segment.
        let body = json!({"messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": "not json"}}]}]});
        assert_eq!(
            parse("/v1/chat/completions", &body).text(0),
            Some("not json")
        );
    }

    #[test]
    fn responses_api_inputs() {
        let body = json!({"model": "o4", "instructions": "be nice", "max_output_tokens": 50, "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "yo"}]},
            {"type": "function_call", "call_id": "1", "name": "f", "arguments": "{\"a\":\"b\"}"},
            {"type": "function_call_output", "call_id": "1", "output": "result"}
        ], "tools": [{"type": "function", "name": "f", "description": "does f", "parameters": {}}]});
        let r = parse("/v1/responses", &body);
        let texts: Vec<_> = r
            .texts()
            .map(|(s, t)| (s.role, s.source, t.to_owned()))
            .collect();
        assert_eq!(
            texts,
            vec![
                (Role::System, Source::Instructions, "be nice".to_owned()),
                (Role::User, Source::Message, "hi".to_owned()),
                (Role::Assistant, Source::Message, "yo".to_owned()),
                (Role::Assistant, Source::ToolCall, "b".to_owned()),
                (Role::Tool, Source::ToolResult, "result".to_owned()),
                (Role::System, Source::ToolDefinition, "does f".to_owned()),
            ]
        );
        assert_eq!(r.max_output_tokens(), Some(50));
        let simple = parse("/v1/responses", &json!({"input": "just text"}));
        assert_eq!(simple.text(0), Some("just text"));
    }

    #[test]
    fn anthropic_messages_blocks() {
        let body = json!({"model": "claude", "max_tokens": 100,
            "system": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": "plain"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "calling"},
                    {"type": "tool_use", "id": "t", "name": "f", "input": {"city": "Paris", "n": 2}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": "sunny"}]},
                    {"type": "tool_result", "tool_use_id": "u", "content": "rain"},
                    {"type": "image", "source": {"type": "base64", "data": "AAAA"}}]}
            ],
            "tools": [{"name": "f", "description": "weather", "input_schema": {"type": "object"}}]});
        let mut r = parse("/v1/messages", &body);
        assert_eq!(r.format(), WireFormat::AnthropicMessages);
        let texts: Vec<_> = r
            .texts()
            .map(|(s, t)| (s.role, s.source, t.to_owned()))
            .collect();
        assert_eq!(
            texts,
            vec![
                (Role::System, Source::Instructions, "sys".to_owned()),
                (Role::User, Source::Message, "plain".to_owned()),
                (Role::Assistant, Source::Message, "calling".to_owned()),
                (Role::Assistant, Source::ToolCall, "Paris".to_owned()),
                (Role::Tool, Source::ToolResult, "sunny".to_owned()),
                (Role::Tool, Source::ToolResult, "rain".to_owned()),
                (Role::System, Source::ToolDefinition, "weather".to_owned()),
            ]
        );
        assert_eq!(r.max_output_tokens(), Some(100));
        r.set_text(3, "Lyon".into());
        let out: Value = serde_json::from_slice(&r.to_bytes()).unwrap();
        assert_eq!(out["messages"][1]["content"][1]["input"]["city"], "Lyon");
    }

    #[test]
    fn completions_and_embeddings() {
        let c = parse(
            "/v1/completions",
            &json!({"prompt": ["a", "b"], "suffix": "s", "max_tokens": 7}),
        );
        assert_eq!(
            c.texts().map(|(_, t)| t).collect::<Vec<_>>(),
            ["a", "b", "s"]
        );
        assert_eq!(c.max_output_tokens(), Some(7));
        let e = parse("/v1/embeddings", &json!({"input": "x", "model": "e"}));
        assert_eq!(e.format(), WireFormat::Embeddings);
        assert_eq!(e.text(0), Some("x"));
        let tokens = parse("/v1/embeddings", &json!({"input": [[1, 2, 3]]}));
        assert_eq!(tokens.segment_count(), 0);
    }

    #[test]
    fn stream_options_and_max_tokens_are_set_in_place() {
        let mut r = parse(
            "/v1/chat/completions",
            &json!({"stream": true, "stream_options": {"other": 1}, "max_tokens": 10, "messages": []}),
        );
        assert!(r.stream());
        assert!(!r.include_usage());
        r.set_include_usage(true);
        r.set_max_output_tokens(5);
        assert!(r.include_usage());
        let out: Value = serde_json::from_slice(&r.to_bytes()).unwrap();
        assert_eq!(
            out["stream_options"],
            json!({"other": 1, "include_usage": true})
        );
        assert_eq!(out["max_tokens"], 5);
        let mut new = parse(
            "/v1/chat/completions",
            &json!({"messages": [], "max_completion_tokens": 9}),
        );
        assert_eq!(new.max_output_tokens(), Some(9));
        new.set_max_output_tokens(3);
        assert_eq!(new.json()["max_completion_tokens"], 3);
    }

    /// The top-level fields are read once per parse: every way of editing the document must
    /// leave them saying what the document says.
    #[test]
    fn fields_read_once_follow_every_edit() {
        let mut r = parse(
            "/v1/completions",
            &json!({"model": "a", "prompt": "p", "max_completion_tokens": 4, "max_tokens": 8}),
        );
        let fields = |r: &LlmRequest| {
            (
                r.model().map(str::to_owned),
                r.stream(),
                r.include_usage(),
                r.max_output_tokens(),
            )
        };
        assert_eq!(fields(&r), (Some("a".into()), false, false, Some(8)));
        // Completions read `max_tokens` first, which is the field the setter writes.
        r.set_max_output_tokens(2);
        assert_eq!(r.max_output_tokens(), Some(2));
        r.set_include_usage(true);
        assert!(r.include_usage());
        r.set_include_usage(false);
        assert!(!r.include_usage());
        r.edit_json(|json| {
            json["model"] = json!("b");
            json["stream"] = json!(true);
            json["stream_options"] = json!({"include_usage": true});
            json.as_object_mut().unwrap().remove("max_tokens");
        });
        assert_eq!(fields(&r), (Some("b".into()), true, true, Some(4)));
        r.edit_json(|json| json["model"] = json!(7));
        assert_eq!(r.model(), None);
        // What the document says after all of it, parsed afresh.
        let again = LlmRequest::parse(r.to_bytes(), "/v1/completions").unwrap();
        assert_eq!(fields(&again), fields(&r));
    }

    #[test]
    fn odd_shapes_are_unknown_and_their_text_is_kept_for_scanning() {
        let cases = [
            (json!({"messages": "a@b.co"}), vec!["a@b.co"], "/messages"),
            (
                json!({"messages": [1, "x", null, {"role": 5, "content": {"a": "y"}}]}),
                vec!["x", "y"],
                "/messages/1",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "u", "caption": "c"}}]}]}),
                // Every string, the type's name too: an unknown object is not trusted to say
                // which of its strings are text.
                vec!["audio_url", "u", "c"],
                "/messages/0/content/0",
            ),
            (
                json!({"messages": [{"role": "user", "content": "ok", "secret_field": "z"}]}),
                vec!["ok", "z"],
                "/messages/0/secret_field",
            ),
            (
                json!({"model": "m", "messages": [], "extra_body": {"notes": "w"}}),
                vec!["w"],
                "/extra_body",
            ),
        ];
        for (body, texts, first_unknown) in cases {
            let r = parse("/v1/chat/completions", &body);
            assert_eq!(
                r.texts().map(|(_, t)| t).collect::<Vec<_>>(),
                texts,
                "{body}"
            );
            assert_eq!(r.unknowns()[0].pointer(&r), first_unknown, "{body}");
            assert!(r
                .segments()
                .any(|s| s.source == Source::Unknown && s.role == Role::User));
        }
        let what = parse(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": "u"}]}]}),
        );
        assert_eq!(
            what.unknowns()[0].what(),
            "a content part of unknown type \"audio_url\""
        );
        // Unknown fields without text, and controls, are not reported.
        let quiet = parse(
            "/v1/chat/completions",
            &json!({"model": "m", "top_k": 40, "min_p": 0.1, "service_tier": "flex", "stream": true, "messages": []}),
        );
        assert!(quiet.unknowns().is_empty());
        assert_eq!(quiet.segment_count(), 0);
        assert!(LlmRequest::parse(Bytes::from_static(b"[1]"), "/v1/chat/completions").is_err());
        assert_eq!(
            WireFormat::detect("/custom", &json!({"prompt": "x"})),
            WireFormat::Completions
        );
        assert_eq!(
            WireFormat::detect("/custom", &json!({"x": 1})),
            WireFormat::Unknown
        );
    }

    #[test]
    fn metadata_and_attachments_are_text_too_but_not_prompt() {
        let body = json!({"model": "m", "user": "jane@x.co", "metadata": {"ticket": "T-1"}, "stop": ["END"],
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "file", "file": {"filename": "jane-cv.pdf", "file_data": "AAAA"}},
                {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]});
        let r = parse("/v1/chat/completions", &body);
        let got: Vec<_> = r.texts().map(|(s, t)| (s.source, t)).collect();
        assert_eq!(
            got,
            [
                (Source::Metadata, "jane@x.co"),
                (Source::Metadata, "T-1"),
                (Source::Metadata, "END"),
                (Source::Attachment, "jane-cv.pdf"),
            ]
        );
        assert!(r.unknowns().is_empty());
        assert!(!Source::Metadata.is_prompt() && Source::Unknown.is_prompt());
    }

    #[test]
    fn tool_arguments_with_a_repeated_key_are_one_segment() {
        // A lenient parse would keep only the last "to"; the string goes out with both.
        let args = r#"{"to":"jane@x.co","to":"b"}"#;
        let body = json!({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": args}}]}]});
        let r = parse("/v1/chat/completions", &body);
        assert_eq!(r.texts().map(|(_, t)| t).collect::<Vec<_>>(), [args]);
    }

    #[test]
    fn unknown_policy() {
        let r = parse(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": [{"type": "mystery", "text": "t"}]}]}),
        );
        let err = UnknownPolicy::Reject.check(&r).unwrap_err();
        assert_eq!(err.status(), 400);
        assert_eq!(err.code(), Some("unsupported_content"));
        assert!(
            err.message().contains("/messages/0/content/0"),
            "{}",
            err.message()
        );
        assert!(UnknownPolicy::ScanAll.check(&r).is_ok());
        let segment = r.segments().next().unwrap();
        assert!(UnknownPolicy::ScanAll.scans(segment));
        assert!(!UnknownPolicy::Pass.scans(segment));
        let known = parse(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "t"}]}),
        );
        assert!(UnknownPolicy::Reject.check(&known).is_ok());
    }

    #[test]
    fn float_counts_and_strict_parse_errors() {
        let r = parse(
            "/v1/chat/completions",
            &json!({"messages": [], "max_tokens": 1e12}),
        );
        assert_eq!(r.max_output_tokens(), Some(1_000_000_000_000));
        let r = parse(
            "/v1/chat/completions",
            &json!({"messages": [], "max_tokens": -5}),
        );
        assert_eq!(r.max_output_tokens(), None);
        let dup = LlmRequest::parse(
            Bytes::from_static(br#"{"messages":[{"role":"user","content":"a","content":"b"}]}"#),
            "/v1/chat/completions",
        )
        .unwrap_err();
        let rejection = Rejection::from(dup);
        assert_eq!(rejection.code(), Some("duplicate_key"));
        assert!(
            rejection.message().contains("\"content\""),
            "{}",
            rejection.message()
        );
    }

    #[test]
    fn model_patterns() {
        let p = vec!["gpt-4o".to_owned(), "claude-*".to_owned()];
        assert!(model_matches(&p, Some("gpt-4o")));
        assert!(model_matches(&p, Some("claude-haiku-4-5")));
        assert!(!model_matches(&p, Some("gpt-4o-mini")));
        assert!(!model_matches(&p, None));
        assert!(model_matches(&[], None));
    }

    #[test]
    fn edit_json_reindexes() {
        let mut r = parse(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "a"}]}),
        );
        r.edit_json(|v| {
            v["messages"]
                .as_array_mut()
                .unwrap()
                .insert(0, json!({"role": "system", "content": "guard"}))
        });
        assert_eq!(
            r.texts().map(|(_, t)| t).collect::<Vec<_>>(),
            ["guard", "a"]
        );
    }
}
