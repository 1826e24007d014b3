//! Which outcomes count as the server's failures.
//!
//! An [`Outcome`] is what happened to one call: a result (perhaps a tool
//! result with `isError: true`), a JSON-RPC error answer, an HTTP status, a
//! transport failure or a timeout. An [`ErrorMatcher`] says which of them
//! count against the breaker.
//!
//! ```
//! use pmcp_resilience::circuit_breaker::{ErrorMatcher, Outcome};
//! use http::StatusCode;
//!
//! let default = ErrorMatcher::default();
//! // The server's own failure counts...
//! assert!(default.matches(&Outcome::JsonRpcError { code: -32603, message: "boom" }));
//! // ...the caller's mistakes do not.
//! assert!(!default.matches(&Outcome::JsonRpcError { code: -32602, message: "bad params" }));
//!
//! let gateway = ErrorMatcher::StatusCodes(vec![StatusCode::BAD_GATEWAY]);
//! assert!(gateway.matches(&Outcome::HttpStatus(StatusCode::BAD_GATEWAY)));
//! assert!(!gateway.matches(&Outcome::HttpStatus(StatusCode::NOT_FOUND)));
//! ```

use std::fmt;
use std::sync::Arc;

use http::StatusCode;

use super::state::Verdict;

/// What happened to one call, as the breaker classifies it.
///
/// ```
/// use pmcp_resilience::circuit_breaker::{CircuitState, Outcome};
/// use pmcp_resilience::CircuitBreakerMiddleware;
/// use http::StatusCode;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let cb = CircuitBreakerMiddleware::builder().failure_threshold(1).build().expect("valid");
/// // The caller's mistake says nothing about the server: the breaker stays closed.
/// let bad_params = Outcome::JsonRpcError { code: -32602, message: "bad params" };
/// cb.acquire("global").await.expect("closed").record_outcome(&bad_params).await;
/// assert_eq!(cb.state_of("global"), Some(CircuitState::Closed));
/// // A 503 from the server is its failure: the breaker opens.
/// let unavailable = Outcome::HttpStatus(StatusCode::SERVICE_UNAVAILABLE);
/// cb.acquire("global").await.expect("closed").record_outcome(&unavailable).await;
/// assert_eq!(cb.state_of("global"), Some(CircuitState::Open));
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome<'a> {
    /// A result. `tool_error` is `true` for a tool result with `isError: true`.
    Result {
        /// The result is a tool result with `isError: true`.
        tool_error: bool,
    },
    /// A JSON-RPC error answer.
    JsonRpcError {
        /// The JSON-RPC error code.
        code: i32,
        /// The error message.
        message: &'a str,
    },
    /// The HTTP transport answered with this status instead of a JSON-RPC answer.
    HttpStatus(StatusCode),
    /// The transport failed (connection refused, reset, closed, ...).
    Transport {
        /// The transport's description of the failure.
        message: &'a str,
    },
    /// The call timed out.
    Timeout,
}

