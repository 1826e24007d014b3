//! The tower layer in front of a pmcp streamable-HTTP router.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use http::{HeaderMap, HeaderName, Response};
use tower::Layer;

use crate::circuit_breaker::CircuitBreakerMiddleware;
use crate::error::ConfigError;
use crate::rate_limit::RateLimitMiddleware;

use super::calls::Pending;
use super::cors::CorsOrigins;
use super::keys::{self, ProxyTrust, RequestKey};
use super::service::ResilienceService;
use super::signals::{HeaderNames, Refusals};
use super::tools::ToolCatalog;
use super::trust::{Caller, DEFAULT_MAX_SESSIONS, IssuedSessions};

/// The default bound on a request body read by the layer: 1 MiB.
pub(crate) const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;

pub(crate) struct Settings {
    pub(crate) limiter: Option<RateLimitMiddleware>,
    pub(crate) breaker: Option<CircuitBreakerMiddleware>,
    /// The breaker's calls waiting for their answers.
    pub(crate) pending: Option<Arc<Pending>>,
    pub(crate) tools: Option<ToolCatalog>,
    pub(crate) key: RequestKey,
    pub(crate) proxy: Option<ProxyTrust>,
    pub(crate) max_body_bytes: usize,
    pub(crate) usage_headers: bool,
    pub(crate) refusals: Refusals,
    pub(crate) cors: CorsOrigins,
    pub(crate) names: HeaderNames,
    pub(crate) warned_no_address: AtomicBool,
    /// Session ids the server issued.
    pub(crate) sessions: IssuedSessions,
}

impl Settings {
    /// Who sent a request: a session the server issued, or a client address.
    pub(crate) fn caller(&self, parts: &http::request::Parts) -> Caller {
        if let Some(id) = keys::session_header(&parts.headers)
            && self.sessions.contains(id)
        {
            return Caller::Session(id.to_owned());
        }
        let label = match keys::client_address(parts, self.proxy.as_ref()) {
            Some(ip) => format!("client:{ip}"),
            None => keys::UNKNOWN_CLIENT.to_owned(),
        };
        Caller::Client(label)
    }

    /// Warns once that client addresses are unknown.
    pub(crate) fn warn_no_address(&self) {
        if !self.warned_no_address.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "a request is keyed by client address, but it carries no \
                 ConnectInfo<SocketAddr>: serve with \
                 `into_make_service_with_connect_info::<SocketAddr>()`; such requests \
                 share the key `{}`",
                keys::UNKNOWN_CLIENT
            );
        }
    }

    /// Notes the session id the server issued in answer to `initialize`,
    /// and forgets one the server no longer knows.
    pub(crate) fn learn(&self, caller: &Caller, opens_session: bool, response: &Response<Body>) {
        let status = response.status();
        match caller.session() {
            None if opens_session && status.is_success() => {
                if let Some(id) = keys::session_header(response.headers()) {
                    self.sessions.issued(id);
                }
            }
            Some(id) if status == http::StatusCode::NOT_FOUND => self.sessions.forget(id),
            _ => {}
        }
    }

    /// A refusal, with the status the settings ask for, as an answer of
    /// the layer's own to a request with headers `request`.
    pub(crate) fn refusal(
        &self,
        mut response: Response<Body>,
        request: &HeaderMap,
    ) -> Response<Body> {
        if self.refusals == Refusals::JsonRpcError {
            *response.status_mut() = http::StatusCode::OK;
        }
        self.own(response, request)
    }

    /// An answer of the layer's own, with the CORS and caching headers
    /// pmcp's router puts on its answers.
    pub(crate) fn own(&self, mut response: Response<Body>, request: &HeaderMap) -> Response<Body> {
        self.cors
            .write(request, &self.names, response.headers_mut());
        response
    }
}

