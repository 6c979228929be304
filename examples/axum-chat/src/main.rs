//! An axum chat app whose own handler sits behind moat's whole stack, built with
//! [`ServiceBuilderExt`](moat::ServiceBuilderExt) in the recommended order: audit, rate limits,
//! budgets, redaction, output moderation, circuit breaker.
//!
//! `cargo run -p axum-chat` serves on a free loopback port, then plays a short session against
//! itself and checks what each layer did: the handler sees placeholders where the user wrote an
//! email address, the user gets the address back, an abusive reply is withheld
//! (`finish_reason: "content_filter"`), the fourth request in a minute is refused
//! with 429, and the audit log holds all four (the refusal with its reason, the budget's
//! settled usage) without the user's key or address. It exits 0 when all of that held (CI runs
//! it).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use moat::core::identity::ApiKey;
use moat::prelude::*;
use serde_json::{json, Value};
use tower::ServiceBuilder;

/// What the handler saw, to show that redaction happened before it.
type Seen = Arc<Mutex<Vec<String>>>;

/// The app's own chat handler: it "answers" by echoing the last user message, with usage, as
/// an OpenAI chat completion.
async fn chat(State(seen): State<Seen>, Json(request): Json<Value>) -> Json<Value> {
    let text = request["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned();
    seen.lock().unwrap().push(text.clone());
    Json(json!({
        "id": "chatcmpl-local",
        "object": "chat.completion",
        "model": request["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20},
    }))
}

fn app(seen: Seen, log: AuditLog) -> Router {
    let per_key = Rule::new("per-key", ApiKey::default()).limit("3/minute".parse().expect("valid"));
    let daily = Budget::new("daily-tokens", ApiKey::default(), Period::Day).tokens(100_000);
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .with_state(seen)
        .layer(
            ServiceBuilder::new()
                .moat_audit(AuditLayer::new(log))
                .moat_rate_limit(RateLimitLayer::new(per_key))
                .moat_quota(QuotaLayer::new(daily))
                .moat_redact(RedactLayer::new(Redactor::new(&Entity::ALL)))
                .moat_moderate(ModerateLayer::default())
                .moat_circuit_breaker(Breaker::new("chat-handler")),
        )
}

async fn ask(url: &str, text: &str) -> (u16, Value) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]});
    let request = http::Request::post(format!("{url}/v1/chat/completions"))
        .header("authorization", "Bearer sk-user-alice")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid request");
    let response = client.request(request).await.expect("the app answers");
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("a whole body")
        .to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::main]
async fn main() {
    let seen = Seen::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let url = format!("http://{}", listener.local_addr().expect("bound"));
    let audit_dir = std::env::temp_dir().join(format!("axum-chat-{}", std::process::id()));
    let audit_file = audit_dir.join("moat-audit.jsonl");
    let log = AuditLog::builder("moat-audit/axum-chat")
        .sink(FileSink::new(&audit_file))
        .start()
        .expect("the audit log starts");
    let service =
        app(seen.clone(), log.clone()).into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, service).await });
    println!("axum-chat: serving on {url}");

    let text = "Email me at jane.doe@example.com about the plan";
    let (status, reply) = ask(&url, text).await;
    assert_eq!(status, 200, "{reply}");
    let answer = reply["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    let handled = seen.lock().unwrap()[0].clone();
    println!("  the user wrote:   {text}");
    println!("  the handler saw:  {handled}");
    println!("  the user got:     {answer}");
    assert!(
        !handled.contains("jane.doe@example.com"),
        "redacted before the handler"
    );
    assert_eq!(answer, text, "restored in the reply");

    // The handler echoes: made to say something abusive, its reply is withheld.
    let (status, withheld) = ask(&url, "Listen, you worthless idiot.").await;
    assert_eq!(status, 200);
    println!(
        "  an abusive reply:  {} ({})",
        withheld["choices"][0]["message"]["content"], withheld["choices"][0]["finish_reason"]
    );
    assert_eq!(withheld["choices"][0]["finish_reason"], "content_filter");
    assert!(!withheld.to_string().contains("idiot"));
    assert_eq!(ask(&url, "hello").await.0, 200);
    let (status, refused) = ask(&url, "one too many").await;
    println!(
        "  the fourth request in a minute: {status} {}",
        refused["error"]["code"]
    );
    assert_eq!(status, 429);
    assert_eq!(refused["error"]["code"], "rate_limit_exceeded");

    log.flush().await.expect("the audit log is written");
    let text = std::fs::read_to_string(&audit_file).expect("the audit log");
    let records: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON record"))
        .filter(|record: &Value| record["type"] == "request")
        .collect();
    assert_eq!(records.len(), 4, "{text}");
    assert_eq!(records[3]["error"]["layer"], "ratelimit");
    let settled = records[0]["moat.decisions"]
        .as_array()
        .expect("decisions")
        .iter()
        .any(|d| d["layer"] == "quota" && d["outcome"]["outcome"] == "usage_settled");
    assert!(settled, "{}", records[0]);
    let moderated = records[1]["moat.decisions"]
        .as_array()
        .expect("decisions")
        .iter()
        .any(|d| d["layer"] == "moderate");
    assert!(moderated, "{}", records[1]);
    assert!(!text.contains("sk-user-alice") && !text.contains("jane.doe@example.com"));
    assert!(moat::audit::verify(&[audit_file], &[], &[])
        .expect("readable")
        .is_ok());
    println!("  the audit log: 4 requests, the refusal's reason, the moderation, no key or address; it verifies");
    let _ = std::fs::remove_dir_all(audit_dir);
    println!("axum-chat: every layer did its job");
}