/// A predicate over outcomes.
///
/// ```
/// use pmcp_resilience::circuit_breaker::{ErrorMatcher, Outcome, OutcomePredicate};
/// use std::sync::Arc;
///
/// // Only internal errors that mention the database count.
/// let database_down: OutcomePredicate = Arc::new(|outcome: &Outcome<'_>| {
///     matches!(outcome, Outcome::JsonRpcError { code: -32603, message } if message.contains("database"))
/// });
/// let matcher = ErrorMatcher::Predicate(database_down);
/// assert!(matcher.matches(&Outcome::JsonRpcError { code: -32603, message: "database down" }));
/// assert!(!matcher.matches(&Outcome::JsonRpcError { code: -32603, message: "out of memory" }));
/// assert!(!matcher.matches(&Outcome::Timeout));
/// ```
pub type OutcomePredicate = Arc<dyn Fn(&Outcome<'_>) -> bool + Send + Sync>;

/// Which outcomes count as failures of the server.
///
/// The default, [`ErrorMatcher::ServerErrors`], counts what the server did
/// wrong and leaves out what the caller did wrong (see its docs).
///
/// ```
/// use pmcp_resilience::circuit_breaker::{CircuitState, ErrorMatcher, Outcome};
/// use pmcp_resilience::CircuitBreakerMiddleware;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// // The server's failures, and tool results with `isError: true` as well.
/// let failures = ErrorMatcher::Any(vec![ErrorMatcher::ServerErrors, ErrorMatcher::ToolErrors]);
/// assert!(failures.matches(&Outcome::Result { tool_error: true }));
/// assert!(!failures.matches(&Outcome::Result { tool_error: false }));
///
/// let cb = CircuitBreakerMiddleware::builder()
///     .failure_threshold(1)
///     .trigger_errors(failures)
///     .build()
///     .expect("valid settings");
/// let permit = cb.acquire("global").await.expect("closed");
/// permit.record_outcome(&Outcome::Result { tool_error: true }).await;
/// assert_eq!(cb.state_of("global"), Some(CircuitState::Open));
/// # }
/// ```
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum ErrorMatcher {
    /// JSON-RPC error answers with one of these codes.
    JsonRpcCodes(Vec<i32>),
    /// The server's failures (the default):
    ///
    /// - JSON-RPC `-32603` (internal error) and the server-error range
    ///   `-32000..=-32099`, except pmcp's `-32005` (rate limited) and `-32006`
    ///   (circuit breaker open): a server that asks to slow down is healthy;
    /// - HTTP 5xx statuses (HTTP 4xx, 429 included, are the caller's business:
    ///   a rate limit is handled by slowing down, not by opening a breaker);
    /// - transport failures and timeouts.
    ///
    /// Not counted: `-32700` parse error, `-32600` invalid request, `-32601`
    /// method not found, `-32602` invalid params, and tool results with
    /// `isError: true` (add [`ErrorMatcher::ToolErrors`] for those).
    #[default]
    ServerErrors,
    /// HTTP statuses in this list (seen by the transport wrapper).
    StatusCodes(Vec<StatusCode>),
    /// Transport failures.
    TransportErrors,
    /// Timeouts.
    Timeouts,
    /// Tool results with `isError: true`.
    ToolErrors,
    /// Outcomes for which the function returns `true`.
    Predicate(OutcomePredicate),
    /// Outcomes matched by any of these.
    Any(Vec<ErrorMatcher>),
    /// Outcomes matched by all of these.
    All(Vec<ErrorMatcher>),
    /// The caller's own mistakes, which say nothing about the server (the
    /// default of what is *neutral*): JSON-RPC `-32700` parse error,
    /// `-32600` invalid request, `-32601` method not found, `-32602` invalid
    /// params, and HTTP 4xx statuses other than 408 (timeout) and 429 (rate
    /// limited).
    CallerMistakes,
    /// No outcome (for example `neutral_errors(ErrorMatcher::Nothing)` to
    /// judge every outcome as a success or a failure).
    Nothing,
}

impl fmt::Debug for ErrorMatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorMatcher::JsonRpcCodes(c) => f.debug_tuple("JsonRpcCodes").field(c).finish(),
            ErrorMatcher::ServerErrors => f.write_str("ServerErrors"),
            ErrorMatcher::StatusCodes(c) => f.debug_tuple("StatusCodes").field(c).finish(),
            ErrorMatcher::TransportErrors => f.write_str("TransportErrors"),
            ErrorMatcher::Timeouts => f.write_str("Timeouts"),
            ErrorMatcher::ToolErrors => f.write_str("ToolErrors"),
            ErrorMatcher::Predicate(_) => f.write_str("Predicate(..)"),
            ErrorMatcher::Any(m) => f.debug_tuple("Any").field(m).finish(),
            ErrorMatcher::All(m) => f.debug_tuple("All").field(m).finish(),
            ErrorMatcher::CallerMistakes => f.write_str("CallerMistakes"),
            ErrorMatcher::Nothing => f.write_str("Nothing"),
        }
    }
}

/// JSON-RPC codes of requests the caller got wrong.
const CALLER_MISTAKES: [i32; 4] = [-32700, -32600, -32601, -32602];

/// The breaker's verdict on `outcome`: neutral when `neutral` matches it (a
/// neutral match wins, as resilience4j's ignored exceptions do), a failure
/// when `failures` matches it (a timeout as [`Verdict::TimedOut`]), and a
/// success otherwise.
pub(crate) fn verdict(
    failures: &ErrorMatcher,
    neutral: &ErrorMatcher,
    outcome: &Outcome<'_>,
) -> Verdict {
    if neutral.matches(outcome) {
        Verdict::Neutral
    } else if failures.matches(outcome) {
        if *outcome == Outcome::Timeout {
            Verdict::TimedOut
        } else {
            Verdict::Failure
        }
    } else {
        Verdict::Success
    }
}

