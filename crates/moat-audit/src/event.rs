//! What a record says about one request.
//!
//! Field names follow the OpenTelemetry semantic conventions where one exists
//! (`http.request.method`, `url.path`, `http.response.status_code`, `client.address`,
//! `gen_ai.request.model`, `gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`); moat's own
//! are prefixed `moat.`. Durations are integer microseconds and costs integer micro-dollars, so
//! the canonical form has no floats.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use moat_core::decision::Decision;
use moat_core::identity::Fingerprinter;
use moat_core::reject::Rejected;
use moat_core::usage::Usage;
use moat_core::Caller;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::chain::hex;
use crate::policy::Level;
use crate::scrub::{escape_all, Literals, Scrubber};

/// How a request ended, as its record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The response body was sent to its end.
    Completed,
    /// A layer inside (or authentication) refused it.
    Rejected,
    /// The inner service failed, or the response body failed mid-way.
    Failed,
    /// The client went away before the end.
    Abandoned,
}

impl Ending {
    fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Rejected => "rejected",
            Self::Failed => "failed",
            Self::Abandoned => "abandoned",
        }
    }
}

/// Bytes kept past the capture limit so the scrubber sees a secret that straddles it whole.
const SCRUB_SLACK: usize = 4096;

/// A body as it passed: the first bytes (up to the capture limit), a SHA-256 of all of them.
#[derive(Clone)]
pub(crate) struct Capture {
    limit: usize,
    prefix: Vec<u8>,
    sha: Sha256,
    bytes: u64,
    /// Whether the body was read to its end (a refused request's body may not be).
    pub(crate) complete: bool,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("bytes", &self.bytes)
            .field("complete", &self.complete)
            .finish_non_exhaustive()
    }
}

impl Capture {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit,
            prefix: Vec::new(),
            sha: Sha256::new(),
            bytes: 0,
            complete: false,
        }
    }

    pub(crate) fn push(&mut self, data: &[u8]) {
        self.sha.update(data);
        self.bytes += data.len() as u64;
        // A little past the limit, so a secret that straddles it is scrubbed whole before the
        // text is cut.
        let room = (self.limit + SCRUB_SLACK).saturating_sub(self.prefix.len());
        self.prefix.extend_from_slice(&data[..room.min(data.len())]);
    }

    fn into_value(self, scrubber: &dyn Scrubber, presented: &Literals) -> Value {
        let truncated = self.bytes > self.limit as u64;
        let text = String::from_utf8_lossy(&self.prefix);
        // The presented key first, whole, before a scrubber could replace part of it.
        let mut text = scrubber.scrub(&presented.scrub(&text));
        if truncated {
            let mut cut = self.limit.min(text.len());
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        let mut fields = Map::new();
        fields.insert("bytes".into(), self.bytes.into());
        fields.insert("sha256".into(), hex(&self.sha.finalize()).into());
        fields.insert("complete".into(), self.complete.into());
        fields.insert("truncated".into(), truncated.into());
        fields.insert("text".into(), text.into());
        Value::Object(fields)
    }
}

/// One request's record, before it is scrubbed, escaped and chained (on the writer thread).
pub(crate) struct RequestEvent {
    pub(crate) time: jiff::Timestamp,
    pub(crate) request_id: Option<String>,
    pub(crate) method: http::Method,
    pub(crate) path: String,
    pub(crate) grpc: bool,
    /// The caller as the layers inside identified it.
    pub(crate) caller: Option<Caller>,
    /// The client's address, as the layer found it (when no layer inside identified it).
    pub(crate) client_ip: Option<IpAddr>,
    /// The API key as presented: fingerprinted (on the writer thread) when no layer inside
    /// identified the caller, and replaced in logged bodies; never written.
    pub(crate) presented_key: Option<String>,
    /// Fingerprints the presented key when no layer inside did.
    pub(crate) fingerprinter: Option<Fingerprinter>,
    pub(crate) model: Option<Arc<str>>,
    pub(crate) upstream: Option<Arc<str>>,
    pub(crate) status: u16,
    pub(crate) ending: Ending,
    pub(crate) rejected: Option<Rejected>,
    pub(crate) duration: Duration,
    pub(crate) first_byte: Option<Duration>,
    pub(crate) usage: Option<Usage>,
    pub(crate) decisions: Vec<Decision>,
    pub(crate) level: Level,
    pub(crate) request_body: Option<Capture>,
    pub(crate) response_body: Option<Capture>,
}

impl std::fmt::Debug for RequestEvent {
    /// Without the presented key (or anything else a log line must not show).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestEvent")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("status", &self.status)
            .field("ending", &self.ending)
            .finish_non_exhaustive()
    }
}

/// Integers in records stay within 2^53, where every JSON reader (and RFC 8785's number form)
/// agrees on them.
const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).map_or(MAX_SAFE_INTEGER, |us| us.min(MAX_SAFE_INTEGER))
}

