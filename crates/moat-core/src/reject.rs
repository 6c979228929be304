//! Rejections rendered in the caller's protocol.
//!
//! A layer that refuses a request returns a response, never an error. [`Rejection`] carries the
//! status, an OpenAI-style error (`type`, `code`, `message`, `param`) and extra headers such as
//! `retry-after`, and renders as:
//!
//! - HTTP: a JSON body `{"error":{"message":..,"type":..,"param":..,"code":..}}` with that status;
//! - gRPC (`content-type: application/grpc*`): a trailers-only response, HTTP 200 with
//!   `grpc-status` and `grpc-message` headers and an empty body.
//!
//! Either way the response extensions get a [`Rejected`] so an outer layer can see why.
//!
//! ```
//! use moat_core::reject::{Protocol, Rejected, Rejection};
//! use http::StatusCode;
//!
//! let rejection = Rejection::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded", "too many requests")
//!     .with_code("rate_limit_exceeded")
//!     .with_header(http::header::RETRY_AFTER, http::HeaderValue::from_static("3"));
//! let response = rejection.into_response::<String>(Protocol::Http);
//! assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert_eq!(response.headers()["retry-after"], "3");
//! assert_eq!(response.extensions().get::<Rejected>().unwrap().status, 429);
//! ```

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Response, StatusCode};
use serde::Serialize;

use crate::body::{BodyError, ResponseBody};

/// The protocol a response must be rendered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Protocol {
    /// Plain HTTP with a JSON error body.
    Http,
    /// gRPC: trailers-only status.
    Grpc,
}

impl Protocol {
    /// `Grpc` when the request's `content-type` starts with `application/grpc`.
    pub fn of<B>(req: &http::Request<B>) -> Self {
        Self::from_headers(req.headers())
    }

    /// `Grpc` when `content-type` starts with `application/grpc`.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        match headers.get(CONTENT_TYPE) {
            Some(ct) if ct.as_bytes().starts_with(b"application/grpc") => Self::Grpc,
            _ => Self::Http,
        }
    }
}

/// gRPC status codes used by moat's rejections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GrpcCode {
    /// 3
    InvalidArgument = 3,
    /// 4
    DeadlineExceeded = 4,
    /// 5
    NotFound = 5,
    /// 7
    PermissionDenied = 7,
    /// 8
    ResourceExhausted = 8,
    /// 12
    Unimplemented = 12,
    /// 13
    Internal = 13,
    /// 14
    Unavailable = 14,
    /// 16
    Unauthenticated = 16,
}

impl GrpcCode {
    /// The conventional gRPC code for an HTTP status.
    pub fn from_http(status: StatusCode) -> Self {
        match status.as_u16() {
            400 | 411 | 415 | 422 => Self::InvalidArgument,
            401 => Self::Unauthenticated,
            402 | 413 | 429 => Self::ResourceExhausted,
            403 | 451 => Self::PermissionDenied,
            404 => Self::NotFound,
            405 | 501 => Self::Unimplemented,
            408 | 504 => Self::DeadlineExceeded,
            502 | 503 => Self::Unavailable,
            _ => Self::Internal,
        }
    }
}

/// A refusal, rendered as a response in the caller's protocol.
#[derive(Debug, Clone)]
pub struct Rejection(Box<Fields>);

#[derive(Debug, Clone)]
struct Fields {
    status: StatusCode,
    error_type: Cow<'static, str>,
    code: Option<Cow<'static, str>>,
    message: Cow<'static, str>,
    param: Option<Cow<'static, str>>,
    headers: HeaderMap,
    grpc_code: Option<GrpcCode>,
    layer: &'static str,
}

/// What a rejection leaves in the response extensions for outer layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The layer that rejected, when it said.
    pub layer: &'static str,
    /// The HTTP status (for gRPC, the status the rejection would have had over HTTP).
    pub status: u16,
    /// The OpenAI-style error type, e.g. `rate_limit_exceeded`.
    pub error_type: Cow<'static, str>,
    /// The machine-readable code, if any.
    pub code: Option<Cow<'static, str>>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorFields<'a>,
}

