//! Memory per key: 1,000,000 distinct keys in moat's `KeyedLimiter` and in governor's keyed
//! limiter (its default DashMap store), as live heap bytes counted by a counting allocator.
//!
//! Run: `cargo bench -p moat-benches --bench ratelimit_memory`

use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;

use governor::{Quota, RateLimiter};
use moat_core::Key;
use moat_ratelimit::{KeyedLimiter, Limit};

const N: u32 = 1_000_000;

fn ip(i: u32) -> IpAddr {
    // Distinct /64s, so every key is its own IPv6 group.
    IpAddr::V6(Ipv6Addr::new(
        0x2001,
        0xdb8,
        (i >> 16) as u16,
        i as u16,
        0,
        0,
        0,
        1,
    ))
}

fn main() {
    // `cargo bench` passes `--bench`; criterion-style filters are ignored here.
    // Each limiter is moved out of its closure, so what it holds is still live when counted.
    let mut kept_moat = None;
    let moat = allocation_counter::measure(|| {
        let limiter = KeyedLimiter::new([Limit::per_minute(60)]).with_max_keys(2 * N as usize);
        for i in 0..N {
            assert!(limiter.check(&Key::ip(ip(i))).is_ok());
        }
        assert_eq!(limiter.len(), N as usize);
        kept_moat = Some(limiter);
    });
    let mut kept_two = None;
    let moat_two = allocation_counter::measure(|| {
        let limiter = KeyedLimiter::new([Limit::per_second(10), Limit::per_day(10_000)])
            .with_max_keys(2 * N as usize);
        for i in 0..N {
            assert!(limiter.check(&Key::ip(ip(i))).is_ok());
        }
        kept_two = Some(limiter);
    });
    let mut kept_governor = None;
    let governor = allocation_counter::measure(|| {
        let limiter = RateLimiter::keyed(Quota::per_minute(NonZeroU32::new(60).unwrap()));
        for i in 0..N {
            assert!(limiter.check_key(&ip(i)).is_ok());
        }
        kept_governor = Some(limiter);
    });
    let mb = |b: f64| b / 1e6;
    println!("memory for {N} keys (live heap bytes after inserting; peak in brackets)");
    println!("| limiter | total | per key | peak |");
    println!("|---|---|---|---|");
    for (name, info) in [
        ("moat KeyedLimiter, 1 limit", moat),
        ("moat KeyedLimiter, 2 limits", moat_two),
        ("governor keyed (DashMap), 1 quota", governor),
    ] {
        println!(
            "| {name} | {:.1} MB | {:.1} B | {:.1} MB |",
            mb(info.bytes_current as f64),
            info.bytes_current as f64 / f64::from(N),
            mb(info.bytes_max as f64)
        );
    }
    drop((kept_moat, kept_two, kept_governor));
}
