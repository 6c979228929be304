//! The walk over a request document: every field of each wire format, known or not.
//!
//! Each format's fields fall in four kinds:
//!
//! - text the model reads (messages, instructions, tool results, tool definitions, documents):
//!   segments with their role and [`Source`];
//! - request metadata that is text but not conversation (`user`, `metadata`, stop sequences,
//!   file names and URLs): segments with [`Source::Metadata`] or [`Source::Attachment`];
//! - controls (model, sampling parameters, ids, enums, base64 payloads): not text, skipped;
//! - anything else: an [`Unknown`], and every string inside it a [`Source::Unknown`] segment, so
//!   a layer can scan it, refuse it or let it pass (see [`UnknownPolicy`](super::UnknownPolicy)).
//!   Unknown fields that hold no string (a new numeric parameter) carry no text and are not
//!   reported.

use std::borrow::Cow;

use serde_json::{Map, Value};

use super::{Embedded, Role, Segment, Source, Step, Unknown, WireFormat};
use crate::json::parse_strict;

/// Collects segments while walking a document, keeping the current path on a stack.
#[derive(Default)]
pub(super) struct Collector {
    path: Vec<Step>,
    pub(super) segments: Vec<Segment>,
    pub(super) embedded: Vec<Embedded>,
    pub(super) unknowns: Vec<Unknown>,
    in_embedded: Option<usize>,
}

/// Fields every format may carry that are neither text nor a problem.
fn common_control(key: &str) -> bool {
    matches!(
        key,
        "model"
            | "stream"
            | "stream_options"
            | "temperature"
            | "top_p"
            | "top_k"
            | "seed"
            | "n"
            | "max_tokens"
            | "service_tier"
    )
}

impl Collector {
    pub(super) fn walk(format: WireFormat, root: &Map<String, Value>) -> Self {
        let mut c = Self::default();
        match format {
            WireFormat::ChatCompletions => c.chat(root),
            WireFormat::Completions => c.completions(root),
            WireFormat::Responses => c.responses(root),
            WireFormat::Embeddings => c.embeddings(root),
            WireFormat::AnthropicMessages => c.anthropic(root),
            WireFormat::Unknown => c
                .unknown_with(Cow::Borrowed("a request of no known format"), |c| {
                    c.all_strings_in(root, Role::User, Source::Unknown)
                }),
        }
        c
    }

    fn push_key(&mut self, key: &str) {
        self.path.push(Step::Key(Cow::Owned(key.to_owned())));
    }

    fn index(&mut self, index: usize) {
        self.path.push(Step::Index(index));
    }

    fn pop(&mut self) {
        self.path.pop();
    }

    fn segment(&mut self, role: Role, source: Source) {
        self.segments.push(Segment {
            role,
            source,
            path: self.path.clone(),
            embedded: self.in_embedded,
        });
    }

    /// Every field of `object`: `known` handles those it knows (returning `true`); the rest are
    /// unknown fields.
    fn fields(
        &mut self,
        object: &Map<String, Value>,
        role: Role,
        mut known: impl FnMut(&mut Self, &str, &Value) -> bool,
    ) {
        for (key, value) in object {
            self.push_key(key);
            if !known(self, key, value) {
                self.unknown(value, role, "an unknown field");
            }
            self.pop();
        }
    }

    /// Something the walk does not know: each string inside is an unknown segment, and if there
    /// is any, the place is reported.
    fn unknown(&mut self, value: &Value, role: Role, what: &'static str) {
        self.unknown_with(Cow::Borrowed(what), |c| {
            c.all_strings(value, role, Source::Unknown)
        });
    }

    /// An object of an unknown type: every string in it is unknown.
    fn unknown_object(&mut self, object: &Map<String, Value>, role: Role, what: String) {
        self.unknown_with(Cow::Owned(what), |c| {
            c.all_strings_in(object, role, Source::Unknown)
        });
    }

    fn unknown_with(&mut self, what: Cow<'static, str>, collect: impl FnOnce(&mut Self)) {
        let before = self.segments.len();
        collect(self);
        if self.segments.len() > before {
            self.unknowns.push(Unknown {
                path: self.path.clone(),
                embedded: self.in_embedded,
                what,
            });
        }
    }

    /// A string at the current path; `null` is nothing; anything else is unknown.
    fn text(&mut self, value: &Value, role: Role, source: Source) {
        match value {
            Value::String(_) => self.segment(role, source),
            Value::Null => {}
            other => self.unknown(other, role, "a value where text was expected"),
        }
    }

