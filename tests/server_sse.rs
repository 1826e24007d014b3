//! The server layer on pmcp's default configuration, which answers POSTs over
//! SSE: answers in a POST's event stream, and answers on the session's GET
//! stream (after a 202), judge the breaker's calls as JSON answers do.

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use http::{Request, Response};
use http_body_util::BodyExt;
use parking_lot::Mutex;
use pmcp::server::streamable_http_server::StreamableHttpServerConfig;
use pmcp_resilience::server::ResilienceLayer;
use pmcp_resilience::{CircuitBreakerMiddleware, CircuitState, ManualClock, Scope};
use serde_json::json;
use support::raw_http::{open_session, post, tool_call};
use support::{TestServer, call, client, initialize, start_server_configured, transport};
use tower::{Layer, ServiceExt};

const PATIENCE: Duration = Duration::from_secs(60);

fn per_tool_breaker(clock: &ManualClock) -> CircuitBreakerMiddleware {
    CircuitBreakerMiddleware::builder()
        .scope(Scope::PerTool)
        .failure_threshold(2)
        .timeout(Duration::from_secs(30))
        .clock(Arc::new(clock.clone()))
        .build()
        .expect("valid breaker")
}

/// The bytes of every response body pmcp wrote, in the order the responses
/// were made, as they left pmcp (before the layer).
type Tap = Arc<Mutex<Vec<Vec<u8>>>>;

/// A pmcp server with its default (SSE) configuration behind `layer`, with
/// the status of every POST it answered noted in `statuses`.
async fn sse_server_behind(layer: ResilienceLayer, statuses: Arc<Mutex<Vec<u16>>>) -> TestServer {
    sse_server_tapped(layer, statuses, Tap::default()).await
}

/// [`sse_server_behind`], with what pmcp wrote noted in `tap`.
async fn sse_server_tapped(
    layer: ResilienceLayer,
    statuses: Arc<Mutex<Vec<u16>>>,
    tap: Tap,
) -> TestServer {
    let tapping =
        axum::middleware::from_fn(move |req: Request<Body>, next: axum::middleware::Next| {
            let tap = tap.clone();
            async move {
                let response = next.run(req).await;
                let n = {
                    let mut tap = tap.lock();
                    tap.push(Vec::new());
                    tap.len() - 1
                };
                let (head, body) = response.into_parts();
                let body = body.map_frame(move |frame| {
                    if let Some(data) = frame.data_ref() {
                        tap.lock()[n].extend_from_slice(data);
                    }
                    frame
                });
                Response::from_parts(head, Body::new(body))
            }
        });
    let noting =
        axum::middleware::from_fn(move |req: Request<Body>, next: axum::middleware::Next| {
            let statuses = statuses.clone();
            async move {
                let post = req.method() == http::Method::POST;
                let response = next.run(req).await;
                if post {
                    statuses.lock().push(response.status().as_u16());
                }
                response
            }
        });
    start_server_configured(
        "sse",
        StreamableHttpServerConfig::default(),
        |b| b,
        move |router| router.layer(tapping).layer(layer).layer(noting),
    )
    .await
}

#[tokio::test]
async fn raw_http_answers_in_post_event_streams_open_the_per_tool_breaker() {
    let clock = ManualClock::new();
    let breaker = per_tool_breaker(&clock);
    let layer = ResilienceLayer::builder()
        .circuit_breaker(breaker.clone())
        .build()
        .expect("valid layer");
    let tap = Tap::default();
    let server = sse_server_tapped(layer, Arc::default(), tap.clone()).await;
    let session = open_session(server.addr).await;
    let s = [("mcp-session-id", session.as_str())];
    for id in 1..=2 {
        let failed = post(server.addr, &tool_call(id, "fail"), &s).await;
        assert_eq!(failed.status, 200);
        assert_eq!(failed.header("content-type"), Some("text/event-stream"));
        let written = tap.lock().last().cloned().unwrap_or_default();
        assert_eq!(failed.body, written, "the client read what pmcp wrote");
        let events = support::sse::events(&failed.body);
        assert_eq!(
            events.len(),
            1,
            "{:?}",
            String::from_utf8_lossy(&failed.body)
        );
        assert_eq!(events[0]["id"], id);
        assert_eq!(events[0]["error"]["code"], -32603);
    }
    assert_eq!(breaker.state_of("tool:fail"), Some(CircuitState::Open));
    let refused = post(server.addr, &tool_call(3, "fail"), &s).await;
    let answer = support::sse::answer(refused.header("content-type"), &refused.body);
    assert_eq!(answer["error"]["code"], -32006);
    assert!(refused.header("retry-after").is_some());
    assert_eq!(server.behaviour.calls("fail"), 2, "not run while open");

    // The healthy tool beside it keeps answering, over SSE.
    for id in 10..13 {
        let echo = post(server.addr, &tool_call(id, "echo"), &s).await;
        assert_eq!(echo.status, 200);
        let events = support::sse::events(&echo.body);
        assert_eq!(events[0]["result"]["content"][0]["type"], "text");
    }
    assert_eq!(breaker.state_of("tool:echo"), Some(CircuitState::Closed));
    let snapshot = breaker.metrics();
    assert_eq!(snapshot.failed_requests, 2);
    // initialize and the three echoes.
    assert_eq!(snapshot.successful_requests, 4);
}

