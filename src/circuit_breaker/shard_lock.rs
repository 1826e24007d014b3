//! A lock for the shards of the pending-call table, cheaper to release than
//! a general mutex.
//!
//! Every call locks its thread's shard twice (to file the call, then to take
//! it back), each time for a single hash-table operation, and the shards are
//! per thread, so the lock is nearly always free. A general mutex pays an
//! atomic read-modify-write to release (it must check for sleeping waiters);
//! this lock releases with a plain store. A waiter spins briefly and then
//! yields its time slice until the holder is done, so a holder that was
//! preempted does not keep it spinning.

use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};

/// Spins before a waiter starts yielding.
const SPINS: u32 = 64;

/// A value behind a lock held for short operations.
#[derive(Debug, Default)]
pub(crate) struct ShardLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the value is reached only through a `ShardGuard`, and `lock` hands
// out one guard at a time (the flag is taken with an acquiring swap from
// false and given back with a releasing store), so sharing the lock between
// threads shares `T` as a mutex does: `T: Send` is enough.
#[allow(unsafe_code)]
unsafe impl<T: Send> Sync for ShardLock<T> {}

impl<T> ShardLock<T> {
    pub(crate) fn new(value: T) -> Self {
        ShardLock {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// Waits for the lock, spinning briefly and then yielding.
    pub(crate) fn lock(&self) -> ShardGuard<'_, T> {
        let mut spins = 0u32;
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            // Wait on a plain read, which leaves the line shared until the
            // holder releases it.
            while self.locked.load(Ordering::Relaxed) {
                if spins < SPINS {
                    spins += 1;
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
        ShardGuard { lock: self }
    }
}

/// Access to the value while the lock is held; releases it when dropped.
pub(crate) struct ShardGuard<'a, T> {
    lock: &'a ShardLock<T>,
}

impl<T> Deref for ShardGuard<'_, T> {
    type Target = T;

    #[allow(unsafe_code)]
    fn deref(&self) -> &T {
        // SAFETY: this guard holds the lock, so no other reference to the
        // value exists (see the `Sync` impl).
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for ShardGuard<'_, T> {
    #[allow(unsafe_code)]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as for `deref`, and `&mut self` makes this the only
        // reference made through the guard.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for ShardGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_taking_turns_lose_no_update() {
        let lock = ShardLock::new(0u64);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..20_000 {
                        *lock.lock() += 1;
                    }
                });
            }
        });
        assert_eq!(*lock.lock(), 80_000);
    }

    #[test]
    fn a_waiter_gets_the_lock_once_the_holder_lets_go() {
        let lock = ShardLock::new(Vec::new());
        let held = lock.lock();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| lock.lock().push(2));
            // The waiter spins, then yields, until this guard is dropped.
            std::thread::yield_now();
            let mut held = held;
            held.push(1);
            drop(held);
            assert!(waiter.join().is_ok());
        });
        assert_eq!(*lock.lock(), vec![1, 2]);
    }
}
