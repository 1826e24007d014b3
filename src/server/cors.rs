//! The CORS and caching headers of the layer's own answers, matching those
//! pmcp's router puts on its answers, so that a browser client reads a
//! refusal (and its retry hint) as it reads any other answer.

use http::header::{
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, CACHE_CONTROL, ORIGIN, VARY,
};
use http::{HeaderMap, HeaderValue};

use super::signals::HeaderNames;

/// The browser origins allowed to read the layer's answers: set it as you
/// set pmcp's `RouterConfig::allowed_origins`.
///
/// ```
/// use axum::body::Body;
/// use http::Request;
/// use pmcp_resilience::rate_limit::{RateLimitMiddleware, RateLimitStrategy};
/// use pmcp_resilience::server::{CorsOrigins, ResilienceLayer};
/// use std::sync::Arc;
/// use std::time::Duration;
/// use tower::ServiceExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let once = RateLimitStrategy::FixedWindow { max_requests: 1, window: Duration::from_secs(60) };
/// let layer = ResilienceLayer::builder()
///     .rate_limit(RateLimitMiddleware::builder().strategy(once).build()?)
///     .cors_origins(CorsOrigins::List(vec!["https://app.example.com".into()]))
///     .build()?;
/// let server = pmcp::Server::builder().name("demo").version("1.0.0").build()?;
/// let app = pmcp::axum::concurrent_router(Arc::new(server)).layer(layer);
/// let ping = || {
///     Request::post("/")
///         .header("content-type", "application/json")
///         .header("accept", "application/json, text/event-stream")
///         .header("origin", "https://app.example.com")
///         .body(Body::from(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#))
/// };
/// app.clone().oneshot(ping()?).await?;
/// // The layer's own refusal is readable by the page, retry hint included.
/// let refused = app.oneshot(ping()?).await?;
/// assert_eq!(refused.headers()["access-control-allow-origin"], "https://app.example.com");
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum CorsOrigins {
    /// Pages served from `localhost`, `127.0.0.1` or `[::1]`, any port
    /// (pmcp's router default).
    #[default]
    Localhost,
    /// These origins (`https://app.example.com`), or any origin on one of
    /// their host names.
    List(Vec<String>),
    /// Every origin (`*`), as pmcp's `AllowedOrigins::any()`.
    Any,
}

/// The host name of an origin (`http://host:port` -> `host`).
fn host(origin: &str) -> Option<&str> {
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    Some(match authority.rfind(']') {
        Some(end) => &authority[..=end],
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    })
}

impl CorsOrigins {
    fn allows(&self, origin: &str) -> bool {
        match self {
            CorsOrigins::Any => true,
            CorsOrigins::Localhost => {
                matches!(host(origin), Some("localhost" | "127.0.0.1" | "[::1]"))
            }
            CorsOrigins::List(list) => {
                list.iter().any(|o| o == origin)
                    || host(origin).is_some_and(|h| list.iter().any(|o| host(o) == Some(h)))
            }
        }
    }

    /// Adds to `out` (the layer's answer to a request with headers
    /// `request`) the CORS fields, exposing the layer's own headers too, and
    /// `Cache-Control: no-store`.
    pub(crate) fn write(&self, request: &HeaderMap, names: &HeaderNames, out: &mut HeaderMap) {
        out.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if *self != CorsOrigins::Any {
            out.append(VARY, HeaderValue::from_static("origin"));
        }
        let Some(origin) = request.get(ORIGIN) else {
            return;
        };
        let allowed = match self {
            CorsOrigins::Any => HeaderValue::from_static("*"),
            _ if origin.to_str().is_ok_and(|o| self.allows(o)) => origin.clone(),
            _ => return,
        };
        out.insert(ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
        out.insert(ACCESS_CONTROL_EXPOSE_HEADERS, expose(names, None));
    }

    /// Widens the exposed headers of an answer pmcp made (which exposes
    /// only its own) by the usage headers the layer added to it.
    pub(crate) fn expose_usage(names: &HeaderNames, out: &mut HeaderMap) {
        if let Some(theirs) = out.get(ACCESS_CONTROL_EXPOSE_HEADERS).cloned() {
            out.insert(ACCESS_CONTROL_EXPOSE_HEADERS, expose(names, Some(&theirs)));
        }
    }
}

/// The exposed header list: pmcp's own, then the layer's.
fn expose(names: &HeaderNames, theirs: Option<&HeaderValue>) -> HeaderValue {
    let mut list: Vec<String> = match theirs.and_then(|v| v.to_str().ok()) {
        Some(v) => v.split(',').map(|s| s.trim().to_owned()).collect(),
        None => vec!["mcp-session-id".into(), "mcp-protocol-version".into()],
    };
    for ours in [
        "retry-after",
        "ratelimit",
        "ratelimit-policy",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        names.reset.as_str(),
    ] {
        if !list.iter().any(|h| h.eq_ignore_ascii_case(ours)) {
            list.push(ours.to_owned());
        }
    }
    HeaderValue::from_str(&list.join(",")).unwrap_or(HeaderValue::from_static("retry-after"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_matched_as_pmcp_matches_them() {
        let local = CorsOrigins::Localhost;
        assert!(local.allows("http://localhost:5173"));
        assert!(local.allows("http://[::1]:80"));
        assert!(!local.allows("https://evil.example"));
        let list = CorsOrigins::List(vec!["https://app.example.com".into()]);
        assert!(list.allows("https://app.example.com"));
        assert!(list.allows("https://app.example.com:8443"));
        assert!(!list.allows("https://example.com"));
    }
}