    /// A string, or an array of strings.
    fn texts(&mut self, value: &Value, role: Role, source: Source) {
        match value {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.index(i);
                    self.text(item, role, source);
                    self.pop();
                }
            }
            other => self.text(other, role, source),
        }
    }

    /// Every string value inside `value`, at any depth.
    fn all_strings(&mut self, value: &Value, role: Role, source: Source) {
        match value {
            Value::String(_) => self.segment(role, source),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.index(i);
                    self.all_strings(item, role, source);
                    self.pop();
                }
            }
            Value::Object(map) => self.all_strings_in(map, role, source),
            _ => {}
        }
    }

    fn all_strings_in(&mut self, map: &Map<String, Value>, role: Role, source: Source) {
        for (k, v) in map {
            self.push_key(k);
            self.all_strings(v, role, source);
            self.pop();
        }
    }

    /// Each item of an array (or a lone item), with its index pushed.
    fn each(&mut self, value: &Value, mut f: impl FnMut(&mut Self, &Value)) {
        match value {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.index(i);
                    f(self, item);
                    self.pop();
                }
            }
            other => f(self, other),
        }
    }

    /// A string that holds JSON (tool-call arguments): its string values are the segments. A
    /// string that is not strict JSON (duplicate keys included), or a bare JSON scalar, is one
    /// segment, so the provider never gets a copy of a key that was not scanned.
    fn embedded_json(&mut self, value: &Value, role: Role, source: Source) {
        let Some(text) = value.as_str() else {
            return self.text(value, role, source);
        };
        match parse_strict(text.as_bytes()) {
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
            _ => self.segment(role, source),
        }
    }

    /// An object expected at the current path; anything else is unknown.
    fn object(
        &mut self,
        value: &Value,
        role: Role,
        f: impl FnOnce(&mut Self, &Map<String, Value>),
    ) {
        match value {
            Value::Object(map) => f(self, map),
            Value::Null => {}
            other => self.unknown(other, role, "a value where an object was expected"),
        }
    }

    /// `metadata`: an object of strings (or, leniently, any JSON), all metadata.
    fn metadata(&mut self, value: &Value) {
        self.all_strings(value, Role::User, Source::Metadata);
    }

    /// A URL of an image or file: an attachment, unless it is a `data:` URL (a base64 payload).
    fn url(&mut self, value: &Value, role: Role) {
        match value.as_str() {
            Some(url)
                if url
                    .get(..5)
                    .is_some_and(|s| s.eq_ignore_ascii_case("data:")) => {}
            _ => self.text(value, role, Source::Attachment),
        }
    }

    // --- OpenAI chat completions ------------------------------------------------------------

    fn chat(&mut self, root: &Map<String, Value>) {
        self.fields(root, Role::User, |c, key, value| {
            match key {
                "messages" => c.chat_messages(value),
                "tools" => c.tools(value),
                "functions" => c.each(value, |c, f| {
                    c.object(f, Role::System, Self::function_definition)
                }),
                "response_format" => c.response_format(value),
                "prediction" => c.object(value, Role::User, |c, p| {
                    c.fields(p, Role::User, |c, key, value| match key {
                        "type" => true,
                        "content" => {
                            c.content(value, Role::User, Source::Message);
                            true
                        }
                        _ => false,
                    })
                }),
                "stop" => c.texts(value, Role::User, Source::Metadata),
                "user" | "safety_identifier" | "prompt_cache_key" => {
                    c.text(value, Role::User, Source::Metadata)
                }
                "metadata" | "web_search_options" => c.metadata(value),
                _ => {
                    return common_control(key)
                        || matches!(
                            key,
                            "max_completion_tokens"
                                | "frequency_penalty"
                                | "presence_penalty"
                                | "logit_bias"
                                | "logprobs"
                                | "top_logprobs"
                                | "parallel_tool_calls"
                                | "tool_choice"
                                | "function_call"
                                | "store"
                                | "modalities"
                                | "audio"
                                | "reasoning_effort"
                                | "verbosity"
                        )
                }
            }
            true
        });
    }

    fn chat_messages(&mut self, messages: &Value) {
        let Value::Array(messages) = messages else {
            return self.unknown(messages, Role::User, "`messages` that is not an array");
        };
        for (i, message) in messages.iter().enumerate() {
            self.index(i);
            match message {
                Value::Object(message) => self.chat_message(message),
                other => self.unknown(other, Role::User, "a message that is not an object"),
            }
            self.pop();
        }
    }

    fn chat_message(&mut self, message: &Map<String, Value>) {
        let role = Role::parse(message.get("role").and_then(Value::as_str));
        let source = match role {
            Role::System | Role::Developer => Source::Instructions,
            Role::Tool => Source::ToolResult,
            _ => Source::Message,
        };
        self.fields(message, role, |c, key, value| {
            match key {
                "role" | "tool_call_id" | "audio" | "cache_control" => {}
                "content" => c.content(value, role, source),
                "name" => c.text(value, role, Source::Name),
                "refusal" => c.text(value, role, Source::Message),
                "tool_calls" => c.each(value, |c, call| c.object(call, role, Self::tool_call)),
                "function_call" => c.object(value, role, Self::tool_call_function),
                _ => return false,
            }
            true
        });
    }

    /// One `tool_calls[]` entry: a function call, or a custom tool call.
    fn tool_call(&mut self, call: &Map<String, Value>) {
        self.fields(call, Role::Assistant, |c, key, value| {
            match key {
                "id" | "type" | "index" => {}
                "function" => c.object(value, Role::Assistant, Self::tool_call_function),
                "custom" => c.object(value, Role::Assistant, |c, custom| {
                    c.fields(custom, Role::Assistant, |c, key, value| match key {
                        "name" => true,
                        "input" => {
                            c.text(value, Role::Assistant, Source::ToolCall);
                            true
                        }
                        _ => false,
                    })
                }),
                _ => return false,
            }
            true
        });
    }

    /// `{name, arguments}`: the arguments are JSON in a string.
    fn tool_call_function(&mut self, function: &Map<String, Value>) {
        self.fields(function, Role::Assistant, |c, key, value| match key {
            "name" => true,
            "arguments" => {
                c.embedded_json(value, Role::Assistant, Source::ToolCall);
                true
            }
            _ => false,
        });
    }

    /// String content, or an array of parts (chat and Responses share the part types).
    fn content(&mut self, content: &Value, role: Role, source: Source) {
        match content {
            Value::Array(parts) => {
                for (i, part) in parts.iter().enumerate() {
                    self.index(i);
                    match part {
                        Value::Object(part) => self.part(part, role, source),
                        Value::String(_) => self.segment(role, source),
                        other => self.unknown(other, role, "a content part that is not an object"),
                    }
                    self.pop();
                }
            }
            other => self.text(other, role, source),
        }
    }

    fn part(&mut self, part: &Map<String, Value>, role: Role, source: Source) {
        let kind = part.get("type").and_then(Value::as_str);
        let known = |c: &mut Self, key: &str, value: &Value| -> bool {
            match (kind, key) {
                (_, "type" | "cache_control" | "annotations" | "logprobs") => {}
                (Some("text" | "input_text" | "output_text") | None, "text") => {
                    c.text(value, role, source)
                }
                (Some("refusal"), "refusal") => c.text(value, role, source),
                // Chat: `image_url: {url, detail}`; Responses: `image_url: "..."`.
                (Some("image_url" | "input_image"), "image_url") => match value {
                    Value::Object(image) => c.fields(image, role, |c, key, value| match key {
                        "detail" => true,
                        "url" => {
                            c.url(value, role);
                            true
                        }
                        _ => false,
                    }),
                    other => c.url(other, role),
                },
                (Some("input_image" | "input_file"), "detail" | "file_id" | "file_data") => {}
                (Some("input_file"), "file_url") => c.url(value, role),
                (Some("input_file"), "filename") => c.text(value, role, Source::Attachment),
                (Some("input_audio"), "input_audio") => {}
                (Some("file"), "file") => c.object(value, role, |c, file| {
                    c.fields(file, role, |c, key, value| match key {
                        "file_data" | "file_id" => true,
                        "filename" => {
                            c.text(value, role, Source::Attachment);
                            true
                        }
                        _ => false,
                    })
                }),
                _ => return false,
            }
            true
        };
        match kind {
            Some(
                "text" | "input_text" | "output_text" | "refusal" | "image_url" | "input_image"
                | "input_file" | "input_audio" | "file",
            )
            | None => self.fields(part, role, known),
            Some(other) => self.unknown_object(
                part,
                role,
                format!("a content part of unknown type {other:?}"),
            ),
        }
    }

    /// `tools[]`: function definitions (chat nests them under `function`; Responses and Anthropic
    /// are flat), custom tools, and built-in tools whose settings are not text.
    fn tools(&mut self, tools: &Value) {
        self.each(tools, |c, tool| {
            let Value::Object(tool) = tool else {
                return c.unknown(tool, Role::System, "a tool that is not an object");
            };
            let kind = tool.get("type").and_then(Value::as_str);
            let builtin = kind.is_some_and(|k| {
                [
                    "web_search",
                    "file_search",
                    "code_interpreter",
                    "image_generation",
                    "computer",
                    "local_shell",
                    "web_fetch",
                    "code_execution",
                    "bash",
                    "text_editor",
                    "memory",
                ]
                .iter()
                .any(|b| k.starts_with(b))
            });
            if builtin {
                return;
            }
            match (kind, tool.get("function"), tool.get("custom")) {
                (_, Some(function), _) => c.fields(tool, Role::System, |c, key, _| {
                    match key {
                        "type" => {}
                        "function" => c.object(function, Role::System, Self::function_definition),
                        _ => return false,
                    }
                    true
                }),
                (_, None, Some(custom)) => c.fields(tool, Role::System, |c, key, _| {
                    match key {
                        "type" => {}
                        "custom" => c.object(custom, Role::System, Self::function_definition),
                        _ => return false,
                    }
                    true
                }),
                (Some("function" | "custom") | None, None, None) => c.function_definition(tool),
                (Some(other), None, None) => c.unknown_object(
                    tool,
                    Role::System,
                    format!("a tool of unknown type {other:?}"),
                ),
            }
        });
    }

    /// `{name, description, parameters | input_schema | format, strict}`.
    fn function_definition(&mut self, function: &Map<String, Value>) {
        self.fields(function, Role::System, |c, key, value| {
            match key {
                "name" | "type" | "strict" | "cache_control" => {}
                "description" => c.text(value, Role::System, Source::ToolDefinition),
                "parameters" | "input_schema" | "format" => c.schema(value),
                _ => return false,
            }
            true
        });
    }

    /// A JSON schema given to the model: its descriptive strings are text to it. Keywords that
    /// name types, formats, references and patterns are not text, and property names are keys.
    fn schema(&mut self, value: &Value) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    self.push_key(k);
                    match k.as_str() {
                        "type" | "format" | "$ref" | "$schema" | "$id" | "pattern" | "required" => {
                        }
                        "description" | "title" => {
                            self.text(v, Role::System, Source::ToolDefinition)
                        }
                        "enum" | "const" | "default" | "examples" => {
                            self.all_strings(v, Role::System, Source::ToolDefinition)
                        }
                        _ => self.schema(v),
                    }
                    self.pop();
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.index(i);
                    self.schema(item);
                    self.pop();
                }
            }
            _ => {}
        }
    }

    /// `response_format` (chat) or `text.format` (Responses): a schema with a description.
    fn response_format(&mut self, value: &Value) {
        self.object(value, Role::System, |c, format| {
            c.fields(format, Role::System, |c, key, value| {
                match key {
                    "type" | "name" | "strict" => {}
                    "description" => c.text(value, Role::System, Source::ToolDefinition),
                    "schema" => c.schema(value),
                    "json_schema" => c.response_format(value),
                    _ => return false,
                }
                true
            })
        });
    }

    // --- OpenAI legacy completions and embeddings -------------------------------------------

    fn completions(&mut self, root: &Map<String, Value>) {
        self.fields(root, Role::User, |c, key, value| {
            match key {
                "prompt" | "suffix" => c.prompt(value),
                "stop" => c.texts(value, Role::User, Source::Metadata),
                "user" => c.text(value, Role::User, Source::Metadata),
                _ => {
                    return common_control(key)
                        || matches!(
                            key,
                            "best_of"
                                | "echo"
                                | "frequency_penalty"
                                | "presence_penalty"
                                | "logit_bias"
                                | "logprobs"
                        )
                }
            }
            true
        });
    }

    fn embeddings(&mut self, root: &Map<String, Value>) {
        self.fields(root, Role::User, |c, key, value| {
            match key {
                "input" => c.prompt(value),
                "user" => c.text(value, Role::User, Source::Metadata),
                _ => return common_control(key) || matches!(key, "dimensions" | "encoding_format"),
            }
            true
        });
    }

    /// A prompt or embeddings input: a string, strings, or token ids (not text).
    fn prompt(&mut self, value: &Value) {
        self.each(value, |c, item| match item {
            Value::String(_) => c.segment(Role::User, Source::Prompt),
            Value::Number(_) | Value::Null => {}
            Value::Array(ids) if ids.iter().all(Value::is_number) => {}
            other => c.unknown(other, Role::User, "a prompt that is not text or token ids"),
        });
    }

    // --- OpenAI Responses -------------------------------------------------------------------

    fn responses(&mut self, root: &Map<String, Value>) {
        self.fields(root, Role::User, |c, key, value| {
            match key {
                "instructions" => match value {
                    Value::Array(_) => c.response_items(value),
                    other => c.text(other, Role::System, Source::Instructions),
                },
                "input" => match value {
                    Value::Array(_) => c.response_items(value),
                    other => c.text(other, Role::User, Source::Message),
                },
                "tools" => c.tools(value),
                "text" => c.object(value, Role::System, |c, text| {
                    c.fields(text, Role::System, |c, key, value| {
                        match key {
                            "verbosity" => {}
                            "format" => c.response_format(value),
                            _ => return false,
                        }
                        true
                    })
                }),
                "prompt" => c.object(value, Role::User, |c, prompt| {
                    c.fields(prompt, Role::User, |c, key, value| {
                        match key {
                            "id" | "version" => {}
                            "variables" => c.object(value, Role::User, |c, vars| {
                                c.fields(vars, Role::User, |c, _, value| {
                                    c.content(value, Role::User, Source::Message);
                                    true
                                })
                            }),
                            _ => return false,
                        }
                        true
                    })
                }),
                "user" | "safety_identifier" | "prompt_cache_key" => {
                    c.text(value, Role::User, Source::Metadata)
                }
                "metadata" => c.metadata(value),
                _ => {
                    return common_control(key)
                        || matches!(
                            key,
                            "max_output_tokens"
                                | "max_tool_calls"
                                | "top_logprobs"
                                | "tool_choice"
                                | "parallel_tool_calls"
                                | "store"
                                | "background"
                                | "truncation"
                                | "reasoning"
                                | "include"
                                | "previous_response_id"
                                | "conversation"
                        )
                }
            }
            true
        });
    }

    fn response_items(&mut self, items: &Value) {
        self.each(items, |c, item| match item {
            Value::Object(item) => c.response_item(item),
            Value::String(_) => c.segment(Role::User, Source::Message),
            other => c.unknown(other, Role::User, "an input item that is not an object"),
        });
    }

    fn response_item(&mut self, item: &Map<String, Value>) {
        let kind = item.get("type").and_then(Value::as_str);
        match kind {
            Some("message") | None => {
                let role = Role::parse(item.get("role").and_then(Value::as_str));
                let source = match role {
                    Role::System | Role::Developer => Source::Instructions,
                    _ => Source::Message,
                };
                self.fields(item, role, |c, key, value| {
                    match key {
                        "type" | "role" | "id" | "status" => {}
                        "content" => c.content(value, role, source),
                        _ => return false,
                    }
                    true
                });
            }
            Some("function_call" | "custom_tool_call") => {
                self.fields(item, Role::Assistant, |c, key, value| {
                    match key {
                        "type" | "id" | "call_id" | "name" | "status" => {}
                        "arguments" => c.embedded_json(value, Role::Assistant, Source::ToolCall),
                        "input" => c.text(value, Role::Assistant, Source::ToolCall),
                        _ => return false,
                    }
                    true
                });
            }
            Some("function_call_output" | "custom_tool_call_output") => {
                self.fields(item, Role::Tool, |c, key, value| {
                    match key {
                        "type" | "id" | "call_id" | "status" => {}
                        "output" => c.content(value, Role::Tool, Source::ToolResult),
                        _ => return false,
                    }
                    true
                });
            }
            Some("reasoning") => self.fields(item, Role::Assistant, |c, key, value| {
                match key {
                    "type" | "id" | "status" | "encrypted_content" => {}
                    "summary" | "content" => c.each(value, |c, part| {
                        c.object(part, Role::Assistant, |c, part| {
                            c.fields(part, Role::Assistant, |c, key, value| match key {
                                "type" => true,
                                "text" => {
                                    c.text(value, Role::Assistant, Source::Message);
                                    true
                                }
                                _ => false,
                            })
                        })
                    }),
                    _ => return false,
                }
                true
            }),
            Some("item_reference") => {
                self.fields(item, Role::User, |_, key, _| matches!(key, "type" | "id"))
            }
            Some(other) => self.unknown_object(
                item,
                Role::User,
                format!("an input item of unknown type {other:?}"),
            ),
        }
    }

    // --- Anthropic messages -----------------------------------------------------------------

    fn anthropic(&mut self, root: &Map<String, Value>) {
        self.fields(root, Role::User, |c, key, value| {
            match key {
                "system" => c.blocks(value, Role::System, Source::Instructions),
                "messages" => {
                    let Value::Array(messages) = value else {
                        c.unknown(value, Role::User, "`messages` that is not an array");
                        return true;
                    };
                    for (i, message) in messages.iter().enumerate() {
                        c.index(i);
                        match message {
                            Value::Object(message) => {
                                let role = Role::parse(message.get("role").and_then(Value::as_str));
                                c.fields(message, role, |c, key, value| {
                                    match key {
                                        "role" => {}
                                        "content" => c.blocks(value, role, Source::Message),
                                        _ => return false,
                                    }
                                    true
                                });
                            }
                            other => {
                                c.unknown(other, Role::User, "a message that is not an object")
                            }
                        }
                        c.pop();
                    }
                }
                "tools" => c.tools(value),
                "stop_sequences" => c.texts(value, Role::User, Source::Metadata),
                "metadata" => c.metadata(value),
                _ => {
                    return common_control(key)
                        || matches!(
                            key,
                            "tool_choice" | "thinking" | "container" | "context_management"
                        )
                }
            }
            true
        });
    }

    /// Anthropic content: a string, or an array of blocks.
    fn blocks(&mut self, content: &Value, role: Role, source: Source) {
        let Value::Array(blocks) = content else {
            return self.text(content, role, source);
        };
        for (i, block) in blocks.iter().enumerate() {
            self.index(i);
            match block {
                Value::Object(block) => self.block(block, role, source),
                other => self.unknown(other, role, "a content block that is not an object"),
            }
            self.pop();
        }
    }

    fn block(&mut self, block: &Map<String, Value>, role: Role, source: Source) {
        let kind = block.get("type").and_then(Value::as_str);
        let control = |key: &str| matches!(key, "type" | "cache_control" | "citations" | "id");
        match kind {
            Some("text") => self.fields(block, role, |c, key, value| {
                match key {
                    "text" => c.text(value, role, source),
                    _ => return control(key),
                }
                true
            }),
            Some("thinking") => self.fields(block, role, |c, key, value| {
                match key {
                    "thinking" => c.text(value, Role::Assistant, Source::Message),
                    "signature" => {}
                    _ => return control(key),
                }
                true
            }),
            Some("redacted_thinking") => {
                self.fields(block, role, |_, key, _| key == "data" || control(key))
            }
            Some("image") => self.fields(block, role, |c, key, value| {
                match key {
                    "source" => c.anthropic_source(value, role),
                    _ => return control(key),
                }
                true
            }),
            Some("document" | "search_result") => self.fields(block, role, |c, key, value| {
                match key {
                    "source" => c.anthropic_source(value, role),
                    "title" | "context" => c.text(value, role, Source::Document),
                    "content" => c.blocks(value, role, Source::Document),
                    _ => return control(key),
                }
                true
            }),
            Some("tool_use" | "server_tool_use") => self.fields(block, role, |c, key, value| {
                match key {
                    "name" => {}
                    "input" => c.all_strings(value, Role::Assistant, Source::ToolCall),
                    _ => return control(key),
                }
                true
            }),
            Some(tool_result) if tool_result.ends_with("tool_result") => {
                self.fields(block, role, |c, key, value| {
                    match key {
                        "tool_use_id" | "is_error" => {}
                        "content" => c.blocks(value, Role::Tool, Source::ToolResult),
                        _ => return control(key),
                    }
                    true
                })
            }
            Some("container_upload") => {
                self.fields(block, role, |_, key, _| key == "file_id" || control(key))
            }
            Some(other) => self.unknown_object(
                block,
                role,
                format!("a content block of unknown type {other:?}"),
            ),
            None => self.unknown_object(block, role, "a content block without a type".to_owned()),
        }
    }

    /// An image or document `source`: base64 data (not text), a URL, a file id, plain text, or
    /// content blocks.
    fn anthropic_source(&mut self, value: &Value, role: Role) {
        self.object(value, role, |c, source| {
            let text = source.get("type").and_then(Value::as_str) == Some("text");
            c.fields(source, role, |c, key, value| {
                match key {
                    "type" | "media_type" | "file_id" => {}
                    "data" if text => c.text(value, role, Source::Document),
                    "data" => {}
                    "url" => c.url(value, role),
                    "content" => c.blocks(value, role, Source::Document),
                    _ => return false,
                }
                true
            })
        });
    }
}
