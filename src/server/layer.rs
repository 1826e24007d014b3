//! The tower layer in front of a pmcp streamable-HTTP router.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderName, Method, Request, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use pmcp::ErrorCode;
use pmcp::shared::MiddlewareContext;
use tower::{Layer, Service};

use crate::circuit_breaker::CircuitBreakerMiddleware;
use crate::error::ConfigError;
use crate::rate_limit::RateLimitMiddleware;

use super::calls::{Admitted, CallSet, OwnedOutcome, Pending};
use super::keys::{self, BodyError, ProxyTrust, RequestKey};
use super::signals::{self, HeaderNames, Usage};
use super::sse::{self, AnswerSink};
use super::tools::{self, ToolCall, ToolCatalog};

/// The default bound on a request body read by the layer: 1 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;

struct Settings {
    limiter: Option<RateLimitMiddleware>,
    breaker: Option<CircuitBreakerMiddleware>,
    /// The breaker's calls waiting for their answers.
    pending: Option<Arc<Pending>>,
    tools: Option<ToolCatalog>,
    key: RequestKey,
    proxy: Option<ProxyTrust>,
    max_body_bytes: usize,
    usage_headers: bool,
    refusals_as_200: bool,
    names: HeaderNames,
    warned_no_address: AtomicBool,
}

impl Settings {
    /// A refusal with the status the settings ask for.
    fn refusal(&self, mut response: Response<Body>) -> Response<Body> {
        if self.refusals_as_200 {
            *response.status_mut() = http::StatusCode::OK;
        }
        response
    }
}

/// Rate limits and circuit breaking for a pmcp streamable-HTTP server,
/// decided before a request reaches pmcp (see the [module docs](super)).
///
/// Cheap to clone: clones share the limiter and the breaker.
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
            .field("refusals_as_200", &s.refusals_as_200)
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
#[derive(Debug, Default)]
pub struct ResilienceLayerBuilder {
    limiter: Option<RateLimitMiddleware>,
    breaker: Option<CircuitBreakerMiddleware>,
    tools: Option<ToolCatalog>,
    key: RequestKey,
    proxy: Option<ProxyTrust>,
    max_body_bytes: Option<usize>,
    usage_headers: bool,
    refusals_as_200: bool,
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

    /// The largest request body read (default [`DEFAULT_MAX_BODY_BYTES`]);
    /// larger bodies are answered 413.
    pub fn max_body_bytes(mut self, max: usize) -> Self {
        self.max_body_bytes = Some(max);
        self
    }

    /// Put the usage headers on admitted responses too (default `false`).
    pub fn with_usage_headers(mut self, on: bool) -> Self {
        self.usage_headers = on;
        self
    }

    /// Answer refusals (rate limit, open breaker) with HTTP 200 instead of
    /// 429/503, keeping every header and the JSON-RPC error body (default
    /// `false`).
    ///
    /// For clients that read JSON-RPC errors only from 2xx answers: pmcp
    /// 2.23's streamable-HTTP client (2025 protocol era) turns any non-2xx
    /// answer into `Error::Transport(Request("Request failed with status:
    /// 429 Too Many Requests"))` and drops the body, so the retry hint is
    /// lost; with this setting it gets `Error::Protocol { code: -32005,
    /// data: {"retryAfterMs", ..} }`. Plain HTTP clients and gateways then
    /// lose the status code, so turn it on only for such fleets.
    pub fn answer_refusals_with_200(mut self, on: bool) -> Self {
        self.refusals_as_200 = on;
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
                refusals_as_200: self.refusals_as_200,
                names: HeaderNames { reset, policy_name },
                warned_no_address: AtomicBool::new(false),
            }),
        })
    }
}

impl<S> Layer<S> for ResilienceLayer {
    type Service = ResilienceService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ResilienceService {
            inner,
            settings: Arc::clone(&self.settings),
        }
    }
}

