//! A stored reply, and the two forms it is replayed in.
//!
//! A reply is stored as it came: a JSON body, or the bytes of a server-sent event stream. A
//! request that asks for the other form gets the reply converted, for OpenAI chat completions
//! (JSON to `chat.completion.chunk` events and back, tool calls and usage included); for the
//! other APIs a request in the other form is a miss, and its reply replaces the entry.

use std::time::Duration;

use bytes::Bytes;
use moat_core::llm::WireFormat;
use moat_core::sse::SseDecoder;
use serde_json::{json, Map, Value};

/// One cached reply.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) body: Bytes,
    /// A server-sent event stream (else a JSON body).
    pub(crate) sse: bool,
    pub(crate) format: WireFormat,
    /// When it was stored, on the layer's clock.
    pub(crate) stored: Duration,
}

impl Entry {
    /// Its body in the form asked for (`sse` or JSON), if it can be given in that form.
    pub(crate) fn body_as(&self, sse: bool, include_usage: bool) -> Option<Bytes> {
        match (self.sse, sse) {
            (true, true) | (false, false) => Some(self.body.clone()),
            _ if self.format != WireFormat::ChatCompletions => None,
            (true, false) => chat_stream_to_json(&self.body).map(|v| Bytes::from(v.to_string())),
            (false, true) => chat_json_to_stream(&self.body, include_usage),
        }
    }
}

/// A `chat.completion` from the `chat.completion.chunk` events of a stream.
fn chat_stream_to_json(body: &[u8]) -> Option<Value> {
    let mut decoder = SseDecoder::new();
    let events = decoder.decode(body).ok()?;
    let mut head: Option<Map<String, Value>> = None;
    let mut choices: Vec<Map<String, Value>> = Vec::new();
    let mut usage = Value::Null;
    for event in &events {
        if event.is_done() {
            break;
        }
        let Some(chunk) = event.json() else { continue };
        if head.is_none() {
            let mut first = Map::new();
            for name in [
                "id",
                "created",
                "model",
                "system_fingerprint",
                "service_tier",
            ] {
                if let Some(v) = chunk.get(name) {
                    first.insert(name.to_owned(), v.clone());
                }
            }
            head = Some(first);
        }
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            usage = u.clone();
        }
        for choice in chunk
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
            if index > 1024 {
                return None;
            }
            while choices.len() <= index {
                let mut fresh = Map::new();
                fresh.insert("index".into(), json!(choices.len()));
                fresh.insert(
                    "message".into(),
                    json!({"role": "assistant", "content": null}),
                );
                fresh.insert("logprobs".into(), Value::Null);
                fresh.insert("finish_reason".into(), Value::Null);
                choices.push(fresh);
            }
            let target = &mut choices[index];
            if let Some(reason) = choice.get("finish_reason").filter(|r| !r.is_null()) {
                target.insert("finish_reason".into(), reason.clone());
            }
            let Some(delta) = choice.get("delta") else {
                continue;
            };
            let message = target.get_mut("message")?.as_object_mut()?;
            for field in ["content", "refusal"] {
                if let Some(text) = delta.get(field).and_then(Value::as_str) {
                    let slot = message.entry(field).or_insert(Value::Null);
                    let joined = format!("{}{text}", slot.as_str().unwrap_or(""));
                    *slot = Value::String(joined);
                }
            }
            for call in delta
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let at = call.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
                let calls = message
                    .entry("tool_calls")
                    .or_insert_with(|| json!([]))
                    .as_array_mut()?;
                while calls.len() <= at {
                    calls.push(json!({"id": null, "type": "function", "function": {"name": "", "arguments": ""}}));
                }
                let target = &mut calls[at];
                for name in ["id", "type"] {
                    if let Some(v) = call.get(name).filter(|v| !v.is_null()) {
                        target[name] = v.clone();
                    }
                }
                for name in ["name", "arguments"] {
                    if let Some(piece) = call
                        .pointer(&format!("/function/{name}"))
                        .and_then(Value::as_str)
                    {
                        let joined =
                            format!("{}{piece}", target["function"][name].as_str().unwrap_or(""));
                        target["function"][name] = Value::String(joined);
                    }
                }
            }
        }
    }
    let mut reply = head?;
    reply.insert("object".into(), json!("chat.completion"));
    reply.insert(
        "choices".into(),
        Value::Array(choices.into_iter().map(Value::Object).collect()),
    );
    if !usage.is_null() {
        reply.insert("usage".into(), usage);
    }
    Some(Value::Object(reply))
}

