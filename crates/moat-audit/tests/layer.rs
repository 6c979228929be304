//! The layer and the log: what a record says, what it never says, and what happens when the
//! sinks fall behind.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use moat_audit::{
    AuditLayer, AuditLog, FileSink, Level, Literals, OnFull, Policy, Record, Sink, WebhookSink,
};
use moat_core::decision::{Decision, Decisions, Outcome};
use moat_core::hex::Hex;
use moat_core::reject::{Protocol, Rejection};
use serde_json::Value;
use tower::{service_fn, Layer, Service, ServiceExt};

fn records(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn send<S>(service: &mut S, request: Request<Full<Bytes>>) -> (StatusCode, Bytes)
where
    S: Service<Request<Full<Bytes>>, Response = Response<moat_audit::ResponseBody<Full<Bytes>>>>,
    S::Error: std::fmt::Debug,
{
    let response = service.ready().await.unwrap().call(request).await.unwrap();
    let status = response.status();
    (
        status,
        response.into_body().collect().await.unwrap().to_bytes(),
    )
}

/// The layer, recording to `log`, around an app that answers "ok".
fn audited(
    log: &AuditLog,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<moat_audit::ResponseBody<Full<Bytes>>>,
    Error = Infallible,
> + Clone {
    AuditLayer::new(log.clone()).layer(service_fn(
        |_req: Request<moat_audit::RequestBody<Full<Bytes>>>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        },
    ))
}

/// A webhook sink posting to the test receiver at `addr`.
fn webhook(addr: SocketAddr, batch: usize, queue: usize, on_full: OnFull) -> WebhookSink {
    WebhookSink::new(
        format!("http://{addr}/audit").parse().unwrap(),
        batch,
        queue,
        on_full,
    )
    .unwrap()
}

#[tokio::test]
async fn a_record_holds_who_what_and_every_decision_and_a_refusal_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::builder("t")
        .sink(FileSink::new(&path))
        .start()
        .unwrap();
    // An inner "layer" that decides, learns the model, and refuses requests without a key.
    let inner = service_fn(|req: Request<_>| async move {
        Decisions::record(
            req.extensions(),
            Decision::new("ratelimit", Outcome::Allowed).with_rule("per-key"),
        );
        Decisions::set_model(req.extensions(), "gpt-4o-mini");
        if !req.headers().contains_key("authorization") {
            let rejection = Rejection::unauthorized("no key")
                .with_code("missing_api_key")
                .with_layer("authenticate");
            return Ok::<_, Infallible>(rejection.into_response::<Full<Bytes>>(Protocol::Http));
        }
        let reply = r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5}}"#;
        let mut response = Response::new(moat_core::ResponseBody::inner(Full::new(Bytes::from(
            reply,
        ))));
        response
            .headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        Ok(response)
    });
    let mut service = AuditLayer::new(log.clone()).layer(inner);
    let ok = Request::post("/v1/chat/completions")
        .header("authorization", "Bearer sk-test-key-0123456789")
        .header("x-request-id", "req-42")
        .body(Full::new(Bytes::from("{}")))
        .unwrap();
    let response = service.ready().await.unwrap().call(ok).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    let refused = Request::post("/v1/chat/completions")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = service.ready().await.unwrap().call(refused).await.unwrap();
    assert_eq!(response.status(), 401);
    response.into_body().collect().await.unwrap();
    log.shutdown().await.unwrap();

    let all = records(&path);
    assert_eq!(all.len(), 3);
    assert_eq!(all[0]["type"], "start");
    let ok = &all[1];
    assert_eq!(ok["type"], "request");
    assert_eq!(ok["moat.request_id"], "req-42");
    assert_eq!(ok["http.request.method"], "POST");
    assert_eq!(ok["url.path"], "/v1/chat/completions");
    assert_eq!(ok["http.response.status_code"], 200);
    assert_eq!(ok["gen_ai.request.model"], "gpt-4o-mini");
    assert_eq!(ok["gen_ai.usage.input_tokens"], 12);
    assert_eq!(ok["gen_ai.usage.output_tokens"], 5);
    assert_eq!(ok["moat.outcome"], "completed");
    assert_eq!(
        ok["moat.caller"].as_str().unwrap().len(),
        32,
        "a fingerprint, not the key"
    );
    assert_eq!(ok["moat.decisions"][0]["layer"], "ratelimit");
    assert_eq!(ok["moat.decisions"][0]["rule"], "per-key");
    assert!(ok["moat.duration_us"].as_u64().is_some());
    let refused = &all[2];
    assert_eq!(refused["http.response.status_code"], 401);
    assert_eq!(refused["moat.outcome"], "rejected");
    assert_eq!(refused["error"]["layer"], "authenticate");
    assert_eq!(refused["error"]["code"], "missing_api_key");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains("sk-test-key-0123456789"));
}