/// The service made by [`ResilienceLayer`].
#[derive(Clone)]
pub struct ResilienceService<S> {
    inner: S,
    settings: Arc<Settings>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for ResilienceService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResilienceService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> Service<Request<Body>> for ResilienceService<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        // The clone may not be ready: keep the one that is.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let settings = Arc::clone(&self.settings);
        Box::pin(handle(settings, inner, request))
    }
}

async fn handle<S>(
    settings: Arc<Settings>,
    mut inner: S,
    request: Request<Body>,
) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    if request.method() == Method::GET {
        return stream(&settings, inner, request).await;
    }
    if request.method() != Method::POST {
        // DELETE (ending a session) carries no JSON-RPC request: it passes,
        // uncounted.
        return inner.call(request).await;
    }
    let max = settings.max_body_bytes;
    let (parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Ok(signals::too_large(max));
    }
    let bytes: Bytes = match Limited::new(body, max).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Ok(signals::too_large(max));
        }
        Err(e) => {
            return Ok(signals::bad_request(
                ErrorCode::PARSE_ERROR.as_i32(),
                &format!("could not read the request body: {e}"),
            ));
        }
    };
    let message = match keys::parse_message(&bytes) {
        Ok(m) => m,
        Err(BodyError::Parse(e)) => {
            return Ok(signals::bad_request(
                ErrorCode::PARSE_ERROR.as_i32(),
                &format!("parse error: {e}"),
            ));
        }
        Err(BodyError::Invalid(why)) => {
            return Ok(signals::bad_request(
                ErrorCode::INVALID_REQUEST.as_i32(),
                why,
            ));
        }
    };
    let session = keys::session_id(&parts);

    let mut tightest: Option<Usage> = None;
    if let Some(limiter) = &settings.limiter {
        let http_key = keys::http_key(&settings.key, &parts, settings.proxy.as_ref());
        if http_key
            .as_ref()
            .is_some_and(|k| k.as_str() == keys::UNKNOWN_CLIENT)
            && !settings.warned_no_address.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                "rate limit keyed by client address, but the request carries no \
                 ConnectInfo<SocketAddr>: serve with \
                 `into_make_service_with_connect_info::<SocketAddr>()`; such requests \
                 share the key `{}`",
                keys::UNKNOWN_CLIENT
            );
        }
        let window = limiter.window();
        // The limiter's hooks note metrics in a pmcp context that nothing
        // reads here: one per HTTP request, not one per call of a batch.
        let context = MiddlewareContext::default();
        for call in &message.calls {
            let key = match &http_key {
                Some(k) => k.clone(),
                None => {
                    let (keyed, _) = tools::classify(call, settings.tools.as_ref());
                    limiter
                        .scope()
                        .key_with(&keyed, || None, || session.clone())
                }
            };
            let cost = limiter.cost_of(call);
            let verdict = limiter.admit_key(key.clone(), cost, call, &context).await;
            let now = limiter.now();
            match (verdict.result, verdict.decision) {
                (Ok(()), Some(decision)) => {
                    if tightest.is_none_or(|t| decision.remaining < t.decision.remaining) {
                        tightest = Some(Usage {
                            decision,
                            now,
                            window,
                        });
                    }
                }
                (Ok(()), None) => {}
                (Err(_), Some(decision)) => {
                    let usage = Usage {
                        decision,
                        now,
                        window,
                    };
                    return Ok(settings.refusal(signals::rate_limited(
                        message.reply_id,
                        &usage,
                        &settings.names,
                        limiter.scope().label(),
                        &key,
                    )));
                }
                (Err(e), None) => return Ok(signals::limiter_failed(message.reply_id, &e)),
            }
        }
    }

    let mut calls = None;
    if let (Some(breaker), Some(pending)) = (&settings.breaker, &settings.pending)
        && !message.calls.is_empty()
    {
        let mut permits = Vec::with_capacity(message.calls.len());
        for call in &message.calls {
            let (keyed, tool) = tools::classify(call, settings.tools.as_ref());
            let key = breaker
                .key_scope()
                .key_with(&keyed, || None, || session.clone());
            match breaker.acquire(key.as_str()).await {
                // An unknown tool's call is the caller's mistake whatever
                // pmcp answers: the permit is dropped, the call ends neutral.
                Ok(_permit) if tool == ToolCall::Unknown => {}
                Ok(permit) => permits.push(Admitted {
                    id: serde_json::to_string(&call.id).unwrap_or_default(),
                    permit,
                    unchecked_tool: match tool {
                        ToolCall::Unchecked(name) => Some(name),
                        ToolCall::Plain | ToolCall::Unknown => None,
                    },
                }),
                // The permits taken before are dropped: those calls end neutral.
                Err(refused) => {
                    let retry = refused
                        .retry_after
                        .unwrap_or_else(|| breaker.policy().timeout);
                    return Ok(settings.refusal(signals::circuit_open(
                        message.reply_id,
                        Some(retry),
                        breaker.key_scope().label(),
                        &refused.key,
                    )));
                }
            }
        }
        calls = Some(pending.open(session.as_deref(), permits));
    }

    let mut response = inner
        .call(Request::from_parts(parts, Body::from(bytes)))
        .await?;
    if let Some(calls) = calls {
        response = match settle(calls, response).await {
            Ok(r) => r,
            Err(e) => return Ok(signals::upstream_failed(&e.to_string())),
        };
    }
    if settings.usage_headers
        && let Some(usage) = tightest
    {
        usage.write(&settings.names, response.headers_mut());
    }
    Ok(response)
}

