//! The request's method as the middlewares of this crate pass it along in
//! pmcp's `MiddlewareContext`.

use pmcp::shared::MiddlewareContext;

/// Context metadata key holding the JSON-RPC method of the request.
///
/// `MetricsMiddleware` (feature `prometheus`) sets it in `on_request`; a
/// middleware that runs earlier and rejects a request (a breaker or limiter
/// of this crate) sets it too, so that the rejection is counted under the
/// right method instead of `unknown`.
pub const METHOD_METADATA_KEY: &str = "pmcp_resilience.method";

/// Records `method` as the request's method in `context`, for a middleware
/// that rejects a request before `MetricsMiddleware` sees it.
pub(crate) fn mark_method(context: &MiddlewareContext, method: &str) {
    context.set_metadata(METHOD_METADATA_KEY.into(), method.to_owned());
}
