//! The HTTP endpoint: the text format and the JSON snapshot.

use std::net::SocketAddr;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::oneshot;

use crate::observe::MetricsError;
use crate::observe::middleware::{ExportTask, MetricsMiddleware};

/// Content type of the JSON snapshot.
const JSON_CONTENT_TYPE: &str = "application/json";

impl MetricsMiddleware {
    /// An axum router serving the text format at the configured endpoint and
    /// the JSON snapshot at `<endpoint>.json`, to merge into your own app.
    pub fn router(&self) -> Router {
        let text = self.clone();
        let json = self.clone();
        Router::new()
            .route(
                self.endpoint(),
                get(move || async move {
                    (
                        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
                        text.render(),
                    )
                }),
            )
            .route(
                &format!("{}.json", self.endpoint()),
                get(move || async move {
                    match serde_json::to_string(&json.snapshot_json()) {
                        Ok(body) => {
                            ([(header::CONTENT_TYPE, JSON_CONTENT_TYPE)], body).into_response()
                        }
                        Err(e) => {
                            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
                        }
                    }
                }),
            )
    }

    /// Starts an HTTP server on `addr` serving [`router`](Self::router), and
    /// the export task. `127.0.0.1:0` picks a free port: see
    /// [`MetricsServer::local_addr`]. Needs a Tokio runtime.
    pub async fn serve(&self, addr: SocketAddr) -> Result<MetricsServer, MetricsError> {
        let export = self.start_export()?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })?;
        let local_addr = listener.local_addr().map_err(MetricsError::Io)?;
        let (shutdown, stopped) = oneshot::channel::<()>();
        let router = self.router();
        let task = tokio::spawn(async move {
            let result = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    // A dropped sender stops the server too.
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = &result {
                tracing::warn!(error = %e, "metrics server stopped");
            }
            result
        });
        Ok(MetricsServer {
            local_addr,
            endpoint: self.endpoint().to_owned(),
            shutdown: Some(shutdown),
            task,
            _export: export,
        })
    }
}

/// A running metrics server; dropping it stops the server.
///
/// ```
/// use pmcp_resilience::observe::MetricsMiddleware;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let metrics = MetricsMiddleware::builder().build()?;
/// // Port 0 picks a free port; the handle says which.
/// let server = metrics.serve("127.0.0.1:0".parse()?).await?;
/// assert_ne!(server.local_addr().port(), 0);
/// assert_eq!(server.metrics_url(), format!("http://{}/metrics", server.local_addr()));
/// server.shutdown().await?;
/// # Ok(())
/// # }
/// ```
#[must_use = "the metrics server stops when this handle is dropped"]
#[derive(Debug)]
pub struct MetricsServer {
    local_addr: SocketAddr,
    endpoint: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    _export: ExportTask,
}

impl MetricsServer {
    /// The address the server listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The URL of the text format, such as `http://127.0.0.1:9464/metrics`.
    pub fn metrics_url(&self) -> String {
        format!("http://{}{}", self.local_addr, self.endpoint)
    }

    /// Stops accepting connections, lets open ones finish, and waits.
    pub async fn shutdown(mut self) -> Result<(), MetricsError> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        match (&mut self.task).await {
            Ok(result) => result.map_err(MetricsError::Io),
            Err(e) => Err(MetricsError::Io(std::io::Error::other(e))),
        }
    }
}
