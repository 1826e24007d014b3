//! A transport wrapper that shows the breaker what no pmcp hook shows:
//! HTTP error statuses, refused connections and other transport failures.
//!
//! pmcp's client reports these to the caller only, as
//! `Error::Transport(TransportError::Request("Request failed with status: 503 ..."))`;
//! no middleware hook runs. [`ObservedTransport`] forwards every call to the
//! wrapped transport and, when sending a request fails, tells the breaker,
//! which classifies the error with its `ErrorMatcher` (so
//! `ErrorMatcher::StatusCodes` works) and records it against the request's
//! key. pmcp's streamable HTTP transport sends through a
//! [`SharedSender`]; that handle is wrapped the same way.
//!
//! ```
//! # async fn demo() -> pmcp::Result<()> {
//! use pmcp_resilience::circuit_breaker::CircuitBreakerMiddleware;
//! use pmcp::shared::StdioTransport;
//! use std::sync::Arc;
//!
//! let cb = CircuitBreakerMiddleware::builder().build().expect("valid settings");
//! let transport = cb.wrap_transport(StdioTransport::new());
//! let client = pmcp::ClientBuilder::new(transport)
//!     .with_middleware(Arc::new(cb.clone()))
//!     .build();
//! # let _ = client;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use pmcp::shared::{SharedSender, Transport, TransportMessage};

use super::middleware::CircuitBreakerMiddleware;

/// A transport whose send failures reach a circuit breaker.
///
/// ```
/// use pmcp_resilience::CircuitBreakerMiddleware;
/// use pmcp::shared::{StdioTransport, Transport};
///
/// let cb = CircuitBreakerMiddleware::builder().build().expect("valid settings");
/// // Send failures of this transport (HTTP 5xx, refused connections) reach `cb`;
/// // everything else is the wrapped transport's.
/// let transport = cb.wrap_transport(StdioTransport::new());
/// assert_eq!(transport.transport_type(), transport.get_ref().transport_type());
/// let _unwrapped: StdioTransport = transport.into_inner();
/// ```
pub struct ObservedTransport<T> {
    inner: T,
    breaker: CircuitBreakerMiddleware,
}

impl<T: fmt::Debug> fmt::Debug for ObservedTransport<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObservedTransport")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<T> ObservedTransport<T> {
    pub(crate) fn new(inner: T, breaker: CircuitBreakerMiddleware) -> Self {
        ObservedTransport { inner, breaker }
    }

    /// The wrapped transport.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The wrapped transport, unwrapped.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

/// The request id of a typed message, if it is a request.
fn typed_request_id(message: &TransportMessage) -> Option<String> {
    match message {
        TransportMessage::Request { id, .. } => Some(id.to_string()),
        _ => None,
    }
}

/// The request id of an encoded frame, if it is a request.
fn raw_request_id(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Frame {
        method: Option<serde::de::IgnoredAny>,
        id: Option<pmcp::types::RequestId>,
    }
    let frame: Frame = serde_json::from_slice(body).ok()?;
    frame.method?;
    frame.id.map(|id| id.to_string())
}

fn report(breaker: &CircuitBreakerMiddleware, id: Option<String>, error: &pmcp::Error) {
    if let Some(id) = id {
        breaker.report_send_error(&id, error);
    }
}

#[async_trait]
impl<T: Transport> Transport for ObservedTransport<T> {
    async fn send(&mut self, message: TransportMessage) -> pmcp::Result<()> {
        // The id is read only on failure, but the message is moved into the
        // send: keep what is needed to find it (cheap for requests only).
        let id = typed_request_id(&message);
        let result = self.inner.send(message).await;
        if let Err(e) = &result {
            report(&self.breaker, id, e);
        }
        result
    }

    async fn receive(&mut self) -> pmcp::Result<TransportMessage> {
        self.inner.receive().await
    }

    async fn close(&mut self) -> pmcp::Result<()> {
        self.inner.close().await
    }

    fn is_connected(&self) -> bool {
        self.inner.is_connected()
    }

    fn transport_type(&self) -> &'static str {
        self.inner.transport_type()
    }

    fn set_negotiated_protocol_version(&mut self, version: Option<String>) {
        self.inner.set_negotiated_protocol_version(version);
    }

    fn supports_negotiated_protocol_version(&self) -> bool {
        self.inner.supports_negotiated_protocol_version()
    }

    async fn send_raw(&mut self, body: Vec<u8>) -> pmcp::Result<()> {
        let id = raw_request_id(&body);
        let result = self.inner.send_raw(body).await;
        if let Err(e) = &result {
            report(&self.breaker, id, e);
        }
        result
    }

    fn shared_sender(&self) -> Option<Arc<dyn SharedSender>> {
        let inner = self.inner.shared_sender()?;
        Some(Arc::new(ObservedSender {
            inner,
            breaker: self.breaker.clone(),
        }))
    }
}

/// A [`SharedSender`] whose failures reach a circuit breaker.
struct ObservedSender {
    inner: Arc<dyn SharedSender>,
    breaker: CircuitBreakerMiddleware,
}

impl fmt::Debug for ObservedSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObservedSender")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl SharedSender for ObservedSender {
    async fn send_shared(&self, message: TransportMessage) -> pmcp::Result<()> {
        let id = typed_request_id(&message);
        let result = self.inner.send_shared(message).await;
        if let Err(e) = &result {
            report(&self.breaker, id, e);
        }
        result
    }

    async fn send_raw_shared(&self, body: Vec<u8>) -> pmcp::Result<()> {
        let id = raw_request_id(&body);
        let result = self.inner.send_raw_shared(body).await;
        if let Err(e) = &result {
            report(&self.breaker, id, e);
        }
        result
    }
}