/// pmcp's own "rate limited" code.
const RATE_LIMITED: i32 = -32005;
/// pmcp's own "circuit breaker open" code.
const CIRCUIT_BREAKER_OPEN: i32 = -32006;

impl ErrorMatcher {
    /// Whether `outcome` counts as a failure of the server.
    pub fn matches(&self, outcome: &Outcome<'_>) -> bool {
        match self {
            ErrorMatcher::JsonRpcCodes(codes) => {
                matches!(outcome, Outcome::JsonRpcError { code, .. } if codes.contains(code))
            }
            ErrorMatcher::ServerErrors => match *outcome {
                Outcome::JsonRpcError { code, .. } => {
                    code == -32603
                        || ((-32099..=-32000).contains(&code)
                            && code != RATE_LIMITED
                            && code != CIRCUIT_BREAKER_OPEN)
                }
                Outcome::HttpStatus(status) => status.is_server_error(),
                Outcome::Transport { .. } | Outcome::Timeout => true,
                Outcome::Result { .. } => false,
            },
            ErrorMatcher::StatusCodes(codes) => {
                matches!(outcome, Outcome::HttpStatus(s) if codes.contains(s))
            }
            ErrorMatcher::TransportErrors => matches!(outcome, Outcome::Transport { .. }),
            ErrorMatcher::Timeouts => matches!(outcome, Outcome::Timeout),
            ErrorMatcher::ToolErrors => matches!(outcome, Outcome::Result { tool_error: true }),
            ErrorMatcher::Predicate(f) => f(outcome),
            ErrorMatcher::Any(all) => all.iter().any(|m| m.matches(outcome)),
            ErrorMatcher::All(all) => !all.is_empty() && all.iter().all(|m| m.matches(outcome)),
            ErrorMatcher::CallerMistakes => match *outcome {
                Outcome::JsonRpcError { code, .. } => CALLER_MISTAKES.contains(&code),
                Outcome::HttpStatus(status) => {
                    status.is_client_error()
                        && status != StatusCode::REQUEST_TIMEOUT
                        && status != StatusCode::TOO_MANY_REQUESTS
                }
                _ => false,
            },
            ErrorMatcher::Nothing => false,
        }
    }

    /// Whether any result could match (so the response body must be inspected
    /// for `isError`).
    pub(crate) fn looks_at_tool_errors(&self) -> bool {
        match self {
            ErrorMatcher::ToolErrors | ErrorMatcher::Predicate(_) => true,
            ErrorMatcher::Any(m) | ErrorMatcher::All(m) => {
                m.iter().any(ErrorMatcher::looks_at_tool_errors)
            }
            _ => false,
        }
    }
}

/// The prefix of pmcp's HTTP error message.
const STATUS_PREFIX: &str = "Request failed with status: ";

/// The outcome of a call that failed with `error` (for the transport wrapper).
pub(crate) fn outcome_of_error(error: &pmcp::Error) -> Outcome<'_> {
    use pmcp::error::TransportError;
    match error {
        pmcp::Error::Transport(TransportError::Request(message)) => match parse_status(message) {
            Some(status) => Outcome::HttpStatus(status),
            None => Outcome::Transport { message },
        },
        pmcp::Error::Transport(_) => Outcome::Transport { message: "" },
        pmcp::Error::Timeout(_) => Outcome::Timeout,
        pmcp::Error::Protocol { code, message, .. } => Outcome::JsonRpcError {
            code: code.as_i32(),
            message,
        },
        _ => Outcome::Transport { message: "" },
    }
}

/// Reads the status out of pmcp's `"Request failed with status: 503 Service Unavailable"`.
pub(crate) fn parse_status(message: &str) -> Option<StatusCode> {
    let rest = message.get(message.find(STATUS_PREFIX)? + STATUS_PREFIX.len()..)?;
    let digits = rest.get(..3)?;
    StatusCode::from_bytes(digits.as_bytes()).ok()
}

