//! The service the layer puts in front of pmcp's router: one request's
//! path through the limiter, the breaker and the answer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use http::request::Parts;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use pmcp::ErrorCode;
use pmcp::shared::MiddlewareContext;
use tower::Service;

use super::calls::{Admitted, CallSet, OwnedOutcome};
use super::cors::CorsOrigins;
use super::keys::{self, BodyError, Message};
use super::layer::Settings;
use super::signals::{self, Usage};
use super::sse::{self, AnswerSink};
use super::tools::{self, ToolCall};
use super::trust::Caller;

/// The service made by [`ResilienceLayer`](super::ResilienceLayer).
///
/// ```
/// use axum::body::Body;
/// use http::{Request, Response, StatusCode};
/// use pmcp_resilience::rate_limit::RateLimitMiddleware;
/// use pmcp_resilience::server::{ResilienceLayer, ResilienceService};
/// use std::convert::Infallible;
/// use tower::{Layer, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let layer = ResilienceLayer::builder().rate_limit(RateLimitMiddleware::builder().build()?).build()?;
/// // Any HTTP service can be wrapped; here a stand-in for pmcp's router.
/// let inner = tower::service_fn(|_: Request<Body>| async {
///     Ok::<_, Infallible>(Response::new(Body::from(r#"{"jsonrpc":"2.0","id":1,"result":{}}"#)))
/// });
/// let service: ResilienceService<_> = layer.layer(inner);
/// let ping = Request::post("/")
///     .header("content-type", "application/json")
///     .body(Body::from(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#))?;
/// assert_eq!(service.oneshot(ping).await?.status(), StatusCode::OK);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct ResilienceService<S> {
    inner: S,
    settings: Arc<Settings>,
}

impl<S> ResilienceService<S> {
    pub(crate) fn new(inner: S, settings: Arc<Settings>) -> Self {
        ResilienceService { inner, settings }
    }
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
        let session = keys::session_header(request.headers()).map(str::to_owned);
        let response = inner.call(request).await?;
        if let Some(s) = session
            && response.status().is_success()
        {
            settings.sessions.forget(&s);
        }
        return Ok(response);
    }
    let max = settings.max_body_bytes;
    let (parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Ok(settings.own(signals::too_large(max), &parts.headers));
    }
    let bytes: Bytes = match Limited::new(body, max).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Ok(settings.own(signals::too_large(max), &parts.headers));
        }
        Err(e) => {
            let answer = signals::bad_request(
                ErrorCode::PARSE_ERROR.as_i32(),
                &format!("could not read the request body: {e}"),
            );
            return Ok(settings.own(answer, &parts.headers));
        }
    };
    let message = match keys::parse_message(&bytes) {
        Ok(m) => m,
        Err(BodyError::Parse(e)) => {
            let answer = signals::bad_request(
                ErrorCode::PARSE_ERROR.as_i32(),
                &format!("parse error: {e}"),
            );
            return Ok(settings.own(answer, &parts.headers));
        }
        Err(BodyError::Invalid(why)) => {
            let answer = signals::bad_request(ErrorCode::INVALID_REQUEST.as_i32(), why);
            return Ok(settings.own(answer, &parts.headers));
        }
    };
    let caller = settings.caller(&parts);
    let opens_session = message.calls.iter().any(|c| c.method == "initialize");

    let tightest = match limit(&settings, &caller, &parts, &message).await {
        Ok(usage) => usage,
        Err(refusal) => return Ok(refusal),
    };
    let calls = match admit(&settings, &caller, &parts, &message).await {
        Ok(calls) => calls,
        Err(refusal) => return Ok(refusal),
    };

    // Kept for an answer of the layer's own after the request has gone on.
    let mut origin = http::HeaderMap::new();
    if let Some(o) = parts.headers.get(http::header::ORIGIN) {
        origin.insert(http::header::ORIGIN, o.clone());
    }
    let mut response = inner
        .call(Request::from_parts(parts, Body::from(bytes)))
        .await?;
    settings.learn(&caller, opens_session, &response);
    if let Some(calls) = calls {
        response = match settle(calls, response).await {
            Ok(r) => r,
            Err(e) => {
                let answer = signals::upstream_failed(&e.to_string());
                return Ok(settings.own(answer, &origin));
            }
        };
    }
    if settings.usage_headers
        && let Some(usage) = tightest
    {
        usage.write(&settings.names, response.headers_mut());
        CorsOrigins::expose_usage(&settings.names, response.headers_mut());
    }
    Ok(response)
}

/// Asks the limiter about every call of the request: the usage that left
/// the fewest units, or the refusal to answer with.
async fn limit(
    settings: &Settings,
    caller: &Caller,
    parts: &Parts,
    message: &Message,
) -> Result<Option<Usage>, Response<Body>> {
    let Some(limiter) = &settings.limiter else {
        return Ok(None);
    };
    let mut tightest: Option<Usage> = None;
    let http_key = keys::http_key(&settings.key, parts, settings.proxy.as_ref());
    let window = limiter.window();
    // The limiter's hooks note metrics in a pmcp context that nothing
    // reads here: one per HTTP request, not one per call of a batch.
    let context = MiddlewareContext::default();
    for call in &message.calls {
        let key = match &http_key {
            Some(k) => k.clone(),
            None => {
                let (keyed, _) = tools::classify(call, settings.tools.as_ref());
                caller.key(limiter.scope(), &keyed)
            }
        };
        if key.as_str() == keys::UNKNOWN_CLIENT {
            settings.warn_no_address();
        }
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
                let answer = signals::rate_limited(
                    message.reply_id.clone(),
                    &usage,
                    &settings.names,
                    limiter.scope().label(),
                    &key,
                );
                return Err(settings.refusal(answer, &parts.headers));
            }
            (Err(e), None) => {
                let answer = signals::limiter_failed(message.reply_id.clone(), &e);
                return Err(settings.refusal(answer, &parts.headers));
            }
        }
    }
    Ok(tightest)
}

/// Asks the breaker about every call of the request: the admitted calls,
/// filed to wait for their answers, or the refusal to answer with.
async fn admit(
    settings: &Settings,
    caller: &Caller,
    parts: &Parts,
    message: &Message,
) -> Result<Option<CallSet>, Response<Body>> {
    let (Some(breaker), Some(pending)) = (&settings.breaker, &settings.pending) else {
        return Ok(None);
    };
    if message.calls.is_empty() {
        return Ok(None);
    }
    let mut permits = Vec::with_capacity(message.calls.len());
    for call in &message.calls {
        let (keyed, tool) = tools::classify(call, settings.tools.as_ref());
        let key = caller.key(breaker.key_scope(), &keyed);
        match breaker.acquire(key.as_str()).await {
            // An unknown tool's call is the caller's mistake whatever pmcp
            // answers: the permit is dropped, the call ends neutral.
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
                let answer = signals::circuit_open(
                    message.reply_id.clone(),
                    Some(retry),
                    breaker.key_scope().label(),
                    &refused.key,
                );
                return Err(settings.refusal(answer, &parts.headers));
            }
        }
    }
    Ok(Some(pending.open(caller.session(), permits)))
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
        (Some(pending), Some(session)) if settings.sessions.contains(session) => {
            Some(pending.watch_stream(session))
        }
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