/// Rate limits and circuit breaking for a pmcp streamable-HTTP server,
/// decided before a request reaches pmcp (see the [module docs](super)).
///
/// Cheap to clone: clones share the limiter and the breaker.
///
/// ```
/// use pmcp_resilience::circuit_breaker::CircuitBreakerMiddleware;
/// use pmcp_resilience::rate_limit::{RateLimitMiddleware, RateLimitStrategy};
/// use pmcp_resilience::server::ResilienceLayer;
/// use pmcp_resilience::Scope;
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let server = Arc::new(pmcp::Server::builder().name("demo").version("1.0.0").build()?);
/// let layer = ResilienceLayer::builder()
///     .rate_limit(
///         RateLimitMiddleware::builder()
///             .scope(Scope::PerTool)
///             .strategy(RateLimitStrategy::TokenBucket { capacity: 20, refill_rate: 10 })
///             .build()?,
///     )
///     .circuit_breaker(
///         CircuitBreakerMiddleware::builder()
///             .scope(Scope::PerTool)
///             .failure_threshold(5)
///             .timeout(Duration::from_secs(30))
///             .build()?,
///     )
///     // Calls of tools the server does not have share one neutral key.
///     .tools_of(Arc::clone(&server))
///     .build()?;
/// let app = pmcp::axum::concurrent_router(server).layer(layer);
/// # let _ = app;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct ResilienceLayer {
    settings: Arc<Settings>,
}

impl std::fmt::Debug for ResilienceLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &*self.settings;
        f.debug_struct("ResilienceLayer")
            .field("limiter", &s.limiter)
            .field("breaker", &s.breaker)
            .field("key", &s.key)
            .field("proxy", &s.proxy)
            .field("max_body_bytes", &s.max_body_bytes)
            .field("usage_headers", &s.usage_headers)
            .field("refusals", &s.refusals)
            .field("cors", &s.cors)
            .finish()
    }
}

impl ResilienceLayer {
    /// A builder: give it a limiter, a breaker, or both.
    pub fn builder() -> ResilienceLayerBuilder {
        ResilienceLayerBuilder::default()
    }
}

/// Builds a [`ResilienceLayer`]; `build` checks the settings.
///
/// ```
/// use pmcp_resilience::server::ResilienceLayer;
///
/// // A layer with neither a limiter nor a breaker would protect nothing.
/// assert!(ResilienceLayer::builder().build().is_err());
/// ```
#[derive(Debug, Default)]
pub struct ResilienceLayerBuilder {
    limiter: Option<RateLimitMiddleware>,
    breaker: Option<CircuitBreakerMiddleware>,
    tools: Option<ToolCatalog>,
    key: RequestKey,
    proxy: Option<ProxyTrust>,
    max_body_bytes: Option<usize>,
    max_sessions: Option<usize>,
    usage_headers: bool,
    refusals: Refusals,
    cors: CorsOrigins,
    policy_name: Option<String>,
}

impl ResilienceLayerBuilder {
    /// The rate limiter (a handle: the layer shares its state, strategy,
    /// costs, backpressure and metrics with every other handle).
    pub fn rate_limit(mut self, limiter: RateLimitMiddleware) -> Self {
        self.limiter = Some(limiter);
        self
    }

    /// The circuit breaker (a handle, sharing state with the others).
    pub fn circuit_breaker(mut self, breaker: CircuitBreakerMiddleware) -> Self {
        self.breaker = Some(breaker);
        self
    }

