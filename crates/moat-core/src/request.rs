//! The request body read and parsed once, and shared by every layer handling the request.
//!
//! The first content layer calls [`read_llm_request`]: it buffers the body under a cap, parses
//! it into an [`LlmRequest`], stores a [`SharedLlmRequest`] in the request extensions and hands
//! on a body that serializes the shared request when the inner service reads it. Every later
//! layer finds the shared request and reads or edits it instead of the body.
//!
//! # Which bodies reach the parser
//!
//! On an LLM route (a path [`WireFormat::for_path`] knows: `.../chat/completions`,
//! `.../completions`, `.../responses`, `.../embeddings`, `/v1/messages`) a body is parsed
//! whatever its `content-type` says, because providers and the servers in front of them often
//! read JSON whatever the header says: a guard that skipped `text/plain` would let a changed
//! header carry a prompt past it. So:
//!
//! | route | `content-type` | body | outcome |
//! |---|---|---|---|
//! | LLM | any | parses | parsed; `content-type` set to `application/json` for the provider |
//! | LLM | JSON or absent | does not parse | 400, saying where |
//! | LLM | anything else | does not parse | 415 |
//! | LLM | any, with a `content-encoding` | | 415 (compressed bodies cannot be scanned) |
//! | LLM | any | empty | handed on (nothing to scan) |
//! | other | JSON or absent | parses, in a known shape | parsed |
//! | other | JSON | does not parse | 400 |
//! | other | absent, or JSON of no known shape | | handed on as it came |
//! | other | anything else | | handed on unread |
//!
//! A body over the cap is a 413, one that stops arriving before the server's read deadline a
//! 408, one that fails a 400. Within a parsed request, what the walk does not know is each
//! layer's call: see [`llm`](crate::llm#failing-closed).
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use moat_core::request::{read_llm_request, LlmBody};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // `curl -d` sends JSON as a form; on an LLM route it is read as what it is.
//! let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
//! let req = http::Request::post("/v1/chat/completions")
//!     .header("content-type", "application/x-www-form-urlencoded")
//!     .body(Full::new(Bytes::from(body)))
//!     .unwrap();
//! let LlmBody::Parsed { request, llm } = read_llm_request(req, 1 << 20).await.unwrap() else {
//!     panic!("an LLM route is always parsed");
//! };
//! assert_eq!(request.headers()["content-type"], "application/json");
//! assert_eq!(llm.with(|r| r.text(0).map(str::to_owned)).as_deref(), Some("hi"));
//! # }
//! ```

use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, StatusCode};
use http_body::Body;

use crate::body::{buffer, RequestBody};
use crate::llm::{LlmRequest, WireFormat};
use crate::reject::Rejection;
use crate::tokens::{self, Estimate};

/// A parsed LLM request shared by every layer handling one request.
///
/// The first content layer that reads the body stores one in the request extensions and hands
/// on a body built from it; later layers find it there and edit it instead of reading the body
/// again. The body is serialized when the inner service first polls it.
#[derive(Debug, Clone)]
pub struct SharedLlmRequest(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    request: Mutex<LlmRequest>,
    /// The prompt's token count, exact where it can be, then the byte bound: each made once.
    counted: [OnceLock<Estimate>; 2],
}

impl SharedLlmRequest {
    /// Wraps a parsed request.
    pub fn new(request: LlmRequest) -> Self {
        Self(Arc::new(Shared {
            request: Mutex::new(request),
            counted: [OnceLock::new(), OnceLock::new()],
        }))
    }

    /// Runs `f` with the request. Keep `f` short: do not await inside.
    pub fn with<R>(&self, f: impl FnOnce(&mut LlmRequest) -> R) -> R {
        f(&mut self
            .0
            .request
            .lock()
            .unwrap_or_else(PoisonError::into_inner))
    }

