//! Injectable time.
//!
//! Every decision in this crate is a pure function of stored state and a
//! [`Timestamp`]. The middlewares read the time from a [`Clock`], so tests
//! drive time with a [`ManualClock`] instead of sleeping.
//!
//! A [`Timestamp`] counts nanoseconds since the Unix epoch, so state written by
//! one process (to a file or Redis) still means something to the next. The
//! default [`SystemClock`] reads the wall clock once, at construction, and then
//! advances with a monotonic counter: a wall-clock step (NTP, a suspended VM)
//! never makes time run backwards inside a process.
//!
//! ```
//! use pmcp_resilience::clock::{Clock, ManualClock};
//! use std::time::Duration;
//!
//! let clock = ManualClock::new();
//! let t0 = clock.now();
//! clock.advance(Duration::from_millis(250));
//! assert_eq!(clock.now().saturating_since(t0), Duration::from_millis(250));
//! ```

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A point in time: nanoseconds since the Unix epoch.
///
/// Small (one `u64`) so that it persists and ships as is.
///
/// ```
/// use pmcp_resilience::Timestamp;
/// use std::time::Duration;
///
/// let t = Timestamp::from_millis(1_700_000_000_000);
/// let later = t.saturating_add(Duration::from_millis(1_500));
/// assert_eq!(later.saturating_since(t), Duration::from_millis(1_500));
/// assert_eq!(later.as_millis(), 1_700_000_001_500);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The Unix epoch.
    pub const ZERO: Timestamp = Timestamp(0);

    /// A timestamp from nanoseconds since the Unix epoch.
    pub const fn from_nanos(nanos: u64) -> Self {
        Timestamp(nanos)
    }

    /// A timestamp from milliseconds since the Unix epoch (saturating).
    pub const fn from_millis(millis: u64) -> Self {
        Timestamp(millis.saturating_mul(1_000_000))
    }

    /// Nanoseconds since the Unix epoch.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Milliseconds since the Unix epoch, rounded down.
    pub const fn as_millis(self) -> u64 {
        self.0 / 1_000_000
    }

    /// This timestamp plus `d`, saturating at the far future.
    pub fn saturating_add(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_add(duration_nanos(d)))
    }

    /// This timestamp minus `d`, saturating at the epoch.
    pub fn saturating_sub(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_sub(duration_nanos(d)))
    }

    /// Time elapsed from `earlier` to `self`, or zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// The same instant as a [`SystemTime`], for reporting.
    pub fn to_system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.0)
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Timestamp({}.{:09}s)",
            self.0 / 1_000_000_000,
            self.0 % 1_000_000_000
        )
    }
}

/// RFC 3339 in UTC with milliseconds, as [`Rfc3339`](crate::display::Rfc3339)
/// shows it: `2026-11-30T05:50:04.120Z`.
///
/// ```
/// use pmcp_resilience::Timestamp;
///
/// assert_eq!(Timestamp::from_millis(951_782_400_250).to_string(), "2000-02-29T00:00:00.250Z");
/// ```
impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&crate::display::Rfc3339::from(*self), f)
    }
}

/// A [`Duration`] in nanoseconds, saturating at `u64::MAX` (about 584 years).
pub(crate) fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Whole milliseconds of `d`, rounded up (a client retrying after that long
/// finds capacity), saturating.
pub(crate) fn ceil_millis(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// A source of [`Timestamp`]s.
///
/// Implementations must be cheap (it is called on every request) and must not
/// go backwards.
///
/// ```
/// use pmcp_resilience::circuit_breaker::Verdict;
/// use pmcp_resilience::{CircuitBreakerMiddleware, Clock, Timestamp};
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// // A clock of your own: here, one stopped at a fixed instant.
/// #[derive(Debug)]
/// struct Frozen(Timestamp);
///
/// impl Clock for Frozen {
///     fn now(&self) -> Timestamp {
///         self.0
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let frozen = Frozen(Timestamp::from_millis(1_700_000_000_000));
/// let cb = CircuitBreakerMiddleware::builder()
///     .failure_threshold(1)
///     .timeout(Duration::from_secs(30))
///     .clock(Arc::new(frozen))
///     .build()
///     .expect("valid settings");
/// cb.acquire("global").await.expect("closed").record(Verdict::Failure).await;
/// // The breaker reads time only from its clock: stopped, the open time never runs down.
/// assert_eq!(cb.retry_after("global"), Some(Duration::from_secs(30)));
/// # }
/// ```
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The production clock: wall time at start-up, advanced monotonically.
///
/// Reading it costs one `quanta` counter read (about 10 ns), not a system call.
///
/// ```
/// use pmcp_resilience::{Clock, SystemClock};
/// use std::time::SystemTime;
///
/// let clock = SystemClock::new();
/// let (a, b) = (clock.now(), clock.now());
/// assert!(b >= a); // never backwards, whatever the wall clock does
/// // Anchored to the wall clock: a timestamp written by this process means
/// // the same instant to the next one.
/// let drift = SystemTime::now().duration_since(a.to_system_time()).unwrap_or_default();
/// assert!(drift.as_secs() < 60);
/// ```
#[derive(Clone)]
pub struct SystemClock {
    counter: quanta::Clock,
    origin_raw: u64,
    origin_wall: u64,
}

impl fmt::Debug for SystemClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SystemClock")
            .field("origin_wall", &Timestamp(self.origin_wall))
            .finish()
    }
}