/// The events of a stream carrying a `chat.completion`: each choice's message in one delta, a
/// last chunk with the finish reasons, the usage when asked for, then `[DONE]`.
fn chat_json_to_stream(body: &[u8], include_usage: bool) -> Option<Bytes> {
    let reply: Value = serde_json::from_slice(body).ok()?;
    let mut head = Map::new();
    for name in [
        "id",
        "created",
        "model",
        "system_fingerprint",
        "service_tier",
    ] {
        if let Some(v) = reply.get(name) {
            head.insert(name.to_owned(), v.clone());
        }
    }
    head.insert("object".into(), json!("chat.completion.chunk"));
    let chunk = |choices: Value, usage: Option<&Value>| {
        let mut c = head.clone();
        c.insert("choices".into(), choices);
        if let Some(usage) = usage {
            c.insert("usage".into(), usage.clone());
        }
        format!("data: {}\n\n", Value::Object(c))
    };
    let mut out = String::new();
    let choices = reply.get("choices")?.as_array()?;
    let mut finishes = Vec::new();
    for choice in choices {
        let index = choice.get("index").cloned().unwrap_or(json!(0));
        let message = choice.get("message")?;
        let mut delta = Map::new();
        delta.insert("role".into(), json!("assistant"));
        for field in ["content", "refusal"] {
            if let Some(v) = message.get(field).filter(|v| !v.is_null()) {
                delta.insert(field.into(), v.clone());
            }
        }
        if let Some(calls) = message.get("tool_calls").and_then(Value::as_array) {
            let indexed: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(i, call)| {
                    let mut call = call.clone();
                    call["index"] = json!(i);
                    call
                })
                .collect();
            delta.insert("tool_calls".into(), Value::Array(indexed));
        }
        out.push_str(&chunk(
            json!([{"index": index, "delta": delta, "logprobs": null, "finish_reason": null}]),
            None,
        ));
        finishes.push(json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": choice.get("finish_reason").cloned().unwrap_or(json!("stop"))}));
    }
    out.push_str(&chunk(Value::Array(finishes), None));
    if include_usage {
        if let Some(usage) = reply.get("usage") {
            out.push_str(&chunk(json!([]), Some(usage)));
        }
    }
    out.push_str("data: [DONE]\n\n");
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPLY: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":7,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there","tool_calls":[{"id":"call_1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},"logprobs":null,"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;

    #[test]
    fn a_chat_reply_survives_json_to_stream_to_json() {
        let stream = chat_json_to_stream(REPLY.as_bytes(), true).unwrap();
        let text = std::str::from_utf8(&stream).unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"));
        assert!(text.contains("chat.completion.chunk"));
        let back = chat_stream_to_json(&stream).unwrap();
        let original: Value = serde_json::from_str(REPLY).unwrap();
        assert_eq!(back["choices"][0]["message"]["content"], "Hello there");
        assert_eq!(
            back["choices"][0]["message"]["tool_calls"],
            original["choices"][0]["message"]["tool_calls"]
        );
        assert_eq!(back["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(back["usage"], original["usage"]);
        assert_eq!(back["id"], "chatcmpl-1");
        // Without include_usage, no usage chunk.
        let quiet = chat_json_to_stream(REPLY.as_bytes(), false).unwrap();
        assert!(!std::str::from_utf8(&quiet)
            .unwrap()
            .contains("total_tokens"));
    }

    #[test]
    fn deltas_split_anywhere_are_joined() {
        let stream = "data: {\"id\":\"c\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hel\"},\"finish_reason\":null}]}\n\n\
            data: {\"id\":\"c\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":null}]}\n\n\
            data: {\"id\":\"c\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
            data: [DONE]\n\n";
        let reply = chat_stream_to_json(stream.as_bytes()).unwrap();
        assert_eq!(reply["object"], "chat.completion");
        assert_eq!(reply["choices"][0]["message"]["content"], "Hello");
        assert_eq!(reply["choices"][0]["finish_reason"], "stop");
    }
}
