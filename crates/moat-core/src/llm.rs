//! A view over LLM wire formats, parsed once per request.
//!
//! [`LlmRequest::parse`] reads a request body of any supported format and lists its text
//! [`Segment`]s, each with the speaker's [`Role`] and where the text came from ([`Source`]):
//!
//! | format | text segments |
//! |---|---|
//! | OpenAI chat completions | `messages[].content` (string or text parts), `name`, `tool_calls[].function.arguments` (every JSON string value inside), `tools[]` descriptions |
//! | OpenAI completions | `prompt`, `suffix` |
//! | OpenAI Responses | `instructions`, `input` (string, messages, `function_call` arguments, `function_call_output`), `tools[]` descriptions |
//! | OpenAI embeddings | `input` |
//! | Anthropic messages | `system` (string or blocks), `messages[].content` text, `tool_use.input`, `tool_result` content, `tools[]` descriptions |
//!
//! Segments can be rewritten in place with [`LlmRequest::set_text`]; every other field, known or
//! not, is kept. An unedited request serializes to exactly the bytes it was parsed from; an edit
//! changes only that string.
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

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::body::parse_json;
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
    /// The format of a request to `path` with this body: by path, else by shape.
    pub fn detect(path: &str, json: &Value) -> Self {
        let path = path.trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            Self::ChatCompletions
        } else if path.ends_with("/completions") {
            Self::Completions
        } else if path.ends_with("/responses") {
            Self::Responses
        } else if path.ends_with("/embeddings") {
            Self::Embeddings
        } else if path.ends_with("/messages") {
            Self::AnthropicMessages
        } else if json.get("messages").is_some() {
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
    /// A tool's description or parameter description.
    ToolDefinition,
    /// A completions prompt or an embeddings input.
    Prompt,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(Box<str>),
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
        let mut out = String::new();
        if let Some(e) = self.embedded {
            push_pointer(&mut out, &request.embedded[e].path);
            out.push('#');
        }
        push_pointer(&mut out, &self.path);
        out
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

/// A JSON document held in a string field, such as `tool_calls[].function.arguments`.
#[derive(Debug, Clone)]
struct Embedded {
    path: Vec<Step>,
    value: Value,
}

/// A parsed LLM request.
#[derive(Debug, Clone)]
pub struct LlmRequest {
    format: WireFormat,
    original: Bytes,
    json: Value,
    segments: Vec<Segment>,
    embedded: Vec<Embedded>,
    dirty: bool,
}

impl LlmRequest {
    /// Parses a request body sent to `path`. Malformed JSON, over-deep nesting and a top level
    /// that is not an object are 400 rejections.
    pub fn parse(body: Bytes, path: &str) -> Result<Self, Rejection> {
        let json = parse_json(&body)?;
        if !json.is_object() {
            return Err(Rejection::bad_request("request body must be a JSON object"));
        }
        let format = WireFormat::detect(path, &json);
        let mut request = Self {
            format,
            original: body,
            json,
            segments: Vec::new(),
            embedded: Vec::new(),
            dirty: false,
        };
        request.index();
        Ok(request)
    }

    fn index(&mut self) {
        let mut collector = Collector::default();
        if let Value::Object(root) = &self.json {
            match self.format {
                WireFormat::ChatCompletions => collector.chat(root),
                WireFormat::Completions => collector.completions(root),
                WireFormat::Responses => collector.responses(root),
                WireFormat::Embeddings => collector.embeddings(root),
                WireFormat::AnthropicMessages => collector.anthropic(root),
                WireFormat::Unknown => {}
            }
        }
        self.segments = collector.segments;
        self.embedded = collector.embedded;
    }

    /// The wire format.
    pub fn format(&self) -> WireFormat {
        self.format
    }

    /// The whole JSON document.
    pub fn json(&self) -> &Value {
        &self.json
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
        self.json.get("model").and_then(Value::as_str)
    }

    /// Whether the response will be streamed (`stream: true`).
    pub fn stream(&self) -> bool {
        self.json
            .get("stream")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// Whether `stream_options.include_usage` is on.
    pub fn include_usage(&self) -> bool {
        self.json
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false)
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
        self.dirty = true;
    }

    /// The field capping output tokens for this format, and its value if set:
    /// `max_completion_tokens` or `max_tokens` (chat), `max_tokens` (completions, Anthropic),
    /// `max_output_tokens` (Responses).
    pub fn max_output_tokens(&self) -> Option<u64> {
        let field = |name: &str| self.json.get(name).and_then(Value::as_u64);
        match self.format {
            WireFormat::ChatCompletions => {
                field("max_completion_tokens").or_else(|| field("max_tokens"))
            }
            WireFormat::Responses => field("max_output_tokens"),
            WireFormat::Embeddings => None,
            _ => field("max_tokens")
                .or_else(|| field("max_completion_tokens"))
                .or_else(|| field("max_output_tokens")),
        }
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
            self.dirty = true;
        }
    }

    /// The text segments, in document order.
    pub fn segments(&self) -> impl ExactSizeIterator<Item = &Segment> + '_ {
        self.segments.iter()
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

/// Collects segments while walking a document, keeping the current path on a stack.
#[derive(Default)]
struct Collector {
    path: Vec<Step>,
    segments: Vec<Segment>,
    embedded: Vec<Embedded>,
    in_embedded: Option<usize>,
}

impl Collector {
    fn key(&mut self, key: &str) {
        self.path.push(Step::Key(key.into()));
    }

    fn index(&mut self, index: usize) {
        self.path.push(Step::Index(index));
    }

    fn pop(&mut self) {
        self.path.pop();
    }

    /// `value` (at the current path) if it is a string.
    fn text(&mut self, value: &Value, role: Role, source: Source) {
        if value.is_string() {
            self.segments.push(Segment {
                role,
                source,
                path: self.path.clone(),
                embedded: self.in_embedded,
            });
        }
    }

    /// `object[key]` if it is a string.
    fn field(&mut self, object: &Map<String, Value>, key: &str, role: Role, source: Source) {
        if let Some(value) = object.get(key) {
            self.key(key);
            self.text(value, role, source);
            self.pop();
        }
    }

    /// Every string value inside `value`, at any depth.
    fn all_strings(&mut self, value: &Value, role: Role, source: Source) {
        match value {
            Value::String(_) => self.text(value, role, source),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.index(i);
                    self.all_strings(item, role, source);
                    self.pop();
                }
            }
            Value::Object(map) => {
                for (k, v) in map {
                    self.key(k);
                    self.all_strings(v, role, source);
                    self.pop();
                }
            }
            _ => {}
        }
    }

    /// A string that holds JSON (tool-call arguments): its string values are the segments. A
    /// string that is not JSON, or is a bare JSON string, is one segment.
    fn embedded_json(&mut self, value: &Value, role: Role, source: Source) {
        let Some(text) = value.as_str() else { return };
        match serde_json::from_str::<Value>(text) {
            Ok(parsed @ (Value::Object(_) | Value::Array(_))) if self.in_embedded.is_none() => {
                let id = self.embedded.len();
                let outer = std::mem::take(&mut self.path);
                self.embedded.push(Embedded {
                    path: outer.clone(),
                    value: Value::Null,
                });
                self.in_embedded = Some(id);
                self.all_strings(&parsed, role, source);
                self.in_embedded = None;
                self.path = outer;
                self.embedded[id].value = parsed;
            }
            _ => self.text(value, role, source),
        }
    }

    /// String content, or an array of parts/blocks whose text parts are segments.
    fn content(&mut self, content: &Value, role: Role, source: Source) {
        match content {
            Value::String(_) => self.text(content, role, source),
            Value::Array(parts) => {
                for (i, part) in parts.iter().enumerate() {
                    let Some(part) = part.as_object() else {
                        continue;
                    };
                    self.index(i);
                    match part.get("type").and_then(Value::as_str) {
                        Some("text" | "input_text" | "output_text") | None => {
                            self.field(part, "text", role, source)
                        }
                        Some("refusal") => self.field(part, "refusal", role, source),
                        _ => {}
                    }
                    self.pop();
                }
            }
            _ => {}
        }
    }

    /// `description` strings of tools and of every property in their parameter schemas.
    fn tools(&mut self, root: &Map<String, Value>) {
        let Some(Value::Array(tools)) = root.get("tools") else {
            return;
        };
        self.key("tools");
        for (i, tool) in tools.iter().enumerate() {
            self.index(i);
            // OpenAI chat nests under `function`; Responses and Anthropic are flat.
            if let Some(Value::Object(function)) = tool.get("function") {
                self.key("function");
                self.tool_definition(function);
                self.pop();
            } else if let Value::Object(tool) = tool {
                self.tool_definition(tool);
            }
            self.pop();
        }
        self.pop();
    }

    fn tool_definition(&mut self, tool: &Map<String, Value>) {
        self.field(tool, "description", Role::System, Source::ToolDefinition);
        for schema in ["parameters", "input_schema"] {
            if let Some(value) = tool.get(schema) {
                self.key(schema);
                self.schema_descriptions(value);
                self.pop();
            }
        }
    }

    fn schema_descriptions(&mut self, value: &Value) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    self.key(k);
                    if k == "description" {
                        self.text(v, Role::System, Source::ToolDefinition);
                    } else {
                        self.schema_descriptions(v);
                    }
                    self.pop();
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.index(i);
                    self.schema_descriptions(item);
                    self.pop();
                }
            }
            _ => {}
        }
    }

    fn each<'v>(
        &mut self,
        root: &'v Map<String, Value>,
        key: &str,
        mut f: impl FnMut(&mut Self, &'v Value),
    ) {
        match root.get(key) {
            Some(Value::Array(items)) => {
                self.key(key);
                for (i, item) in items.iter().enumerate() {
                    self.index(i);
                    f(self, item);
                    self.pop();
                }
                self.pop();
            }
            Some(other) => {
                self.key(key);
                f(self, other);
                self.pop();
            }
            None => {}
        }
    }

    fn chat(&mut self, root: &Map<String, Value>) {
        if let Some(Value::Array(messages)) = root.get("messages") {
            self.key("messages");
            for (i, message) in messages.iter().enumerate() {
                let Some(message) = message.as_object() else {
                    continue;
                };
                self.index(i);
                let role = Role::parse(message.get("role").and_then(Value::as_str));
                let source = match role {
                    Role::System | Role::Developer => Source::Instructions,
                    Role::Tool => Source::ToolResult,
                    _ => Source::Message,
                };
                if let Some(content) = message.get("content") {
                    self.key("content");
                    self.content(content, role, source);
                    self.pop();
                }
                self.field(message, "name", role, Source::Name);
                self.each(message, "tool_calls", |c, call| {
                    if let Some(Value::Object(function)) = call.get("function") {
                        c.key("function");
                        if let Some(args) = function.get("arguments") {
                            c.key("arguments");
                            c.embedded_json(args, Role::Assistant, Source::ToolCall);
                            c.pop();
                        }
                        c.pop();
                    }
                });
                if let Some(Value::Object(call)) = message.get("function_call") {
                    self.key("function_call");
                    if let Some(args) = call.get("arguments") {
                        self.key("arguments");
                        self.embedded_json(args, Role::Assistant, Source::ToolCall);
                        self.pop();
                    }
                    self.pop();
                }
                self.pop();
            }
            self.pop();
        }
        self.tools(root);
    }

    fn completions(&mut self, root: &Map<String, Value>) {
        self.each(root, "prompt", |c, p| c.text(p, Role::User, Source::Prompt));
        self.field(root, "suffix", Role::User, Source::Prompt);
    }

    fn embeddings(&mut self, root: &Map<String, Value>) {
        self.each(root, "input", |c, p| c.text(p, Role::User, Source::Prompt));
    }

    fn responses(&mut self, root: &Map<String, Value>) {
        self.field(root, "instructions", Role::System, Source::Instructions);
        match root.get("input") {
            Some(input @ Value::String(_)) => {
                self.key("input");
                self.text(input, Role::User, Source::Message);
                self.pop();
            }
            Some(Value::Array(_)) => self.each(root, "input", |c, item| {
                let Some(item) = item.as_object() else { return };
                match item.get("type").and_then(Value::as_str) {
                    Some("message") | None => {
                        let role = Role::parse(item.get("role").and_then(Value::as_str));
                        let source = match role {
                            Role::System | Role::Developer => Source::Instructions,
                            _ => Source::Message,
                        };
                        if let Some(content) = item.get("content") {
                            c.key("content");
                            c.content(content, role, source);
                            c.pop();
                        }
                    }
                    Some("function_call") => {
                        if let Some(args) = item.get("arguments") {
                            c.key("arguments");
                            c.embedded_json(args, Role::Assistant, Source::ToolCall);
                            c.pop();
                        }
                    }
                    Some("function_call_output") => {
                        if let Some(output) = item.get("output") {
                            c.key("output");
                            c.content(output, Role::Tool, Source::ToolResult);
                            c.pop();
                        }
                    }
                    _ => {}
                }
            }),
            _ => {}
        }
        self.tools(root);
    }

    fn anthropic(&mut self, root: &Map<String, Value>) {
        if let Some(system) = root.get("system") {
            self.key("system");
            self.content(system, Role::System, Source::Instructions);
            self.pop();
        }
        if let Some(Value::Array(messages)) = root.get("messages") {
            self.key("messages");
            for (i, message) in messages.iter().enumerate() {
                let Some(message) = message.as_object() else {
                    continue;
                };
                self.index(i);
                let role = Role::parse(message.get("role").and_then(Value::as_str));
                match message.get("content") {
                    Some(content @ Value::String(_)) => {
                        self.key("content");
                        self.text(content, role, Source::Message);
                        self.pop();
                    }
                    Some(Value::Array(_)) => self.each(message, "content", |c, block| {
                        let Some(block) = block.as_object() else {
                            return;
                        };
                        match block.get("type").and_then(Value::as_str) {
                            Some("text") => c.field(block, "text", role, Source::Message),
                            Some("tool_use") => {
                                if let Some(input) = block.get("input") {
                                    c.key("input");
                                    c.all_strings(input, Role::Assistant, Source::ToolCall);
                                    c.pop();
                                }
                            }
                            Some("tool_result") => {
                                if let Some(content) = block.get("content") {
                                    c.key("content");
                                    c.content(content, Role::Tool, Source::ToolResult);
                                    c.pop();
                                }
                            }
                            _ => {}
                        }
                    }),
                    _ => {}
                }
                self.pop();
            }
            self.pop();
        }
        self.tools(root);
    }
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
            (
                Role::User,
                Source::Message,
                "/messages/1/content/0/text",
                "hello",
            ),
            (Role::User, Source::Name, "/messages/1/name", "bob"),
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

    #[test]
    fn odd_shapes_are_skipped_not_fatal() {
        for body in [
            json!({"messages": "nope"}),
            json!({"messages": [1, "x", null, {"role": 5, "content": {"a": 1}}]}),
            json!({"messages": [{"content": [1, {"type": "text", "text": 5}]}], "tools": "x"}),
        ] {
            let r = parse("/v1/chat/completions", &body);
            assert_eq!(r.segment_count(), 0, "{body}");
        }
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