#[derive(Serialize)]
struct ErrorFields<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    error_type: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl Rejection {
    /// A rejection with this status, OpenAI error `type` and human-readable message.
    pub fn new(
        status: StatusCode,
        error_type: impl Into<Cow<'static, str>>,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self(Box::new(Fields {
            status,
            error_type: error_type.into(),
            code: None,
            message: message.into(),
            param: None,
            headers: HeaderMap::new(),
            grpc_code: None,
            layer: "",
        }))
    }

    /// 400 `invalid_request_error`.
    pub fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 413 `invalid_request_error` with code `request_too_large`.
    pub fn payload_too_large(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            message,
        )
        .with_code("request_too_large")
    }

    /// 401 `invalid_request_error` with code `invalid_api_key`.
    pub fn unauthorized(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
            .with_code("invalid_api_key")
    }

    /// Sets the machine-readable `code`.
    #[must_use]
    pub fn with_code(mut self, code: impl Into<Cow<'static, str>>) -> Self {
        self.0.code = Some(code.into());
        self
    }

    /// Sets `param`, the request field at fault.
    #[must_use]
    pub fn with_param(mut self, param: impl Into<Cow<'static, str>>) -> Self {
        self.0.param = Some(param.into());
        self
    }

    /// Adds a response header, e.g. `retry-after`.
    #[must_use]
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.0.headers.append(name, value);
        self
    }

    /// Overrides the gRPC status code derived from the HTTP status.
    #[must_use]
    pub fn with_grpc_code(mut self, code: GrpcCode) -> Self {
        self.0.grpc_code = Some(code);
        self
    }

    /// Names the layer that rejected, for [`Rejected`].
    #[must_use]
    pub fn with_layer(mut self, layer: &'static str) -> Self {
        self.0.layer = layer;
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.0.status
    }

    /// The OpenAI error `type`.
    pub fn error_type(&self) -> &str {
        &self.0.error_type
    }

    /// The machine-readable code.
    pub fn code(&self) -> Option<&str> {
        self.0.code.as_deref()
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// The extra headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.0.headers
    }

    /// The gRPC status this rejection renders as.
    pub fn grpc_code(&self) -> GrpcCode {
        self.0
            .grpc_code
            .unwrap_or_else(|| GrpcCode::from_http(self.0.status))
    }

    /// The JSON error body, `{"error":{...}}`.
    pub fn json_body(&self) -> Bytes {
        let body = ErrorBody {
            error: ErrorFields {
                message: &self.0.message,
                error_type: &self.0.error_type,
                param: self.0.param.as_deref(),
                code: self.0.code.as_deref(),
            },
        };
        // Serializing plain strings into a Vec cannot fail.
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }

    /// Renders the rejection for `protocol`, with the body type a layer hands back.
    pub fn into_response<B>(self, protocol: Protocol) -> Response<ResponseBody<B>> {
        let rejected = Rejected {
            layer: self.0.layer,
            status: self.0.status.as_u16(),
            error_type: self.0.error_type.clone(),
            code: self.0.code.clone(),
        };
        let mut response = match protocol {
            Protocol::Http => {
                let mut response = Response::new(ResponseBody::full(self.json_body()));
                *response.status_mut() = self.0.status;
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                response
            }
            Protocol::Grpc => {
                let mut response = Response::new(ResponseBody::empty());
                let headers = response.headers_mut();
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
                headers.insert("grpc-status", HeaderValue::from(self.grpc_code() as u16));
                if let Ok(message) = HeaderValue::from_str(&percent_encode_grpc(&self.0.message)) {
                    headers.insert("grpc-message", message);
                }
                response
            }
        };
        for (name, value) in &self.0.headers {
            response.headers_mut().append(name, value.clone());
        }
        response.extensions_mut().insert(rejected);
        response
    }
}

impl From<BodyError> for Rejection {
    /// 413 `request_too_large`, 408 `request_timeout`, or 400 `invalid_body`.
    fn from(err: BodyError) -> Self {
        match err {
            BodyError::TooLarge { .. } => Self::payload_too_large(err.to_string()),
            BodyError::TimedOut => Self::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                err.to_string(),
            )
            .with_code("request_timeout"),
            _ => Self::bad_request(err.to_string()).with_code("invalid_body"),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.0.status.as_u16(),
            self.0.error_type,
            self.0.message
        )
    }
}

/// Percent-encodes a gRPC message as the gRPC HTTP/2 spec asks: every byte outside
/// printable ASCII, and `%` itself.
fn percent_encode_grpc(message: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(message.len());
    for &b in message.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_json(response: Response<ResponseBody<String>>) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn http_rejection_is_openai_shaped_with_headers_and_extension() {
        let response = Rejection::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            "slow down",
        )
        .with_code("rate_limit_exceeded")
        .with_header(http::header::RETRY_AFTER, HeaderValue::from_static("2"))
        .with_layer("ratelimit")
        .into_response::<String>(Protocol::Http);
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        assert_eq!(response.headers()["retry-after"], "2");
        let rejected = response.extensions().get::<Rejected>().unwrap().clone();
        assert_eq!(rejected.layer, "ratelimit");
        assert_eq!(rejected.error_type, "rate_limit_exceeded");
        assert_eq!(
            body_json(response).await,
            serde_json::json!({"error":{"message":"slow down","type":"rate_limit_exceeded","param":null,"code":"rate_limit_exceeded"}})
        );
    }

    #[tokio::test]
    async fn grpc_rejection_is_trailers_only() {
        let mut req = http::Request::new(());
        req.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert_eq!(Protocol::of(&req), Protocol::Grpc);
        let response = Rejection::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            "100% über",
        )
        .into_response::<String>(Protocol::of(&req));
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["grpc-status"], "8");
        assert_eq!(response.headers()["grpc-message"], "100%25 %C3%BCber");
        let body = response.into_body();
        assert!(http_body::Body::is_end_stream(&body));
    }

    #[test]
    fn grpc_codes_follow_http_statuses() {
        assert_eq!(
            GrpcCode::from_http(StatusCode::SERVICE_UNAVAILABLE),
            GrpcCode::Unavailable
        );
        assert_eq!(
            GrpcCode::from_http(StatusCode::FORBIDDEN),
            GrpcCode::PermissionDenied
        );
        assert_eq!(
            GrpcCode::from_http(StatusCode::BAD_REQUEST),
            GrpcCode::InvalidArgument
        );
        assert_eq!(
            GrpcCode::from_http(StatusCode::UNAUTHORIZED),
            GrpcCode::Unauthenticated
        );
        let explicit = Rejection::bad_request("x").with_grpc_code(GrpcCode::Internal);
        assert_eq!(explicit.grpc_code(), GrpcCode::Internal);
    }

    #[test]
    fn messages_with_quotes_stay_valid_json() {
        let body = Rejection::bad_request("bad \"field\"\n")
            .with_param("messages")
            .json_body();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["message"], "bad \"field\"\n");
        assert_eq!(v["error"]["param"], "messages");
    }
}