#[tokio::test]
async fn secrets_never_reach_a_record_at_any_level_and_controls_are_escaped() {
    const CLIENT_KEY: &str = "sk-client-abcdef0123456789";
    const PROVIDER_KEY: &str = "sk-provider-zyxw9876543210";
    for level in [Level::Metadata, Level::Request, Level::RequestResponse] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::builder("t")
            .sink(FileSink::new(&path))
            .scrubber(Literals::new([PROVIDER_KEY]))
            .start()
            .unwrap();
        let inner = service_fn(
            |req: Request<moat_audit::RequestBody<Full<Bytes>>>| async move {
                // The app echoes the prompt, the provider key and a forged log line back.
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let reply = format!(
                    "{}\n{{\"seq\":0,\"forged\":true}}\u{202e} key {PROVIDER_KEY}",
                    String::from_utf8_lossy(&body)
                );
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(reply))))
            },
        );
        let mut service = AuditLayer::new(log.clone())
            .with_policy(Policy::new(level))
            .layer(inner);
        let prompt = format!(
            r#"{{"messages":[{{"role":"user","content":"my key is {CLIENT_KEY} and theirs {PROVIDER_KEY}"}}]}}"#
        );
        let request = Request::post("/v1/chat/completions")
            .header("authorization", format!("Bearer {CLIENT_KEY}"))
            .body(Full::new(Bytes::from(prompt.clone())))
            .unwrap();
        let (status, _) = send(&mut service, request).await;
        assert_eq!(status, 200);
        log.shutdown().await.unwrap();

        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(CLIENT_KEY), "{level:?}: {text}");
        assert!(!text.contains(PROVIDER_KEY), "{level:?}: {text}");
        assert!(!text.contains('\u{202e}'));
        assert_eq!(text.lines().count(), 2, "one line per record: {text}");
        let record = &records(&path)[1];
        match level {
            Level::Metadata => assert!(record.get("moat.request").is_none()),
            _ => {
                let body = &record["moat.request"];
                assert!(body["text"].as_str().unwrap().contains("[REDACTED]"));
                // The hash is of the raw bytes, secrets and all: it settles a dispute.
                use sha2::Digest;
                let raw = sha2::Sha256::digest(prompt.as_bytes());
                assert_eq!(body["sha256"], Hex(&raw).to_string());
                assert_eq!(body["complete"], true);
            }
        }
        if level == Level::RequestResponse {
            let reply = record["moat.response"]["text"].as_str().unwrap();
            assert!(reply.contains("\\u{202e}"), "{reply}");
        } else {
            assert!(record.get("moat.response").is_none());
        }
        assert!(moat_audit::verify(&[path], &[], &[]).unwrap().is_ok());
    }
}

/// A sink that holds the writer until it is opened: the sinks falling behind.
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    fn open(&self) {
        *self.0 .0.lock().unwrap() = true;
        self.0 .1.notify_all();
    }
}

impl Sink for Gate {
    fn write(&mut self, record: &Record) -> io::Result<()> {
        // The start record passes; requests' records wait for the gate.
        if record.seq > 0 {
            let mut open = self.0 .0.lock().unwrap();
            while !*open {
                open = self.0 .1.wait(open).unwrap();
            }
        }
        Ok(())
    }

    fn flush(&mut self, _durable: bool) -> io::Result<()> {
        Ok(())
    }
}

async fn behind(
    on_full: OnFull,
) -> (
    tempfile::TempDir,
    AuditLog,
    Gate,
    impl Service<
            Request<Full<Bytes>>,
            Response = Response<moat_audit::ResponseBody<Full<Bytes>>>,
            Error = Infallible,
        > + Clone,
) {
    let dir = tempfile::tempdir().unwrap();
    let gate = Gate::default();
    let log = AuditLog::builder("t")
        .sink(FileSink::new(dir.path().join("audit.jsonl")))
        .sink(gate.clone())
        .capacity(1)
        .on_full(on_full)
        .start()
        .unwrap();
    let service = audited(&log);
    // The first request's record fills the queue (of one), and holds the writer at the gate.
    let (status, _) = send(&mut service.clone(), Request::new(Full::new(Bytes::new()))).await;
    assert_eq!(status, 200);
    (dir, log, gate, service)
}