#[tokio::test]
async fn a_pmcp_client_answered_on_its_get_stream_trips_the_breaker() {
    let clock = ManualClock::new();
    let breaker = per_tool_breaker(&clock);
    let layer = ResilienceLayer::builder()
        .circuit_breaker(breaker.clone())
        .build()
        .expect("valid layer");
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let server = sse_server_behind(layer, statuses.clone()).await;
    let mut pmcp_client = client(transport(&server.url), vec![]);
    tokio::time::timeout(PATIENCE, initialize(&mut pmcp_client))
        .await
        .expect("initialize in time");
    for _ in 0..2 {
        let failed = tokio::time::timeout(PATIENCE, call(&pmcp_client, "fail", json!({})))
            .await
            .expect("an answer in time");
        assert!(failed.is_err(), "the fail tool fails: {failed:?}");
    }
    assert!(
        statuses.lock().iter().filter(|s| **s == 202).count() >= 2,
        "pmcp answered the calls on the GET stream: {:?}",
        statuses.lock()
    );
    assert_eq!(breaker.state_of("tool:fail"), Some(CircuitState::Open));
    let refused = tokio::time::timeout(PATIENCE, call(&pmcp_client, "fail", json!({})))
        .await
        .expect("an answer in time");
    assert!(refused.is_err());
    assert_eq!(server.behaviour.calls("fail"), 2, "not run while open");
    for _ in 0..3 {
        let echo = tokio::time::timeout(
            PATIENCE,
            call(&pmcp_client, "echo", json!({"message": "hi"})),
        )
        .await
        .expect("an answer in time");
        assert!(echo.is_ok(), "the healthy tool answers: {echo:?}");
    }
    let snapshot = breaker.metrics();
    assert_eq!(snapshot.failed_requests, 2);
    assert_eq!(snapshot.in_flight, 0, "every call ended");
}

#[tokio::test]
async fn raw_http_answers_on_the_get_stream_open_the_breaker() {
    let clock = ManualClock::new();
    let breaker = per_tool_breaker(&clock);
    let layer = ResilienceLayer::builder()
        .circuit_breaker(breaker.clone())
        .build()
        .expect("valid layer");
    let tap = Tap::default();
    let server = sse_server_tapped(layer, Arc::default(), tap.clone()).await;
    let session = open_session(server.addr).await;
    let s = [("mcp-session-id", session.as_str())];
    let mut stream = support::stream::EventStream::open(server.addr, &session).await;
    let get = tap.lock().len() - 1;
    for id in 1..=2 {
        let accepted = post(server.addr, &tool_call(id, "fail"), &s).await;
        assert_eq!(accepted.status, 202, "pmcp answers on the GET stream");
        let (event, text) = stream.next_event().await;
        assert_eq!(event["id"], id);
        assert_eq!(event["error"]["code"], -32603);
        assert!(text.contains("event: message\n"), "{text:?}");
    }
    assert_eq!(breaker.state_of("tool:fail"), Some(CircuitState::Open));
    let refused = post(server.addr, &tool_call(3, "fail"), &s).await;
    assert_eq!(refused.json()["error"]["code"], -32006);
    assert_eq!(server.behaviour.calls("fail"), 2, "not run while open");
    let accepted = post(server.addr, &tool_call(4, "echo"), &s).await;
    assert_eq!(accepted.status, 202);
    let (event, _) = stream.next_event().await;
    assert_eq!(event["id"], 4);
    assert!(event["result"].is_object(), "{event}");
    let snapshot = breaker.metrics();
    assert_eq!(snapshot.failed_requests, 2);
    assert_eq!(snapshot.in_flight, 0);
    // What the client read is what pmcp wrote on the stream.
    let written = tap.lock()[get].clone();
    assert!(
        !stream.body.is_empty() && written.starts_with(&stream.body),
        "read {:?}, pmcp wrote {:?}",
        String::from_utf8_lossy(&stream.body),
        String::from_utf8_lossy(&written)
    );
    assert_eq!(support::sse::events(stream.body.as_slice()).len(), 3);
}