impl SystemClock {
    /// A clock anchored to the wall clock now.
    pub fn new() -> Self {
        let counter = quanta::Clock::new();
        let origin_raw = counter.raw();
        let origin_wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(duration_nanos)
            .unwrap_or(0);
        SystemClock {
            counter,
            origin_raw,
            origin_wall,
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let elapsed = self
            .counter
            .delta_as_nanos(self.origin_raw, self.counter.raw());
        Timestamp(self.origin_wall.saturating_add(elapsed))
    }
}

/// A clock that moves only when told to: for tests and simulations.
///
/// Clones share the same time.
///
/// ```
/// use pmcp_resilience::{CircuitBreakerMiddleware, Clock, ManualClock};
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// let clock = ManualClock::new();
/// let cb = CircuitBreakerMiddleware::builder()
///     .timeout(Duration::from_secs(30))
///     .clock(Arc::new(clock.clone()))
///     .build()
///     .expect("valid settings");
/// cb.force_open("global");
/// let before = clock.now();
/// clock.advance(Duration::from_secs(5)); // no test sleeps
/// assert_eq!(clock.now().saturating_since(before), Duration::from_secs(5));
/// ```
#[derive(Clone, Debug)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A manual clock starting at 2026-01-01T00:00:00Z (a realistic, non-zero time).
    pub fn new() -> Self {
        Self::starting_at(Timestamp::from_millis(1_767_225_600_000))
    }

    /// A manual clock starting at `start`.
    pub fn starting_at(start: Timestamp) -> Self {
        ManualClock {
            nanos: Arc::new(AtomicU64::new(start.0)),
        }
    }

    /// Move time forward by `d`.
    pub fn advance(&self, d: Duration) {
        let step = duration_nanos(d);
        // fetch_update never fails with a closure that always returns Some.
        let _ = self
            .nanos
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_add(step))
            });
    }

    /// Set the time; earlier values are ignored so the clock never goes back.
    pub fn set(&self, to: Timestamp) {
        self.nanos.fetch_max(to.0, Ordering::AcqRel);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.nanos.load(Ordering::Acquire))
    }
}

/// A shared clock handle, as the builders take it.
pub(crate) type SharedClock = Arc<dyn Clock>;

/// The default clock used by the builders.
pub(crate) fn default_clock() -> SharedClock {
    Arc::new(SystemClock::new())
}

/// A clock that follows tokio's time: wall time at construction, advanced by
/// `tokio::time::Instant`.
///
/// With tokio's paused time (`#[tokio::test(start_paused = true)]`), it
/// moves exactly as far as `tokio::time::sleep` and `advance` make tokio's
/// time move, so waiting can be tested without really sleeping. Create it
/// inside the runtime.
///
/// ```
/// use pmcp_resilience::{Clock, TokioClock};
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let clock = TokioClock::new(); // inside the runtime
/// let before = clock.now();
/// tokio::time::sleep(Duration::from_secs(30)).await; // paused time: returns at once
/// assert_eq!(clock.now().saturating_since(before), Duration::from_secs(30));
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct TokioClock {
    origin: tokio::time::Instant,
    origin_wall: u64,
}

impl TokioClock {
    /// A clock anchored to the wall clock and tokio's time now.
    pub fn new() -> Self {
        TokioClock {
            origin: tokio::time::Instant::now(),
            origin_wall: SystemClock::new().now().0,
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        let elapsed = tokio::time::Instant::now().saturating_duration_since(self.origin);
        Timestamp(self.origin_wall.saturating_add(duration_nanos(elapsed)))
    }
}
