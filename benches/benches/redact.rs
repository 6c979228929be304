//! moat-redact, side by side with leakguard (hand-written scanners) and llm-pii-redact (one
//! `regex` pass per detector, placeholders and reveal).
//!
//! - `scan_64kb`: 64 KB of prose with nothing to find: ASCII, mixed-script (French, Japanese), and
//!   number-heavy (order numbers, timestamps, prices, UUIDs, hashes: many candidates to reject).
//! - `prompt_2kb`: a 2 KB prompt with an email and a card, redacted.
//! - `restore`: one 8-byte streamed delta through `StreamRestorer`; a whole 2 KB reply.
//! - `reply_side`: one 8-byte streamed delta through `StreamRedactor` (reply-side scrubbing).
//!
//! The peers look for fewer kinds (leakguard 9, llm-pii-redact 7; moat 25 with checksums and
//! context), so equal speed would already mean moat does more per byte.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use moat_redact::{Entity, Operator, Redactor, StreamRedactor, StreamRestorer, Vault};

fn prose(filler: &str, bytes: usize) -> String {
    let mut s = filler.repeat(bytes / filler.len() + 1);
    let mut cut = bytes.min(s.len());
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
    s
}

/// The reply as 8-byte streamed deltas, over and over (the prose is ASCII).
fn deltas(reply: &str) -> impl Iterator<Item = &str> {
    reply
        .as_bytes()
        .chunks(8)
        .cycle()
        .map(|p| std::str::from_utf8(p).unwrap_or(""))
}

fn scan(c: &mut Criterion) {
    let moat = Redactor::new(&Entity::ALL);
    let leakguard = leakguard::Redactor::new();
    let llm_pii = llm_pii_redact::Redactor::default();
    let ascii = prose(
        "The committee reviewed the quarterly plan, version 2 of the roadmap, and 14 open items. ",
        64 * 1024,
    );
    let mixed = prose("Le comité a revu le plan trimestriel — 計画を確認しました。 Version 2, 14 points ouverts. ", 64 * 1024);
    let numbers = prose("Order #100234 shipped 2024-05-01 10:32:11 (build 4521, v1.2.3), total $1,234.56, id 123e4567-e89b-12d3-a456-426614174000, sha 9f86d081884c7d65. ", 64 * 1024);
    let mut group = c.benchmark_group("scan_64kb");
    for (name, text) in [
        ("ascii", &ascii),
        ("mixed-script", &mixed),
        ("number-heavy", &numbers),
    ] {
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(format!("moat/{name}"), |b| {
            b.iter(|| black_box(moat.redact_str(black_box(text), &mut Vault::new()).count))
        });
        group.bench_function(format!("leakguard/{name}"), |b| {
            b.iter(|| black_box(leakguard.clean(black_box(text)).len()))
        });
        group.bench_function(format!("llm-pii-redact/{name}"), |b| {
            b.iter(|| black_box(llm_pii.redact(black_box(text)).text.len()))
        });
    }
    group.finish();
}

fn prompt_text() -> String {
    let mut text = prose(
        "Please summarise the attached notes about the customer's order history and preferences. ",
        2000,
    );
    text.push_str(" Contact jane.doe@example.com, card 4111 1111 1111 1111.");
    text
}

fn prompt(c: &mut Criterion) {
    let moat = Redactor::new(&Entity::ALL);
    let leakguard = leakguard::Redactor::new();
    let llm_pii = llm_pii_redact::Redactor::default();
    let text = prompt_text();
    assert_eq!(moat.redact_str(&text, &mut Vault::new()).count, 2);
    let mut group = c.benchmark_group("prompt_2kb");
    group.bench_function("moat", |b| {
        b.iter(|| black_box(moat.redact_str(black_box(&text), &mut Vault::new()).count))
    });
    group.bench_function("leakguard", |b| {
        b.iter(|| black_box(leakguard.clean(black_box(&text)).len()))
    });
    group.bench_function("llm-pii-redact", |b| {
        b.iter(|| black_box(llm_pii.redact(black_box(&text)).text.len()))
    });
    group.finish();
}

fn restore(c: &mut Criterion) {
    let redactor = Redactor::new(&Entity::ALL);
    let mut vault = Vault::new();
    let _ = redactor.redact_str("jane.doe@example.com 4111 1111 1111 1111", &mut vault);
    let reply = prose(
        "Thanks [EMAIL_1], we charged [CARD_1] and will write again soon. ",
        2048,
    );
    let llm_pii = llm_pii_redact::Redactor::default();
    let peer = llm_pii.redact("jane.doe@example.com 4111 1111 1111 1111");
    let peer_reply = reply
        .replace("[EMAIL_1]", "<EMAIL_0>")
        .replace("[CARD_1]", "<CREDIT_CARD_0>");
    let mut group = c.benchmark_group("restore");
    group.bench_function("moat/stream, 8-byte delta", |b| {
        let mut restorer = StreamRestorer::new();
        let mut pieces = deltas(&reply);
        b.iter(|| black_box(restorer.push(pieces.next().unwrap_or(""), &vault)))
    });
    group.bench_function("moat/2 KB reply at once", |b| {
        b.iter(|| black_box(redactor.restore_str(black_box(&reply), &vault).len()))
    });
    group.bench_function("llm-pii-redact/2 KB reply at once", |b| {
        b.iter(|| black_box(llm_pii.reveal(black_box(&peer_reply), &peer.mapping).len()))
    });
    group.finish();
}

fn reply_side(c: &mut Criterion) {
    let scrub = Redactor::new(&Entity::ALL).with_operator(Operator::Redact);
    let reply = prose(
        "Thanks, we charged your card and will write again soon from the usual address. ",
        2048,
    );
    c.bench_function("reply_side/stream, 8-byte delta", |b| {
        let mut scrubber = StreamRedactor::new();
        let mut pieces = deltas(&reply);
        b.iter(|| black_box(scrubber.push(pieces.next().unwrap_or(""), &scrub)))
    });
}

#[allow(missing_docs)] // generated by the macro
mod group {
    use super::*;
    criterion_group!(benches, scan, prompt, restore, reply_side);
}
use group::benches;
criterion_main!(benches);