/// A service answering every request with the event stream fed by the
/// returned sender.
type Streaming = tower::util::BoxCloneService<Request<Body>, Response<Body>, Infallible>;

fn streaming_service() -> (tokio::sync::mpsc::UnboundedSender<Bytes>, Streaming) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let rx = Arc::new(Mutex::new(Some(rx)));
    let service = tower::service_fn(move |_req: Request<Body>| {
        let rx = rx.lock().take();
        async move {
            let body = match rx {
                Some(rx) => Body::from_stream(tokio_stream::StreamExt::map(
                    tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
                    Ok::<_, Infallible>,
                )),
                None => Body::empty(),
            };
            let mut response = Response::new(body);
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/event-stream"),
            );
            Ok::<_, Infallible>(response)
        }
    });
    (tx, Streaming::new(service))
}

fn raw_call(id: i64, tool: &str) -> Request<Body> {
    Request::post("/")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(Body::from(tool_call(id, tool)))
        .expect("a valid request")
}

async fn next_chunk(body: &mut Body) -> Option<Bytes> {
    let frame = tokio::time::timeout(PATIENCE, body.frame())
        .await
        .expect("a frame in time")?
        .expect("a readable frame");
    frame.into_data().ok()
}

#[tokio::test]
async fn events_reach_the_client_unchanged_and_at_once() {
    let breaker = CircuitBreakerMiddleware::builder()
        .scope(Scope::PerTool)
        .failure_threshold(1)
        .build()
        .expect("valid breaker");
    let layer = ResilienceLayer::builder()
        .circuit_breaker(breaker.clone())
        .build()
        .expect("valid layer");
    let (tx, service) = streaming_service();
    let response = layer
        .layer(service)
        .oneshot(raw_call(7, "search"))
        .await
        .expect("infallible");
    let mut body = response.into_body();
    // Chunks cut anywhere, a progress notification first: each is handed on
    // as it is, before the next exists.
    let chunks: [&[u8]; 5] = [
        b": keep-alive\n\nid: a\nevent: mess",
        b"age\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\n",
        b"\nid: b\r\ndata: {\"jsonrpc\":\"2.0\",\"id\":7,\"error\":{\"code\":-32603,",
        b"\"message\":\"boom\"}}\r\n",
        b"\r\n",
    ];
    for (n, chunk) in chunks.iter().enumerate() {
        tx.send(Bytes::from_static(chunk)).expect("body alive");
        assert_eq!(
            next_chunk(&mut body).await.as_deref(),
            Some(*chunk),
            "chunk {n}"
        );
        let judged = breaker.state_of("tool:search") == Some(CircuitState::Open);
        assert_eq!(
            judged,
            n == 4,
            "judged when the answer's event ends, chunk {n}"
        );
    }
    drop(tx);
    assert_eq!(next_chunk(&mut body).await, None);
    assert_eq!(breaker.metrics().failed_requests, 1);
}

#[tokio::test]
async fn a_stream_that_ends_or_is_dropped_before_its_answer_is_neutral() {
    let breaker = CircuitBreakerMiddleware::builder()
        .scope(Scope::PerTool)
        .failure_threshold(1)
        .build()
        .expect("valid breaker");
    let layer = ResilienceLayer::builder()
        .circuit_breaker(breaker.clone())
        .build()
        .expect("valid layer");

    // Ends with only a notification.
    let (tx, service) = streaming_service();
    let response = layer
        .layer(service)
        .oneshot(raw_call(1, "search"))
        .await
        .expect("infallible");
    tx.send(Bytes::from_static(
        b"data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\n\n",
    ))
    .expect("body alive");
    drop(tx);
    let bytes = response.into_body().collect().await.expect("readable");
    assert!(!bytes.to_bytes().is_empty());

    // Dropped by the client mid-stream.
    let (tx, service) = streaming_service();
    let response = layer
        .layer(service)
        .oneshot(raw_call(2, "search"))
        .await
        .expect("infallible");
    let mut body = response.into_body();
    tx.send(Bytes::from_static(b"data: {\"jsonrpc\":\"2.0\",\"id\":2,"))
        .expect("body alive");
    assert!(next_chunk(&mut body).await.is_some());
    drop(body);

    let snapshot = breaker.metrics();
    assert_eq!(snapshot.neutral_requests, 2, "{snapshot:?}");
    assert_eq!(snapshot.successful_requests, 0);
    assert_eq!(snapshot.failed_requests, 0);
    assert_eq!(snapshot.in_flight, 0);
    assert_eq!(breaker.state_of("tool:search"), Some(CircuitState::Closed));
}