fn kinds(dir: &tempfile::TempDir) -> Vec<(String, u64)> {
    records(&dir.path().join("audit.jsonl"))
        .iter()
        .map(|r| {
            (
                r["type"].as_str().unwrap().to_owned(),
                r["count"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[tokio::test]
async fn when_behind_fail_closed_refuses_with_503_and_counts_the_refusals() {
    let (dir, log, gate, service) = behind(OnFull::FailClosed).await;
    let mut refused = 0;
    for _ in 0..3 {
        let (status, body) =
            send(&mut service.clone(), Request::new(Full::new(Bytes::new()))).await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert!(String::from_utf8_lossy(&body).contains("audit_unavailable"));
            refused += 1;
        }
    }
    assert_eq!(refused, 3);
    gate.open();
    log.shutdown().await.unwrap();
    let kinds = kinds(&dir);
    // Counted in one record or several, as the writer happened to run.
    let counted: u64 = kinds
        .iter()
        .filter(|(k, _)| k == "refused")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(counted, 3, "{kinds:?}");
    assert_eq!(kinds.iter().filter(|(k, _)| k == "request").count(), 1);
}

#[tokio::test]
async fn when_behind_drop_with_gap_lets_requests_through_and_counts_what_it_dropped() {
    let (dir, log, gate, service) = behind(OnFull::DropWithGap).await;
    for _ in 0..4 {
        let (status, _) = send(&mut service.clone(), Request::new(Full::new(Bytes::new()))).await;
        assert_eq!(status, 200);
    }
    gate.open();
    log.shutdown().await.unwrap();
    let kinds = kinds(&dir);
    let counted: u64 = kinds
        .iter()
        .filter(|(k, _)| k == "gap")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(counted, 4, "{kinds:?}");
    let report = moat_audit::verify(&[dir.path().join("audit.jsonl")], &[], &[]).unwrap();
    assert!(report.is_ok());
    let noticed: u64 = report
        .notices
        .iter()
        .filter_map(|n| match n {
            moat_audit::Notice::Dropped { count, .. } => Some(count),
            _ => None,
        })
        .sum();
    assert_eq!(noticed, 4, "{:?}", report.notices);
}

#[tokio::test]
async fn when_behind_backpressure_holds_new_requests_until_there_is_room() {
    let (dir, log, gate, service) = behind(OnFull::Backpressure).await;
    let mut service = service.clone();
    let mut waiting = Box::pin(send(&mut service, Request::new(Full::new(Bytes::new()))));
    // However often it is polled, the request does not pass while the queue is full.
    for _ in 0..50 {
        let poll =
            std::future::poll_fn(|cx| std::task::Poll::Ready(waiting.as_mut().poll(cx))).await;
        assert!(poll.is_pending());
        tokio::task::yield_now().await;
    }
    gate.open();
    let (status, _) = waiting.await;
    assert_eq!(status, 200);
    log.shutdown().await.unwrap();
    let kinds = kinds(&dir);
    assert_eq!(
        kinds.iter().filter(|(k, _)| k == "request").count(),
        2,
        "{kinds:?}"
    );
    assert!(!kinds.iter().any(|(k, _)| k == "gap" || k == "refused"));
}

/// A webhook receiver on loopback that answers 503 until it is told to accept, and keeps what
/// it accepted.
async fn receiver(accepting: Arc<Mutex<bool>>, got: Arc<Mutex<Vec<String>>>) -> SocketAddr {
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/audit",
        post(move |body: Bytes| {
            let (accepting, got) = (accepting.clone(), got.clone());
            async move {
                if !*accepting.lock().unwrap() {
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                got.lock().unwrap().extend(
                    String::from_utf8(body.to_vec())
                        .unwrap()
                        .lines()
                        .map(str::to_owned),
                );
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_is_down_gets_every_record_once_it_is_back() {
    let accepting = Arc::new(Mutex::new(false));
    let got = Arc::new(Mutex::new(Vec::new()));
    let addr = receiver(accepting.clone(), got.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let hook = webhook(addr, 4, 1024, OnFull::Backpressure);
    let log = AuditLog::builder("t")
        .sink(FileSink::new(&path))
        .sink(hook)
        .start()
        .unwrap();
    let service = audited(&log);
    for _ in 0..10 {
        send(&mut service.clone(), Request::new(Full::new(Bytes::new()))).await;
    }
    log.flush().await.unwrap();
    *accepting.lock().unwrap() = true;
    log.shutdown().await.unwrap();
    let file: Vec<String> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        *got.lock().unwrap(),
        file,
        "the same records, in order, nothing lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_webhook_dropping_with_gap_says_how_many_it_missed() {
    let accepting = Arc::new(Mutex::new(false));
    let got = Arc::new(Mutex::new(Vec::new()));
    let addr = receiver(accepting.clone(), got.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let hook = webhook(addr, 1, 2, OnFull::DropWithGap);
    let log = AuditLog::builder("t")
        .sink(FileSink::new(&path))
        .sink(hook)
        .start()
        .unwrap();
    let service = audited(&log);
    for _ in 0..20 {
        send(&mut service.clone(), Request::new(Full::new(Bytes::new()))).await;
    }
    log.flush().await.unwrap();
    *accepting.lock().unwrap() = true;
    log.shutdown().await.unwrap();
    let got = got.lock().unwrap().clone();
    let file = std::fs::read_to_string(&path).unwrap();
    // The file has all 21 records; the webhook has fewer, and a gap line counting the rest.
    assert_eq!(file.lines().count(), 21);
    let gaps: u64 = got
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["type"] == "gap")
        .map(|v| v["count"].as_u64().unwrap())
        .sum();
    let delivered = got
        .iter()
        .filter(|l| !l.contains("\"type\":\"gap\""))
        .count() as u64;
    assert!(gaps > 0, "{got:?}");
    assert_eq!(delivered + gaps, 21);
}

#[tokio::test]
async fn an_abandoned_stream_and_a_failed_service_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::builder("t")
        .sink(FileSink::new(&path))
        .start()
        .unwrap();
    let service = AuditLayer::new(log.clone()).layer(service_fn(|req: Request<_>| async move {
        if req.uri().path() == "/fail" {
            return Err::<Response<Full<Bytes>>, _>(io::Error::other("upstream gone"));
        }
        Ok(Response::new(Full::new(Bytes::from_static(b"data: x\n\n"))))
    }));
    // The client reads the head and goes away.
    let response = service
        .clone()
        .oneshot(
            Request::get("/stream")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    drop(response);
    let failed = service
        .oneshot(Request::get("/fail").body(Full::new(Bytes::new())).unwrap())
        .await;
    assert!(failed.is_err());
    log.shutdown().await.unwrap();
    let all = records(&path);
    assert_eq!(all[1]["moat.outcome"], "abandoned");
    assert_eq!(all[1]["http.response.status_code"], 200);
    assert_eq!(all[2]["moat.outcome"], "failed");
    assert_eq!(all[2]["http.response.status_code"], 0);
}

#[tokio::test]
async fn events_of_the_application_s_own_join_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::builder("t")
        .sink(FileSink::new(&path))
        .start()
        .unwrap();
    let mut fields = serde_json::Map::new();
    fields.insert("key_id".into(), "alpha".into());
    fields.insert("by".into(), "ops\nforged".into());
    fields.insert("seq".into(), 99.into());
    log.record_event("key_rotated", fields);
    log.shutdown().await.unwrap();
    let all = records(&path);
    assert_eq!(all[1]["type"], "key_rotated");
    assert_eq!(all[1]["key_id"], "alpha");
    assert_eq!(all[1]["seq"], 1, "the log numbers it");
    assert!(moat_audit::verify(&[path], &[], &[]).unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_is_down_holds_requests_or_refuses_them_as_the_policy_says() {
    for on_full in [OnFull::Backpressure, OnFull::FailClosed] {
        let accepting = Arc::new(Mutex::new(false));
        let got = Arc::new(Mutex::new(Vec::new()));
        let addr = receiver(accepting.clone(), got.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let hook = webhook(addr, 1, 1, on_full);
        let log = AuditLog::builder("t")
            .sink(FileSink::new(&path))
            .sink(hook)
            .capacity(2)
            .on_full(on_full)
            .start()
            .unwrap();
        let service = audited(&log);
        // The webhook's queue fills, the writer waits on it, then the log's queue fills.
        let mut passed = 0;
        let mut refused = 0u64;
        let mut held = None;
        for _ in 0..20 {
            let mut service = service.clone();
            let mut call =
                Box::pin(
                    async move { send(&mut service, Request::new(Full::new(Bytes::new()))).await },
                );
            let mut ready = None;
            for _ in 0..20 {
                let poll =
                    std::future::poll_fn(|cx| std::task::Poll::Ready(call.as_mut().poll(cx))).await;
                if let std::task::Poll::Ready(done) = poll {
                    ready = Some(done);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            match ready {
                Some((StatusCode::OK, _)) => passed += 1,
                Some((StatusCode::SERVICE_UNAVAILABLE, _)) => refused += 1,
                Some((status, _)) => panic!("{status}"),
                None => {
                    held = Some(call);
                    break;
                }
            }
        }
        match on_full {
            OnFull::Backpressure => {
                assert!(held.is_some(), "a request waits while the webhook is down");
                assert_eq!(refused, 0);
            }
            _ => {
                assert!(held.is_none());
                assert!(
                    refused > 0,
                    "requests are refused while the webhook is down"
                );
            }
        }
        // The webhook comes back: the held request completes, and every record arrives.
        *accepting.lock().unwrap() = true;
        if let Some(call) = held {
            assert_eq!(call.await.0, StatusCode::OK);
            passed += 1;
        }
        log.shutdown().await.unwrap();
        let file: Vec<String> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(
            *got.lock().unwrap(),
            file,
            "{on_full:?}: the webhook got every record"
        );
        let requests = file
            .iter()
            .filter(|l| l.contains("\"type\":\"request\""))
            .count();
        assert_eq!(requests, passed, "{on_full:?}");
        let counted: u64 = file
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|r| r["type"] == "refused")
            .map(|r| r["count"].as_u64().unwrap())
            .sum();
        assert_eq!(counted, refused, "{on_full:?}");
    }
}

/// A sink that fails its first writes of requests' records, as a disk or a peer might.
struct Flaky(u32);

impl Sink for Flaky {
    fn write(&mut self, record: &Record) -> io::Result<()> {
        if record.seq > 0 && self.0 > 0 {
            self.0 -= 1;
            return Err(io::Error::other("not now"));
        }
        Ok(())
    }

    fn flush(&mut self, _durable: bool) -> io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_sink_that_fails_is_retried_without_writing_a_record_twice_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::builder("t")
        .sink(FileSink::new(&path).with_fsync(moat_audit::Fsync::Always))
        .sink(Flaky(3))
        .start()
        .unwrap();
    let service = audited(&log);
    for _ in 0..3 {
        send(&mut service.clone(), Request::new(Full::new(Bytes::new()))).await;
    }
    log.shutdown().await.unwrap();
    assert_eq!(records(&path).len(), 4);
    let report = moat_audit::verify(&[path], &[], &[]).unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_also_reach_the_webhook() {
    let accepting = Arc::new(Mutex::new(true));
    let got = Arc::new(Mutex::new(Vec::new()));
    let addr = receiver(accepting, got.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (signer, _) = moat_audit::Signer::generate("moat-audit/t").unwrap();
    let key: moat_audit::VerifierKey = signer.verifier_key().parse().unwrap();
    let hook = webhook(addr, 16, 1024, OnFull::Backpressure);
    let log = AuditLog::builder("moat-audit/t")
        .sink(FileSink::new(&path))
        .sink(hook)
        .checkpoints(
            signer,
            dir.path().join("audit.checkpoint"),
            Duration::from_secs(3600),
        )
        .start()
        .unwrap();
    let service = audited(&log);
    for _ in 0..3 {
        send(&mut service.clone(), Request::new(Full::new(Bytes::new()))).await;
    }
    let head = log.shutdown().await.unwrap();
    let got = got.lock().unwrap().clone();
    let notes: Vec<String> = got
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["type"] == "checkpoint")
        .map(|v| v["note"].as_str().unwrap().to_owned())
        .collect();
    let last = moat_audit::Checkpoint::open(notes.last().expect("a checkpoint"), &[key]).unwrap();
    assert_eq!(last.size, head.next_seq);
    assert_eq!(last.size, records(&path).len() as u64);
}
