//! A counter that many threads bump without sharing a cache line.
//!
//! Request counters are bumped on every request by every thread; one shared
//! atomic would make the threads take turns owning its cache line. A
//! [`StripedCounter`] spreads the bumps over cache-padded slots chosen per
//! thread and sums them when read, which is rare (a `metrics()` call, a scrape).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// How many slots per-thread structures spread over.
pub(crate) const STRIPES: usize = 16;

/// A slot on cache lines of its own: 128 bytes, as x86 CPUs fetch lines in
/// adjacent pairs.
#[repr(align(128))]
#[derive(Debug, Default)]
struct Stripe(AtomicU64);

/// A sum of per-thread stripes.
#[derive(Debug, Default)]
pub(crate) struct StripedCounter {
    stripes: [Stripe; STRIPES],
}

/// This thread's slot among [`STRIPES`]: threads take slots in turn, so a
/// few busy threads each get their own.
pub(crate) fn stripe_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    INDEX.with(|i| *i)
}

impl StripedCounter {
    /// Adds `n`.
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        self.stripes[stripe_index()]
            .0
            .fetch_add(n, Ordering::Relaxed);
    }

    /// The total so far.
    pub(crate) fn sum(&self) -> u64 {
        self.stripes
            .iter()
            .fold(0u64, |acc, s| acc.wrapping_add(s.0.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_many_threads_add_up() {
        let c = StripedCounter::default();
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        c.add(1);
                    }
                });
            }
        });
        assert_eq!(c.sum(), 80_000);
    }
}
