//! probe
use std::convert::Infallible;
use std::time::Duration;
use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use moat_core::body::RequestBody;
use moat_core::identity::{ClientIp, Global, PeerAddr};
use moat_quota::{Budget, Period, QuotaLayer};
use moat_ratelimit::{Limit, RateLimitLayer, Rule};
use moat_redact::{Entity, RedactLayer, Redactor};
use tower::{Service, ServiceBuilder};

const USAGE: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":500,"completion_tokens":20,"total_tokens":520}}"#;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
struct Tracing;
thread_local! { static ON: Cell<bool> = const { Cell::new(false) }; static IN: Cell<bool> = const { Cell::new(false) }; }
static LOG: std::sync::Mutex<Vec<(usize, String)>> = std::sync::Mutex::new(Vec::new());
unsafe impl GlobalAlloc for Tracing {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if ON.with(|o| o.get()) && !IN.with(|i| i.get()) {
            IN.with(|i| i.set(true));
            let bt = std::backtrace::Backtrace::force_capture().to_string();
            let frames: Vec<&str> = bt.lines().filter(|l| l.trim_start().chars().next().is_some_and(|c| c.is_ascii_digit())).map(|l| l.trim()).filter(|l| !l.contains("alloc::") && !l.contains("probe::Tracing") && !l.contains("__rust") && !l.contains("std::backtrace") && !l.contains("core::") ).take(4).collect();
            LOG.lock().unwrap().push((l.size(), frames.join(" <- ")));
            IN.with(|i| i.set(false));
        }
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) { unsafe { System.dealloc(p, l) } }
}
#[global_allocator]
static A: Tracing = Tracing;

fn main() {
    let text = "Please summarise the attached notes about the quarterly plan and the open items. ".repeat(2);
    let body = Bytes::from(serde_json::json!({"model": "gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": text}]}).to_string());
    let which = std::env::args().nth(1).unwrap_or_default();
    let inner = tower::service_fn(|req: Request<RequestBody<RequestBody<RequestBody<Full<Bytes>>>>>| async move {
        let _ = req.into_body().collect().await;
        Ok::<_, Infallible>(Response::builder().header("content-type", "application/json").body(Full::new(Bytes::from_static(USAGE.as_bytes()))).unwrap())
    });
    let rl = RateLimitLayer::new(Rule::new("per-ip", ClientIp::default()).limit(Limit::new(1 << 40, Duration::from_secs(1)).unwrap()).tokens(Limit::new(1 << 50, Duration::from_secs(60)).unwrap()));
    let q = QuotaLayer::new(Budget::new("daily", Global, Period::Day).tokens(u64::MAX / 4));
    let r = RedactLayer::new(Redactor::new(&Entity::ALL));
    let mut svc = ServiceBuilder::new().layer(rl).layer(q).layer(r).service(inner);
    let req = || {
        let mut r = Request::post("/v1/chat/completions").header("content-type", "application/json").header("authorization", "Bearer sk-proj-0123456789abcdefghijklmnopqrstuvwxyz").body(Full::new(body.clone())).unwrap();
        r.extensions_mut().insert(PeerAddr("192.0.2.1:1".parse().unwrap()));
        r
    };
    for _ in 0..100 { let res = svc.call(req()).now_or_never().unwrap().unwrap(); let _ = res.into_body().collect().now_or_never(); }
    let r0 = req();
    ON.with(|o| o.set(true));
    let res = svc.call(r0).now_or_never().unwrap().unwrap();
    let _ = res.into_body().collect().now_or_never();
    ON.with(|o| o.set(false));
    let log = LOG.lock().unwrap();
    println!("{which} {} allocations", log.len());
    for (size, frames) in log.iter() { println!("{size:6} {frames}"); }
}
