//! A gRPC service (tonic's health service stands in for yours) behind moat's audit log, rate
//! limit and circuit breaker, and a tonic client that reads their refusals as gRPC statuses.
//!
//! `cargo run -p tonic-guard` serves on a free loopback port, then calls itself: two calls pass;
//! with the breaker forced open (as an operator would during maintenance) the third gets
//! `UNAVAILABLE`; the fourth in the minute gets `RESOURCE_EXHAUSTED` from the rate limit. The
//! audit log then holds the four calls, the refusals with their layer, and verifies. It exits 0
//! when all of that held (CI runs it).

use moat::audit::{AuditLayer, AuditLog, FileSink};
use moat::breaker::{Breaker, CircuitBreakerLayer};
use moat::core::identity::PeerIp;
use moat::ratelimit::{RateLimitLayer, Rule};
use tonic::transport::{Channel, Server};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[tokio::main]
async fn main() {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let addr = listener.local_addr().expect("bound");
    let breaker = Breaker::new("inference");
    let limits = RateLimitLayer::new(
        Rule::new("per-peer", PeerIp).limit("3/minute".parse().expect("valid")),
    );
    let guarded = CircuitBreakerLayer::new(breaker.clone());
    let audit_dir = std::env::temp_dir().join(format!("tonic-guard-{}", std::process::id()));
    let audit_file = audit_dir.join("moat-audit.jsonl");
    let log = AuditLog::builder("moat-audit/tonic-guard")
        .sink(FileSink::new(&audit_file))
        .start()
        .expect("the audit log starts");
    let audit = AuditLayer::new(log.clone());
    tokio::spawn(async move {
        Server::builder()
            .layer(audit)
            .layer(limits)
            .layer(guarded)
            .add_service(health)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
    });
    println!("tonic-guard: serving on {addr}");

    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("a valid URI")
        .connect()
        .await
        .expect("connected");
    let mut client = HealthClient::new(channel);
    let check = || HealthCheckRequest {
        service: String::new(),
    };
    for i in 1..=2 {
        client.check(check()).await.expect("within the limit");
        println!("  call {i}: ok");
    }
    // An operator takes the service out (maintenance): the breaker refuses at once.
    breaker.force_open();
    let status = client.check(check()).await.expect_err("forced open");
    println!("  call 3, breaker forced open: {:?}", status.code());
    assert_eq!(status.code(), tonic::Code::Unavailable);
    breaker.reset();
    // Three calls in the minute (the refused one counted too): the fourth is over the limit.
    let status = client.check(check()).await.expect_err("over the limit");
    println!("  call 4: {:?}: {}", status.code(), status.message());
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    println!("tonic-guard: the client read the guard's statuses");

    // Every call is in the audit log, the refusals with the layer that refused.
    log.flush().await.expect("the audit log is written");
    let text = std::fs::read_to_string(&audit_file).expect("the audit log");
    let calls: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON record"))
        .filter(|record: &serde_json::Value| record["type"] == "request")
        .collect();
    assert_eq!(calls.len(), 4, "{text}");
    assert!(calls.iter().all(|c| c["rpc.system"] == "grpc"));
    assert_eq!(calls[2]["error"]["layer"], "breaker");
    assert_eq!(calls[3]["error"]["layer"], "ratelimit");
    let report = moat::audit::verify(&[audit_file], &[], &[]).expect("readable");
    assert!(report.is_ok(), "{:?}", report.problems);
    println!(
        "tonic-guard: {} calls in the audit log, which verifies",
        calls.len()
    );
    let _ = std::fs::remove_dir_all(audit_dir);
}
