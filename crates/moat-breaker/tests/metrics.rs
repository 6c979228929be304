//! The breaker's metrics, read back from a recorder.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString,
    Unit,
};
use moat_breaker::{Breaker, BreakerConfig, CallOutcome, CircuitBreakerLayer, Fallback, Window};
use moat_core::clock::ManualClock;
use tower::{service_fn, Layer, ServiceExt};

/// Every counter and gauge by name and labels (`name{k=v,...}`), as plain numbers.
#[derive(Default)]
struct Captured {
    values: Mutex<BTreeMap<String, Arc<Value>>>,
}

#[derive(Default)]
struct Value(AtomicU64);

impl CounterFn for Value {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::SeqCst);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::SeqCst);
    }
}

impl GaugeFn for Value {
    fn increment(&self, _: f64) {}
    fn decrement(&self, _: f64) {}
    fn set(&self, value: f64) {
        self.0.store(value as u64, Ordering::SeqCst);
    }
}

impl Captured {
    fn slot(&self, key: &Key) -> Arc<Value> {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        self.values.lock().unwrap().entry(name).or_default().clone()
    }

    fn get(&self, name: &str) -> u64 {
        self.values
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |v| v.0.load(Ordering::SeqCst))
    }
}

impl Recorder for Captured {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.slot(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.slot(key))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[test]
fn state_calls_refusals_transitions_and_fallbacks_are_counted() {
    let recorder = Captured::default();
    metrics::with_local_recorder(&recorder, || {
        let clock = ManualClock::new();
        let breaker = Breaker::builder("metered")
            .config(
                BreakerConfig::default()
                    .with_window(Window::Count(2))
                    .with_minimum_calls(2),
            )
            .clock(Arc::new(clock.clone()))
            .build()
            .unwrap();
        breaker.try_acquire().unwrap().record(CallOutcome::Success);
        breaker.try_acquire().unwrap().record(CallOutcome::Failure);
        assert_eq!(
            recorder.get("moat_breaker_state{breaker=metered}"),
            1,
            "open"
        );
        assert!(breaker.try_acquire().is_err());
        breaker.rate_limited(Duration::from_secs(1));

        // A ladder whose first target is open serves from the second.
        let up = service_fn(|_req: Request<_>| async {
            Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("ok"))))
        });
        let backup = Breaker::builder("backup")
            .clock(Arc::new(clock.clone()))
            .build()
            .unwrap();
        let ladder = Fallback::new()
            .target(
                "metered",
                CircuitBreakerLayer::new(breaker.clone()).layer(up),
            )
            .target("backup", CircuitBreakerLayer::new(backup).layer(up));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let response = ladder
                .oneshot(Request::new(Full::new(Bytes::from("{}"))))
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            response.into_body().collect().await.unwrap();
        });
    });
    for (name, value) in [
        (
            "moat_breaker_calls_total{breaker=metered,outcome=success}",
            1,
        ),
        (
            "moat_breaker_calls_total{breaker=metered,outcome=failure}",
            1,
        ),
        ("moat_breaker_refused_total{breaker=metered,reason=open}", 1),
        // The ladder's call came while the 429 mark stood.
        (
            "moat_breaker_refused_total{breaker=metered,reason=rate_limited}",
            1,
        ),
        ("moat_breaker_transitions_total{breaker=metered,to=open}", 1),
        ("moat_breaker_rate_limited_total{breaker=metered}", 1),
        (
            "moat_breaker_calls_total{breaker=backup,outcome=success}",
            1,
        ),
        ("moat_breaker_fallbacks_total{from=metered}", 1),
    ] {
        assert_eq!(recorder.get(name), value, "{name}");
    }
}