/// Whether `headers` declare the content type `kind`.
fn content_type_is(headers: &http::HeaderMap, kind: &str) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with(kind))
}

/// Ends the calls of a POST by its answer: an HTTP status, the JSON-RPC
/// responses of a JSON body (read whole), those of an event stream (read as
/// it passes), or on the session's stream after a 202.
async fn settle(calls: CallSet, response: Response<Body>) -> Result<Response<Body>, axum::Error> {
    let status = response.status();
    if status == http::StatusCode::ACCEPTED {
        calls.park();
        return Ok(response);
    }
    if !status.is_success() {
        calls.end_all(&OwnedOutcome::HttpStatus(status));
        return Ok(response);
    }
    if content_type_is(response.headers(), "text/event-stream") {
        let (head, body) = response.into_parts();
        return Ok(Response::from_parts(head, sse::watch(body, calls)));
    }
    if content_type_is(response.headers(), "application/json") {
        let (head, body) = response.into_parts();
        let bytes = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                calls.end_all(&OwnedOutcome::HttpStatus(http::StatusCode::BAD_GATEWAY));
                return Err(e);
            }
        };
        let mut calls = calls;
        for (id, answer) in sse::answers(&bytes) {
            calls.answered(&id, answer);
        }
        return Ok(Response::from_parts(head, Body::from(bytes)));
    }
    // Any other body holds no answer the layer can read: `calls` is dropped
    // and its calls end neutral.
    Ok(response)
}

/// A GET: the session's event stream. With a breaker, the answers pmcp
/// sends on it (after answering POSTs with 202) end their calls.
async fn stream<S>(
    settings: &Settings,
    mut inner: S,
    request: Request<Body>,
) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    let watch = match (&settings.pending, keys::session_header(request.headers())) {
        (Some(pending), Some(session)) => Some(pending.watch_stream(session)),
        _ => None,
    };
    let response = inner.call(request).await?;
    match watch {
        Some(watch)
            if response.status().is_success()
                && content_type_is(response.headers(), "text/event-stream") =>
        {
            let (head, body) = response.into_parts();
            Ok(Response::from_parts(head, sse::watch(body, watch)))
        }
        // Not a stream after all: `watch` is dropped unused.
        _ => Ok(response),
    }
}
