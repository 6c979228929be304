//! A gRPC service (tonic's health service stands in for yours) behind moat's rate limit and
//! circuit breaker, and a tonic client that reads their refusals as gRPC statuses.
//!
//! `cargo run -p tonic-guard` serves on a free loopback port, then calls itself: two calls pass;
//! with the breaker forced open (as an operator would during maintenance) the third gets
//! `UNAVAILABLE`; the fourth in the minute gets `RESOURCE_EXHAUSTED` from the rate limit. It
//! exits 0 when all of that held (CI runs it).

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
    tokio::spawn(async move {
        Server::builder()
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
}
