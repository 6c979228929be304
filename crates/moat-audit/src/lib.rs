//! A tamper-evident audit log for Tower services: one hash-chained record per request, with
//! every decision the other moat layers made, signed checkpoints, a verifier, and no secrets.
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use moat_audit::{AuditLayer, AuditLog, FileSink};
//! use std::convert::Infallible;
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("moat-audit.jsonl");
//! let log = AuditLog::builder("moat-audit/example")
//!     .sink(FileSink::new(&path))
//!     .start()?;
//! let app = service_fn(|_req: Request<_>| async {
//!     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("{\"ok\":true}"))))
//! });
//! let service = AuditLayer::new(log.clone()).layer(app);
//!
//! let request = Request::post("/v1/chat/completions")
//!     .header("authorization", "Bearer sk-never-written-0001")
//!     .body(Full::new(Bytes::new()))
//!     .unwrap();
//! let response = service.oneshot(request).await.unwrap();
//! response.into_body().collect().await.unwrap(); // the record is written when the body ends
//!
//! log.flush().await?;
//! let text = std::fs::read_to_string(&path)?;
//! let record = text.lines().last().unwrap();
//! assert!(record.contains(r#""url.path":"/v1/chat/completions""#));
//! assert!(record.contains(r#""http.response.status_code":200"#));
//! assert!(!text.contains("sk-never-written-0001"));
//! assert!(moat_audit::verify(&[path], &[], &[])?.is_ok());
//! # Ok(()) }
//! ```
//!
//! # What a record holds
//!
//! One JSON line per request, written when its response ends (or fails, or the client goes
//! away): time, request id (`x-request-id`), caller fingerprint (a keyed hash, never the key),
//! virtual key id, tenant, tier, client address, method, path, model, upstream, status,
//! duration, time to first byte, token usage, cost, how it ended, the refusal if there was one
//! (from any layer inside, authentication included), and every [`Decision`] the layers
//! recorded through moat-core's [`Decisions`]. Field names follow the OpenTelemetry
//! conventions where one exists (`http.request.method`, `gen_ai.request.model`,
//! `gen_ai.usage.input_tokens`, ...).
//!
//! [`Decision`]: moat_core::decision::Decision
//! [`Decisions`]: moat_core::decision::Decisions
//!
//! At the `request` and `request_response` [`Level`]s (chosen per route, tenant and model by a
//! [`Policy`]) a record also holds the bodies, up to a limit, after a [`Scrubber`], with the
//! SHA-256 of every raw byte so a dispute can be settled without storing them. Headers are
//! never logged; the key a request presented is removed from its bodies whatever the scrubber;
//! control characters are escaped in every field, so no value can forge a line.
//!
//! # Integrity
//!
//! Each record carries a contiguous `seq`, the `prev` record's hash and its own `hash`
//! (SHA-256 over its RFC 8785 canonical JSON without `hash`). Signed checkpoints (C2SP
//! `tlog-checkpoint` notes with Ed25519, see [`checkpoint`]) commit to the chain's size and
//! head. [`verify`] (and the `moat-audit verify` binary) reports modified, deleted, inserted,
//! reordered and truncated records, follows rotated files, and checks checkpoint signatures.
//!
//! # Delivery
//!
//! The request path builds an event and queues it; one writer thread chains and writes to
//! the [sinks](sink) (a JSON Lines [`FileSink`] with rotation and an fsync policy, a
//! [`TracingSink`], a batched [`WebhookSink`], or your own [`Sink`]). When the queue is full,
//! [`OnFull`] applies: wait, drop with a counted `gap` record, or refuse requests with 503.
//! Nothing is lost without a record saying so. [`AuditLog::shutdown`] writes everything
//! queued, a last checkpoint, and drains the webhook.
//!
//! # Customisation
//!
//! ```
//! use moat_audit::{AuditLayer, AuditLog, FileSink, Fsync, Level, LevelRule, Literals, OnFull, Policy, Signer};
//! use std::time::Duration;
//!
//! # fn main() -> std::io::Result<()> {
//! # let dir = tempfile::tempdir()?;
//! let (signer, _private_key) = Signer::generate("moat-audit/prod").unwrap();
//! let log = AuditLog::builder("moat-audit/prod")
//!     .sink(
//!         FileSink::new(dir.path().join("moat-audit.jsonl"))
//!             .with_rotate_bytes(100 << 20)
//!             .with_fsync(Fsync::Batch),
//!     )
//!     .on_full(OnFull::DropWithGap)
//!     .scrubber(Literals::new(["sk-provider-key-value"]))
//!     .checkpoints(signer, dir.path().join("moat-audit.checkpoint"), Duration::from_secs(10))
//!     .start()?;
//! let layer = AuditLayer::new(log).with_policy(
//!     Policy::new(Level::Metadata)
//!         .with_rule(LevelRule::new(Level::Request).with_routes(["/v1/chat/completions"])),
//! );
//! # Ok(()) }
//! ```
//!
//! # With axum and tonic
//!
//! Put the layer outermost, so it sees what every layer inside it decides:
//! `Router::new().route(..).layer(ServiceBuilder::new().layer(audit).layer(rate_limit)...)`.
//! For tonic, `Server::builder().layer(audit)`: a gRPC call's record says `rpc.system` `grpc`,
//! and a refusal of the layer's own is a trailers-only `UNAVAILABLE`.

#![forbid(unsafe_code)]

mod chain;
pub mod checkpoint;
mod event;
mod policy;
pub mod scrub;
mod service;
pub mod sink;
pub mod verify;
mod writer;

pub use chain::{Head, Record, GENESIS};
pub use checkpoint::{Checkpoint, CheckpointError, Signer, VerifierKey};
pub use policy::{Level, LevelRule, Policy};
pub use scrub::{Literals, NoScrub, Scrubber};
pub use service::{
    Audit, AuditLayer, RequestBody, ResponseBody, ResponseFuture, DEFAULT_MAX_BODY_BYTES,
};
pub use sink::{FileSink, Fsync, Sink, TracingSink, WebhookSink};
pub use verify::{verify, Notice, Problem, Verification};
pub use writer::{AuditLog, AuditLogBuilder, OnFull};