    /// The prompt's tokens: counted exactly where the model's tokenizer is known (`exact`), or
    /// the byte-length upper bound. Counted once per request, by the first layer that asks
    /// (layers that count sit outside those that edit text, so this is the prompt the client
    /// sent); every other layer gets the same count.
    pub fn input_tokens(&self, exact: bool) -> Estimate {
        *self.0.counted[usize::from(!exact)].get_or_init(|| {
            self.with(|r| {
                if exact {
                    tokens::estimate_input(r)
                } else {
                    tokens::estimate_input_upper_bound(r)
                }
            })
        })
    }

    fn to_bytes(&self) -> Bytes {
        self.with(|request| request.to_bytes())
    }
}

/// Marks a request whose body an outer layer read and found not to be an LLM request.
#[derive(Debug, Clone, Copy)]
struct NotLlm;

/// What [`read_llm_request`] found.
#[derive(Debug)]
pub enum LlmBody<B> {
    /// A JSON body, parsed (or parsed earlier by an outer layer) and shared.
    Parsed {
        /// The request to hand on; its body serializes the shared request.
        request: http::Request<RequestBody<B>>,
        /// The shared parsed request, also in the request extensions.
        llm: SharedLlmRequest,
    },
    /// Not an LLM request: no body, or a body the table in the [module docs](self) hands on.
    Unparsed(http::Request<RequestBody<B>>),
}

/// What a request's `content-type` claims.
#[derive(Debug, PartialEq, Eq)]
enum Declared {
    Json,
    Absent,
    Other,
}

impl Declared {
    fn of(headers: &HeaderMap) -> Self {
        let Some(ct) = headers.get(CONTENT_TYPE) else {
            return Self::Absent;
        };
        let Ok(ct) = ct.to_str() else {
            return Self::Other;
        };
        let essence = ct.split(';').next().unwrap_or("").trim();
        let json = essence.eq_ignore_ascii_case("application/json")
            || essence.len() > 5
                && essence.is_char_boundary(essence.len() - 5)
                && essence[essence.len() - 5..].eq_ignore_ascii_case("+json");
        if json {
            Self::Json
        } else {
            Self::Other
        }
    }
}

/// Whether the body is compressed or otherwise encoded (anything but `identity`).
fn is_encoded(headers: &HeaderMap) -> bool {
    headers.get_all(CONTENT_ENCODING).iter().any(|v| {
        v.to_str().map_or(true, |v| {
            v.split(',')
                .any(|e| !e.trim().is_empty() && !e.trim().eq_ignore_ascii_case("identity"))
        })
    })
}

fn unsupported(message: String) -> Rejection {
    Rejection::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "invalid_request_error",
        message,
    )
    .with_code("unsupported_media_type")
}

