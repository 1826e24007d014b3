//! Heap bytes per key: this crate's keyed limiter (each strategy) beside
//! governor 0.10's keyed limiter, measured with a counting allocator while
//! 1,000,000 distinct session-like keys are inserted.
//!
//! Run: `cargo bench --bench memory_per_key`

use std::alloc::{GlobalAlloc, Layout, System};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use governor::{Quota, RateLimiter};
use pmcp_resilience::rate_limit::{KeyedRateLimiter, RateLimitStrategy};
use pmcp_resilience::{RegistryLimits, SystemClock};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: delegates to the system allocator and only counts sizes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const KEYS: usize = 1_000_000;

fn keys() -> Vec<String> {
    (0..KEYS)
        .map(|i| format!("session:{i:08x}-0000-4000-8000-000000000000"))
        .collect()
}

fn main() {
    let keys = keys();
    let key_bytes: usize = keys.iter().map(|k| k.len()).sum::<usize>() / KEYS;
    println!("{KEYS} keys of {key_bytes} bytes each");

    let before = LIVE.load(Ordering::Relaxed);
    let g = RateLimiter::keyed(Quota::per_second(
        NonZeroU32::new(1000).unwrap_or(NonZeroU32::MIN),
    ));
    for k in &keys {
        let _ = g.check_key(k);
    }
    let governor_per_key = (LIVE.load(Ordering::Relaxed) - before) as f64 / KEYS as f64;
    println!("governor keyed (DashMap<String, _>): {governor_per_key:.1} bytes/key");
    drop(g);

    let strategies = [
        (
            "token_bucket",
            RateLimitStrategy::TokenBucket {
                capacity: 1000,
                refill_rate: 1000,
            },
        ),
        (
            "leaky_bucket",
            RateLimitStrategy::LeakyBucket {
                capacity: 1000,
                leak_rate: 1000,
            },
        ),
        (
            "fixed_window",
            RateLimitStrategy::FixedWindow {
                max_requests: 1000,
                window: Duration::from_secs(1),
            },
        ),
        (
            "sliding_window",
            RateLimitStrategy::SlidingWindow {
                max_requests: 1000,
                window: Duration::from_secs(1),
            },
        ),
    ];
    for (name, strategy) in strategies {
        let before = LIVE.load(Ordering::Relaxed);
        let limits = RegistryLimits {
            max_keys: 2 * KEYS,
            idle_after: Duration::from_secs(3600),
        };
        let ours = match KeyedRateLimiter::new(strategy, limits, Arc::new(SystemClock::new())) {
            Ok(l) => l,
            Err(e) => panic!("config: {e}"),
        };
        for k in &keys {
            let _ = ours.check_key(k, 1);
        }
        let per_key = (LIVE.load(Ordering::Relaxed) - before) as f64 / KEYS as f64;
        println!(
            "pmcp-resilience {name}: {per_key:.1} bytes/key ({:.2}x governor), \
             of which the key text {key_bytes} bytes ({:.0}%)",
            per_key / governor_per_key,
            100.0 * key_bytes as f64 / per_key
        );
        drop(ours);
    }

    // A flood of distinct keys against the cap: what each key held costs
    // while idle keys are swept to make room.
    let cap = 100_000;
    let clock = pmcp_resilience::ManualClock::new();
    let before = LIVE.load(Ordering::Relaxed);
    let limits = RegistryLimits {
        max_keys: cap,
        idle_after: Duration::from_secs(1),
    };
    let strategy = RateLimitStrategy::TokenBucket {
        capacity: 10,
        refill_rate: 10,
    };
    let ours = match KeyedRateLimiter::new(strategy, limits, Arc::new(clock.clone())) {
        Ok(l) => l,
        Err(e) => panic!("config: {e}"),
    };
    for k in &keys {
        clock.advance(Duration::from_micros(20));
        let _ = ours.check_key(k, 1);
    }
    let held = ours.registry_stats().keys;
    let per_key = (LIVE.load(Ordering::Relaxed) - before) as f64 / held as f64;
    println!(
        "pmcp-resilience token_bucket, {KEYS} keys flooding a cap of {cap}: \
         {per_key:.1} bytes per key held ({held} held)"
    );
}
