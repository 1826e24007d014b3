//! How the limiter admits a request: the decision, the wait in line and
//! the answer a refused caller gets.

use std::sync::atomic::Ordering;

use pmcp::error::ErrorCode;
use serde_json::json;

use super::*;
use crate::scope::key_in_context;

impl RateLimitMiddleware {
    /// Decides on one request, waiting if the decision says so.
    pub(super) async fn admit(
        &self,
        request: &JSONRPCRequest,
        context: &MiddlewareContext,
    ) -> pmcp::Result<()> {
        let inner = &*self.inner;
        let resolved = key_in_context(&inner.scope, request, context, &self.target);
        if let Some(missing) = resolved.missing
            && !inner.warned_missing.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                ?missing,
                key = resolved.key.as_str(),
                "rate limit scope needs a part the request does not carry; \
                 such requests share one limiter"
            );
        }
        let key = resolved.key;
        let cost = inner.cost.of(request);
        self.admit_key(key, cost, request, context).await.result
    }

    /// Decides on `cost` units for `key`, waiting if the decision says so;
    /// returns the decision with the outcome (the server layer turns it into
    /// HTTP headers).
    pub(crate) async fn admit_key(
        &self,
        key: ScopeKey,
        cost: u32,
        request: &JSONRPCRequest,
        context: &MiddlewareContext,
    ) -> Verdict {
        let inner = &*self.inner;
        self.count(&inner.metrics.total_requests, 1);
        match &inner.engine {
            Engine::Memory(limiter) => {
                self.admit_in_memory(limiter, key, cost, request, context)
                    .await
            }
            Engine::Custom(limiter) => {
                self.admit_reserving(limiter, key, cost, request, context)
                    .await
            }
        }
    }

    /// The built-in limiter: requests that must wait queue per key (see
    /// [`WaitQueue`]); nothing is taken from the limiter before a request is
    /// admitted.
    async fn admit_in_memory(
        &self,
        limiter: &KeyedRateLimiter,
        key: ScopeKey,
        cost: u32,
        request: &JSONRPCRequest,
        context: &MiddlewareContext,
    ) -> Verdict {
        let inner = &*self.inner;
        let arrived = inner.clock.now();
        // The leaky bucket delays what it admits whatever the settings.
        let may_wait = inner.backpressure.wait_for_capacity
            || matches!(limiter.policy(), Policy::LeakyBucket { .. });
        if !may_wait {
            let decision = limiter.check_key_at(key.as_str(), cost, arrived);
            return self.answer(&key, decision, request, context);
        }
        if inner.waiters.is_empty() {
            let decision = limiter.admit_now(key.as_str(), cost, arrived);
            if decision.allowed && decision.wait.is_zero() {
                return self.answer(&key, decision, request, context);
            }
        }
        let budget = inner.backpressure.wait_budget();
        let arrival = inner.waiters.arrive(
            &key,
            cost,
            || limiter.admit_now(key.as_str(), cost, arrived),
            |ahead| limiter.decide_behind(key.as_str(), ahead, cost, arrived, budget),
        );
        let mut ticket = match arrival {
            Arrival::Admitted(decision) => return self.answer(&key, decision, request, context),
            Arrival::Rejected { decision, full } => {
                if full {
                    tracing::debug!(key = key.as_str(), "too many requests waiting for capacity");
                }
                limiter.count_rejection(key.as_str());
                let error = self.reject(&key, &decision, request, context);
                return Verdict::refused(Some(decision), error);
            }
            Arrival::Queued(ticket) => ticket,
        };
        let waiting_since = tokio::time::Instant::now();
        let mut decision = loop {
            let now = inner.clock.now();
            match ticket.turn(now, |at| limiter.admit_now(key.as_str(), cost, at)) {
                Turn::NotYet => ticket.woken().await,
                Turn::Sleep(wait) => tokio::time::sleep(wait).await,
                Turn::Admitted(decision) => break decision,
            }
        };
        decision.wait = waiting_since.elapsed();
        self.waited(decision.wait, context);
        Verdict::admitted(decision)
    }

    /// A custom or shared-store limiter: a request that must wait reserves
    /// its slot in the limiter at once and sleeps until it; if it gives up,
    /// the limiter's [`cancel`](RateLimiter::cancel) gives the slot back
    /// when the store can (see [`Reservation`](super::Reservation)).
    async fn admit_reserving(
        &self,
        limiter: &Arc<dyn RateLimiter>,
        key: ScopeKey,
        cost: u32,
        request: &JSONRPCRequest,
        context: &MiddlewareContext,
    ) -> Verdict {
        let inner = &*self.inner;
        let now = inner.clock.now();
        let budget = inner.backpressure.wait_budget();
        let admission = match limiter.acquire(&key, cost, now, budget).await {
            Ok(admission) => admission,
            Err(e) => {
                self.count(&inner.metrics.rejected_requests, 1);
                crate::metrics::mark_method(context, &request.method);
                return Verdict::refused(
                    None,
                    Error::protocol(
                        ErrorCode::INTERNAL_ERROR,
                        format!("rate limiter store failed for {key}: {e}"),
                    ),
                );
            }
        };
        let Admission {
            decision,
            reservation,
        } = admission;
        if !decision.allowed || decision.wait.is_zero() {
            return self.answer(&key, decision, request, context);
        }
        let refund = {
            let this = self.clone();
            let key = key.clone();
            move || {
                if let Some(reservation) = reservation {
                    this.cancel(&key, reservation);
                }
            }
        };
        let Some(place) = inner.waiters.enter() else {
            refund();
            let mut full = decision;
            full.allowed = false;
            full.retry_after = Some(decision.wait);
            tracing::debug!(key = key.as_str(), "too many requests waiting for capacity");
            let error = self.reject(&key, &full, request, context);
            return Verdict::refused(Some(full), error);
        };
        let guard = WaitGuard::new(place, refund);
        tokio::time::sleep(decision.wait).await;
        guard.complete();
        self.waited(decision.wait, context);
        Verdict::admitted(decision)
    }

    /// The verdict on a decision taken without waiting.
    fn answer(
        &self,
        key: &ScopeKey,
        decision: Decision,
        request: &JSONRPCRequest,
        context: &MiddlewareContext,
    ) -> Verdict {
        if decision.allowed {
            self.count(&self.inner.metrics.allowed_requests, 1);
            context.record_metric("rate_limit_passed".to_string(), 1.0);
            Verdict::admitted(decision)
        } else {
            let error = self.reject(key, &decision, request, context);
            Verdict::refused(Some(decision), error)
        }
    }

    /// Counts a request admitted after waiting `wait`.
    fn waited(&self, wait: Duration, context: &MiddlewareContext) {
        let inner = &*self.inner;
        self.count(&inner.metrics.allowed_requests, 1);
        self.count(&inner.metrics.waited_requests, 1);
        self.count(
            &inner.metrics.wait_time_nanos,
            crate::clock::duration_nanos(wait),
        );
        if inner.metrics_config.enabled {
            inner.metrics.wait_histogram.record(wait);
        }
        context.record_metric("rate_limit_waited_ms".to_string(), wait.as_secs_f64() * 1e3);
    }

    /// The cost of `request` in units.
    #[cfg(feature = "server")]
    pub(crate) fn cost_of(&self, request: &JSONRPCRequest) -> u32 {
        self.inner.cost.of(request)
    }

    /// The backpressure settings.
    #[cfg(feature = "server")]
    pub(crate) fn backpressure(&self) -> &BackpressureConfig {
        &self.inner.backpressure
    }

    /// The time over which the limit applies (a window, or the time to
    /// refill from empty); `None` for a custom limiter.
    #[cfg(feature = "server")]
    pub(crate) fn window(&self) -> Option<Duration> {
        match &self.inner.engine {
            Engine::Memory(limiter) => Some(Duration::from_nanos(match limiter.policy() {
                Policy::FixedWindow { window, .. } | Policy::SlidingWindow { window, .. } => window,
                Policy::TokenBucket { capacity, interval }
                | Policy::LeakyBucket { capacity, interval } => {
                    u64::from(capacity).saturating_mul(interval)
                }
            })),
            Engine::Custom(_) => None,
        }
    }

    /// Gives back a reservation whose request stopped waiting.
    fn cancel(&self, key: &ScopeKey, reservation: crate::rate_limit::strategy::Reservation) {
        let now = self.inner.clock.now();
        match &self.inner.engine {
            Engine::Memory(limiter) => {
                limiter.cancel_at(key.as_str(), &reservation, now);
            }
            Engine::Custom(limiter) => {
                // Drop cannot await: hand the refund to the runtime if there is one.
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    let limiter = Arc::clone(limiter);
                    let key = key.clone();
                    handle.spawn(async move {
                        if let Err(e) = limiter.cancel(&key, &reservation, now).await {
                            tracing::warn!(key = key.as_str(), error = %e, "could not give back a rate-limit reservation");
                        }
                    });
                }
            }
        }
    }

    fn reject(
        &self,
        key: &ScopeKey,
        decision: &Decision,
        request: &JSONRPCRequest,
        context: &MiddlewareContext,
    ) -> Error {
        let inner = &*self.inner;
        self.count(&inner.metrics.rejected_requests, 1);
        crate::metrics::mark_method(context, &request.method);
        context.record_metric("rate_limit_exceeded".to_string(), 1.0);
        tracing::debug!(key = key.as_str(), method = %request.method, "rate limit exceeded");
        if !inner.backpressure.signal_client {
            return Error::RateLimited;
        }
        let retry_ms = decision.retry_after.map(crate::clock::ceil_millis);
        let message = match retry_ms {
            Some(ms) => format!("rate limit exceeded for {key}; retry after {ms} ms"),
            None => format!(
                "rate limit exceeded for {key}: this request costs more than the limit of {} and can never be admitted",
                decision.limit
            ),
        };
        Error::Protocol {
            code: ErrorCode::RATE_LIMITED,
            message,
            data: Some(json!({
                "retryAfterMs": retry_ms,
                "limit": decision.limit,
                "remaining": decision.remaining,
                "resetAtMs": decision.reset_at.as_millis(),
                "scope": inner.scope.label(),
                "key": key.as_str(),
                "header": inner.backpressure.backpressure_header,
            })),
        }
    }
}