/// Reads and parses an LLM request body once per request, by the table in the
/// [module docs](self).
///
/// If an outer layer already did, returns its [`SharedLlmRequest`] and the body untouched.
#[allow(
    clippy::manual_async_fn,
    reason = "an `async fn` stores its argument twice in its future (the request, 256 bytes), \
              and every layer's future holding this one is boxed per request"
)]
pub fn read_llm_request<B>(
    request: http::Request<B>,
    limit: usize,
) -> impl Future<Output = Result<LlmBody<B>, Rejection>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    async move {
        if let Some(llm) = request.extensions().get::<SharedLlmRequest>().cloned() {
            let request = request.map(RequestBody::original);
            return Ok(LlmBody::Parsed { request, llm });
        }
        if request.body().is_end_stream() || request.extensions().get::<NotLlm>().is_some() {
            return Ok(LlmBody::Unparsed(request.map(RequestBody::original)));
        }
        let route = WireFormat::for_path(request.uri().path());
        let declared = Declared::of(request.headers());
        let encoded = is_encoded(request.headers());
        if route.is_none() && (encoded || declared == Declared::Other) {
            return Ok(LlmBody::Unparsed(request.map(RequestBody::original)));
        }
        if encoded {
            return Err(unsupported(
                "compressed request bodies are not accepted on this route: send the JSON without a content-encoding".into(),
            ));
        }
        let (mut parts, body) = request.into_parts();
        let buffered = buffer(body, limit).await?;
        let untouched = |mut parts: http::request::Parts, data: Bytes, trailers| {
            parts.extensions.insert(NotLlm);
            Ok(LlmBody::Unparsed(http::Request::from_parts(
                parts,
                RequestBody::full(data, trailers),
            )))
        };
        if buffered.data.is_empty() {
            return untouched(parts, buffered.data, buffered.trailers);
        }
        match LlmRequest::parse(buffered.data.clone(), parts.uri.path()) {
            Ok(llm) if route.is_none() && llm.format() == WireFormat::Unknown => {
                untouched(parts, buffered.data, buffered.trailers)
            }
            Ok(llm) => {
                if let Some(model) = llm.model() {
                    crate::decision::Decisions::set_model(&parts.extensions, model);
                }
                let llm = SharedLlmRequest::new(llm);
                parts.extensions.insert(llm.clone());
                parts.headers.remove(CONTENT_LENGTH);
                if declared != Declared::Json {
                    // The provider must read the body as what was scanned.
                    parts
                        .headers
                        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                }
                let shared = llm.clone();
                let body = RequestBody::deferred(move || shared.to_bytes(), buffered.trailers);
                Ok(LlmBody::Parsed {
                    request: http::Request::from_parts(parts, body),
                    llm,
                })
            }
            Err(err) => match (route, declared) {
                (Some(_), Declared::Other) => {
                    let ct = parts
                        .headers
                        .get(CONTENT_TYPE)
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .unwrap_or_default();
                    Err(unsupported(format!(
                        "content-type {ct:?} is not JSON, and the body does not parse as JSON ({err}): send the request as JSON with content-type: application/json"
                    )))
                }
                (Some(_), _) | (None, Declared::Json) => Err(err.into()),
                (None, _) => untouched(parts, buffered.data, buffered.trailers),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    fn post(
        path: &str,
        content_type: Option<&str>,
        body: &'static str,
    ) -> http::Request<Full<Bytes>> {
        let mut builder = http::Request::post(path).header("content-length", body.len());
        if let Some(ct) = content_type {
            builder = builder.header("content-type", ct);
        }
        builder
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    }

    const CHAT: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi there"}]}"#;

    #[tokio::test]
    async fn llm_request_is_parsed_once_and_edits_reach_the_body() {
        let request = post("/v1/chat/completions", Some("application/json"), CHAT);
        let LlmBody::Parsed { request, llm } = read_llm_request(request, 1024).await.unwrap()
        else {
            panic!("json must parse");
        };
        assert!(request.headers().get("content-length").is_none());
        // An inner layer finds the same parse in the extensions and edits it.
        let LlmBody::Parsed {
            request,
            llm: again,
        } = read_llm_request(request, 1024).await.unwrap()
        else {
            panic!("second read must reuse");
        };
        again.with(|r| r.set_text(0, "HELLO".into()));
        assert_eq!(
            llm.with(|r| r.text(0).map(str::to_owned)).as_deref(),
            Some("HELLO")
        );
        let bytes = request.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["messages"][0]["content"], "HELLO");
    }

    #[tokio::test]
    async fn on_an_llm_route_every_content_type_is_parsed_and_relabelled() {
        for ct in [
            None,
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            Some("multipart/form-data; boundary=x"),
            Some("application/json; charset=utf-8"),
        ] {
            let request = post("/v1/chat/completions", ct, CHAT);
            let LlmBody::Parsed { request, llm } = read_llm_request(request, 1024).await.unwrap()
            else {
                panic!("{ct:?} must be parsed on an LLM route");
            };
            assert_eq!(llm.with(|r| r.segment_count()), 1);
            let sent = request.headers()["content-type"].to_str().unwrap();
            assert!(sent.starts_with("application/json"), "{ct:?} -> {sent}");
        }
    }

    #[tokio::test]
    async fn on_an_llm_route_what_does_not_parse_is_refused() {
        let cases = [
            (Some("text/plain"), "hello", 415, "unsupported_media_type"),
            (
                Some("application/x-www-form-urlencoded"),
                "a=1&b=2",
                415,
                "unsupported_media_type",
            ),
            (None, "hello", 400, "invalid_json"),
            (Some("application/json"), "{\"a\":", 400, "invalid_json"),
            (Some("application/json"), "[1,2]", 400, "invalid_request"),
            (
                Some("application/json"),
                r#"{"messages":[],"messages":[{"role":"user","content":"x"}]}"#,
                400,
                "duplicate_key",
            ),
        ];
        for (ct, body, status, code) in cases {
            let err = read_llm_request(post("/v1/chat/completions", ct, body), 1024)
                .await
                .unwrap_err();
            assert_eq!(
                (err.status().as_u16(), err.code()),
                (status, Some(code)),
                "{body}"
            );
        }
        let mut gzip = post("/v1/messages", Some("application/json"), CHAT);
        gzip.headers_mut()
            .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        let err = read_llm_request(gzip, 1024).await.unwrap_err();
        assert_eq!(err.status(), 415);
        assert!(err.message().contains("compressed"), "{}", err.message());
    }

    #[tokio::test]
    async fn other_routes_pass_what_is_not_an_llm_request() {
        for (ct, body) in [
            (Some("multipart/form-data; boundary=x"), "--x--"),
            (Some("text/plain"), CHAT),
            (None, "not json"),
            (Some("application/json"), r#"{"settings":{"theme":"dark"}}"#),
        ] {
            let request = post("/api/upload", ct, body);
            let LlmBody::Unparsed(request) = read_llm_request(request, 1024).await.unwrap() else {
                panic!("{ct:?} {body} is not an LLM request on another route");
            };
            assert_eq!(
                request.into_body().collect().await.unwrap().to_bytes(),
                body
            );
        }
        // JSON in an LLM shape is one, whatever the route.
        let custom = post("/api/chat", Some("application/json"), CHAT);
        assert!(matches!(
            read_llm_request(custom, 1024).await.unwrap(),
            LlmBody::Parsed { .. }
        ));
        // A body that claims JSON must be JSON.
        let broken = post("/api/chat", Some("application/json"), "{\"a\":1,\"a\":2}");
        assert_eq!(
            read_llm_request(broken, 1024).await.unwrap_err().status(),
            400
        );
    }

    #[tokio::test]
    async fn the_prompt_is_counted_once_for_every_layer() {
        let LlmBody::Parsed { llm, .. } =
            read_llm_request(post("/v1/chat/completions", None, CHAT), 1024)
                .await
                .unwrap()
        else {
            panic!("parsed");
        };
        let first = llm.input_tokens(false);
        assert_eq!(
            first.tokens,
            "hi there".len() as u64 + tokens::PER_SEGMENT + tokens::PER_REQUEST
        );
        // An inner layer rewrites the text; outer layers' count stays the one they made.
        llm.with(|r| r.set_text(0, "a much longer text than before".into()));
        assert_eq!(llm.input_tokens(false), first);
    }

    #[tokio::test]
    async fn bodies_over_the_cap_and_empty_bodies() {
        let err = read_llm_request(post("/v1/chat/completions", None, CHAT), 10)
            .await
            .unwrap_err();
        assert_eq!(err.status(), 413);
        let get = http::Request::get("/v1/models")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert!(matches!(
            read_llm_request(get, 1024).await.unwrap(),
            LlmBody::Unparsed(_)
        ));
        let empty_post = post("/v1/chat/completions", Some("application/json"), "");
        let LlmBody::Unparsed(request) = read_llm_request(empty_post, 1024).await.unwrap() else {
            panic!("an empty body has nothing to parse");
        };
        assert!(request
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .is_empty());
    }
}