    /// The server's tools, by name. A call of any other tool is keyed
    /// `tool:<unknown>` (under [`Scope::PerTool`](crate::Scope::PerTool);
    /// the limiter's and the breaker's keys alike) and judged the caller's
    /// mistake (neutral), so invented names neither cost a key each nor open
    /// a breaker. Without a list (and without
    /// [`tools_of`](Self::tools_of)), every name is its own key, and pmcp's
    /// `Tool '<name>' not found` answer is judged neutral.
    pub fn tools<I, T>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        let names = names.into_iter().map(Into::into).collect();
        self.tools = Some(ToolCatalog::Names(Arc::new(names)));
        self
    }

    /// Learn the tools from pmcp's server itself (the one given to
    /// `pmcp::axum::concurrent_router`), as [`tools`](Self::tools) does from
    /// a list. Only tools registered on the builder are seen.
    pub fn tools_of(mut self, server: Arc<pmcp::Server>) -> Self {
        self.tools = Some(ToolCatalog::Server(server));
        self
    }

    /// Which key the rate limiter uses (default: its own scope).
    pub fn key(mut self, key: RequestKey) -> Self {
        self.key = key;
        self
    }

    /// Trust these proxies for the client address (default: none).
    pub fn trust_proxy(mut self, trust: ProxyTrust) -> Self {
        self.proxy = Some(trust);
        self
    }

    /// The largest request body read (default 1 MiB);
    /// larger bodies are answered 413.
    pub fn max_body_bytes(mut self, max: usize) -> Self {
        self.max_body_bytes = Some(max);
        self
    }

    /// How many session ids (seen on the server's answers to `initialize`)
    /// the layer remembers (default 100,000); past it, the
    /// oldest is forgotten and its requests are keyed by client address.
    pub fn max_sessions(mut self, max: usize) -> Self {
        self.max_sessions = Some(max);
        self
    }

    /// Put the usage headers on admitted responses too (default `false`).
    pub fn with_usage_headers(mut self, on: bool) -> Self {
        self.usage_headers = on;
        self
    }

    /// How refusals (rate limit, open breaker, a limiter whose store
    /// failed) are answered: [`Refusals::JsonRpcError`] (HTTP 200 with the
    /// JSON-RPC error, the default) or [`Refusals::HttpStatus`] (429/503);
    /// [`Refusals`] says which clients each serves.
    pub fn refusals(mut self, refusals: Refusals) -> Self {
        self.refusals = refusals;
        self
    }

    /// `true`: [`Refusals::JsonRpcError`] (the default); `false`:
    /// [`Refusals::HttpStatus`].
    pub fn answer_refusals_with_200(mut self, on: bool) -> Self {
        self.refusals = if on {
            Refusals::JsonRpcError
        } else {
            Refusals::HttpStatus
        };
        self
    }

    /// The browser origins allowed to read the layer's own answers
    /// (default [`CorsOrigins::Localhost`], as pmcp's router): set it as
    /// pmcp's `RouterConfig::allowed_origins`.
    pub fn cors_origins(mut self, origins: CorsOrigins) -> Self {
        self.cors = origins;
        self
    }

    /// The policy name in `RateLimit` and `RateLimit-Policy` (default: the
    /// limiter's scope label).
    pub fn policy_name(mut self, name: impl Into<String>) -> Self {
        self.policy_name = Some(name.into());
        self
    }

    /// Checks the settings and builds the layer.
    pub fn build(self) -> Result<ResilienceLayer, ConfigError> {
        if self.limiter.is_none() && self.breaker.is_none() {
            return Err(ConfigError::invalid(
                "rate_limit",
                "the layer needs a rate limiter, a circuit breaker, or both",
            ));
        }
        let max_body_bytes = self.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if max_body_bytes == 0 {
            return Err(ConfigError::invalid(
                "max_body_bytes",
                "must be above zero: a JSON-RPC request is never empty",
            ));
        }
        if let Some(trust) = &self.proxy {
            trust.validate()?;
        }
        let max_sessions = self.max_sessions.unwrap_or(DEFAULT_MAX_SESSIONS);
        if max_sessions == 0 {
            return Err(ConfigError::invalid(
                "max_sessions",
                "must be above zero: with no session remembered, every request is keyed by address",
            ));
        }
        let (reset, default_name) = match &self.limiter {
            Some(l) => {
                l.backpressure().validate()?;
                let header = &l.backpressure().backpressure_header;
                let reset = HeaderName::from_bytes(header.as_bytes()).map_err(|_| {
                    ConfigError::invalid(
                        "backpressure_header",
                        format!("`{header}` is not a valid HTTP header name"),
                    )
                })?;
                (reset, l.scope().label())
            }
            None => (HeaderName::from_static("x-ratelimit-reset"), "default"),
        };
        let policy_name = self.policy_name.unwrap_or_else(|| default_name.to_string());
        if policy_name.is_empty()
            || !policy_name
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        {
            return Err(ConfigError::invalid(
                "policy_name",
                "must be non-empty printable ASCII without quotes or backslashes",
            ));
        }
        Ok(ResilienceLayer {
            settings: Arc::new(Settings {
                limiter: self.limiter,
                pending: self
                    .breaker
                    .as_ref()
                    .map(|b| Arc::new(Pending::new(b.call_timeout()))),
                breaker: self.breaker,
                tools: self.tools,
                key: self.key,
                proxy: self.proxy,
                max_body_bytes,
                usage_headers: self.usage_headers,
                refusals: self.refusals,
                cors: self.cors,
                names: HeaderNames { reset, policy_name },
                warned_no_address: AtomicBool::new(false),
                sessions: IssuedSessions::new(max_sessions),
            }),
        })
    }
}

impl<S> Layer<S> for ResilienceLayer {
    type Service = ResilienceService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ResilienceService::new(inner, Arc::clone(&self.settings))
    }
}