impl RequestEvent {
    /// The record's fields, scrubbed and escaped.
    pub(crate) fn into_fields(self, scrubber: &dyn Scrubber) -> Map<String, Value> {
        let mut f = Map::new();
        let mut put = |k: &str, v: Value| {
            if !v.is_null() {
                f.insert(k.to_owned(), v);
            }
        };
        put("type", "request".into());
        put("time", self.time.to_string().into());
        put("moat.request_id", self.request_id.into());
        put("moat.level", self.level.as_str().into());
        put("http.request.method", self.method.as_str().into());
        put("url.path", self.path.into());
        if self.grpc {
            put("rpc.system", "grpc".into());
        }
        let fingerprint = match (&self.caller, &self.fingerprinter, &self.presented_key) {
            (Some(caller), _, _) if caller.api_key.is_some() => caller.api_key,
            (_, Some(f), Some(key)) => Some(f.fingerprint(key.as_bytes())),
            _ => None,
        };
        put("moat.caller", fingerprint.map(|k| k.to_string()).into());
        let ip: Option<IpAddr> = self.caller.as_ref().and_then(|c| c.ip).or(self.client_ip);
        put("client.address", ip.map(|ip| ip.to_string()).into());
        if let Some(caller) = &self.caller {
            put("moat.key_id", caller.id.as_deref().into());
            put("moat.tenant", caller.tenant.as_deref().into());
            put("moat.tier", caller.tier.as_deref().into());
        }
        put("gen_ai.request.model", self.model.as_deref().into());
        put("moat.upstream", self.upstream.as_deref().into());
        put("http.response.status_code", self.status.into());
        put("moat.outcome", self.ending.as_str().into());
        if let Some(r) = &self.rejected {
            let mut error = Map::new();
            error.insert("layer".into(), r.layer.into());
            error.insert("type".into(), r.error_type.as_ref().into());
            if let Some(code) = &r.code {
                error.insert("code".into(), code.as_ref().into());
            }
            put("error", Value::Object(error));
        }
        put("moat.duration_us", micros(self.duration).into());
        put("moat.first_byte_us", self.first_byte.map(micros).into());
        let settled_cost = self.decisions.iter().find_map(|d| match &d.outcome {
            moat_core::decision::Outcome::UsageSettled {
                cost_usd_micros, ..
            } => *cost_usd_micros,
            _ => None,
        });
        if let Some(usage) = self.usage {
            put("gen_ai.usage.input_tokens", usage.input_tokens.into());
            put("gen_ai.usage.output_tokens", usage.output_tokens.into());
            if usage.cached_input_tokens > 0 {
                put(
                    "gen_ai.usage.cached_input_tokens",
                    usage.cached_input_tokens.into(),
                );
            }
        }
        put("moat.cost_usd_micros", settled_cost.into());
        put(
            "moat.decisions",
            serde_json::to_value(&self.decisions).unwrap_or(Value::Null),
        );
        // The presented key never reaches a record, whatever the scrubber does.
        let presented = Literals::new(self.presented_key);
        if let Some(body) = self.request_body {
            put("moat.request", body.into_value(scrubber, &presented));
        }
        if let Some(body) = self.response_body {
            put("moat.response", body.into_value(scrubber, &presented));
        }
        let mut value = Value::Object(f);
        escape_all(&mut value);
        match value {
            Value::Object(f) => f,
            _ => unreachable!("built as an object"),
        }
    }
}

/// The fields of a record that says events were lost or requests refused.
pub(crate) fn gap(kind: &str, count: u64) -> Map<String, Value> {
    let mut f = Map::new();
    f.insert("type".into(), kind.into());
    f.insert("time".into(), jiff::Timestamp::now().to_string().into());
    f.insert("count".into(), count.into());
    f
}

/// The fields of an event of the application's own.
pub(crate) fn custom(kind: String, mut fields: Map<String, Value>) -> Map<String, Value> {
    for reserved in ["seq", "prev", "hash"] {
        fields.remove(reserved);
    }
    fields.insert("type".into(), kind.into());
    if !fields.contains_key("time") {
        fields.insert("time".into(), jiff::Timestamp::now().to_string().into());
    }
    let mut value = Value::Object(fields);
    escape_all(&mut value);
    match value {
        Value::Object(f) => f,
        _ => unreachable!("built as an object"),
    }
}

/// The fields of the record a writer starts with.
pub(crate) fn start(origin: &str) -> Map<String, Value> {
    let mut f = Map::new();
    f.insert("type".into(), "start".into());
    f.insert("time".into(), jiff::Timestamp::now().to_string().into());
    f.insert("origin".into(), origin.into());
    f.insert("version".into(), env!("CARGO_PKG_VERSION").into());
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scrub::REDACTED;

    #[test]
    fn capture_keeps_a_prefix_and_hashes_everything() {
        let mut c = Capture::new(4);
        c.push(b"hello ");
        c.push(b"world");
        c.complete = true;
        let v = c.into_value(&crate::scrub::NoScrub, &Literals::default());
        assert_eq!(v["bytes"], 11);
        assert_eq!(v["text"], "hell");
        assert_eq!(v["truncated"], true);
        assert_eq!(v["sha256"], hex(&Sha256::digest(b"hello world")));
    }

    #[test]
    fn the_presented_key_is_removed_from_bodies_even_without_a_scrubber() {
        let mut c = Capture::new(1024);
        c.push(b"{\"note\":\"my key is sk-test-0123456789\"}");
        let v = c.into_value(
            &crate::scrub::NoScrub,
            &Literals::new(["sk-test-0123456789"]),
        );
        assert_eq!(v["text"], format!("{{\"note\":\"my key is {REDACTED}\"}}"));
    }
}