/// The outcome of a JSON-RPC response.
pub(crate) fn outcome_of_response(
    response: &pmcp::types::JSONRPCResponse,
    inspect_results: bool,
) -> Outcome<'_> {
    match &response.payload {
        pmcp::types::jsonrpc::ResponsePayload::Error(e) => Outcome::JsonRpcError {
            code: e.code,
            message: &e.message,
        },
        pmcp::types::jsonrpc::ResponsePayload::Result(value) => Outcome::Result {
            tool_error: inspect_results
                && value
                    .get("isError")
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(false),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_neutral_match_wins_and_a_timeout_is_its_own_verdict() {
        let (failures, neutral) = (ErrorMatcher::ServerErrors, ErrorMatcher::CallerMistakes);
        let judge = |o: Outcome<'_>| verdict(&failures, &neutral, &o);
        let internal = Outcome::JsonRpcError {
            code: -32603,
            message: "boom",
        };
        assert_eq!(judge(internal), Verdict::Failure);
        let bad_params = Outcome::JsonRpcError {
            code: -32602,
            message: "bad",
        };
        assert_eq!(judge(bad_params), Verdict::Neutral);
        assert_eq!(judge(Outcome::Timeout), Verdict::TimedOut);
        assert_eq!(
            judge(Outcome::Result { tool_error: false }),
            Verdict::Success
        );
    }

    fn rpc(code: i32) -> Outcome<'static> {
        Outcome::JsonRpcError { code, message: "" }
    }

    #[test]
    fn default_counts_server_errors_not_caller_mistakes() {
        let m = ErrorMatcher::default();
        assert!(m.matches(&rpc(-32603)));
        assert!(m.matches(&rpc(-32000)));
        assert!(m.matches(&rpc(-32099)));
        for code in [-32700, -32600, -32601, -32602, -32005, -32006] {
            assert!(!m.matches(&rpc(code)), "{code} must not count");
        }
        assert!(m.matches(&Outcome::HttpStatus(StatusCode::SERVICE_UNAVAILABLE)));
        assert!(!m.matches(&Outcome::HttpStatus(StatusCode::TOO_MANY_REQUESTS)));
        assert!(!m.matches(&Outcome::HttpStatus(StatusCode::NOT_FOUND)));
        assert!(m.matches(&Outcome::Transport { message: "refused" }));
        assert!(m.matches(&Outcome::Timeout));
        assert!(!m.matches(&Outcome::Result { tool_error: true }));
        assert!(!m.matches(&Outcome::Result { tool_error: false }));
    }

    #[test]
    fn combinations_and_predicates() {
        let m = ErrorMatcher::Any(vec![
            ErrorMatcher::ToolErrors,
            ErrorMatcher::JsonRpcCodes(vec![-32602]),
        ]);
        assert!(m.matches(&Outcome::Result { tool_error: true }));
        assert!(m.matches(&rpc(-32602)));
        assert!(!m.matches(&rpc(-32603)));
        assert!(m.looks_at_tool_errors());
        let all = ErrorMatcher::All(vec![
            ErrorMatcher::ServerErrors,
            ErrorMatcher::Predicate(Arc::new(
                |o| matches!(o, Outcome::JsonRpcError { message, .. } if message.contains("db")),
            )),
        ]);
        assert!(all.matches(&Outcome::JsonRpcError {
            code: -32603,
            message: "db down"
        }));
        assert!(!all.matches(&rpc(-32603)));
        assert!(!ErrorMatcher::All(vec![]).matches(&rpc(-32603)));
    }

    #[test]
    fn http_status_is_parsed_from_pmcp_transport_errors() {
        use pmcp::error::TransportError;
        let e = pmcp::Error::Transport(TransportError::Request(
            "Request failed with status: 503 Service Unavailable".into(),
        ));
        assert_eq!(
            outcome_of_error(&e),
            Outcome::HttpStatus(StatusCode::SERVICE_UNAVAILABLE)
        );
        let refused = pmcp::Error::Transport(TransportError::Request("connection refused".into()));
        assert!(matches!(
            outcome_of_error(&refused),
            Outcome::Transport { .. }
        ));
        assert_eq!(parse_status("Request failed with status: 4"), None);
        assert_eq!(outcome_of_error(&pmcp::Error::Timeout(5)), Outcome::Timeout);
    }
}
