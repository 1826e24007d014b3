//! A hand-written HTTP/1.1 client, to see status codes, headers and bodies
//! exactly as any HTTP client (curl, a gateway, another SDK) would.

use std::net::SocketAddr;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP response, read to the end.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The value of the header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (`Value::Null` if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// POSTs `body` to `/` with the MCP headers and `extra` headers.
pub async fn post(addr: SocketAddr, body: &[u8], extra: &[(&str, &str)]) -> RawResponse {
    send(addr, "POST", body, extra).await
}

/// Sends a `method` request with `body` to `/`, with the MCP headers and `extra`.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    body: &[u8],
    extra: &[(&str, &str)],
) -> RawResponse {
    send_from(None, addr, method, body, extra).await
}

/// POSTs `body` from the loopback address `source` (127.0.0.2, ...), as a
/// client on another host would.
pub async fn post_from(
    source: std::net::IpAddr,
    addr: SocketAddr,
    body: &[u8],
    extra: &[(&str, &str)],
) -> RawResponse {
    send_from(Some(source), addr, "POST", body, extra).await
}

/// [`send`], from the address `source` if given.
pub async fn send_from(
    source: Option<std::net::IpAddr>,
    addr: SocketAddr,
    method: &str,
    body: &[u8],
    extra: &[(&str, &str)],
) -> RawResponse {
    let mut head = format!(
        "{method} / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\nContent-Length: {}\r\n\
         Connection: close\r\n",
        body.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let connected = match source {
        None => tokio::net::TcpStream::connect(addr).await,
        Some(ip) => {
            let socket = match tokio::net::TcpSocket::new_v4() {
                Ok(s) => s,
                Err(e) => panic!("no socket: {e}"),
            };
            if let Err(e) = socket.bind(SocketAddr::new(ip, 0)) {
                panic!("cannot bind {ip}: {e}");
            }
            socket.connect(addr).await
        }
    };
    let mut stream = match connected {
        Ok(s) => s,
        Err(e) => panic!("cannot connect to {addr}: {e}"),
    };
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    if let Err(e) = stream.write_all(&request).await {
        panic!("cannot send to {addr}: {e}");
    }
    let mut raw = Vec::new();
    // The server may answer (413) before reading the whole body: what was
    // read before a reset is still the answer.
    let _ = stream.read_to_end(&mut raw).await;
    parse(&raw)
}

fn parse(raw: &[u8]) -> RawResponse {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        panic!(
            "no complete HTTP head in {:?}",
            String::from_utf8_lossy(raw)
        );
    };
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let rest = &raw[end + 4..];
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    RawResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&rest[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or(0);
        rest = &rest[line_end + 2..];
        if size == 0 || rest.len() < size {
            break;
        }
        out.extend_from_slice(&rest[..size]);
        rest = rest.get(size + 2..).unwrap_or(&[]);
    }
    out
}

/// Opens an MCP session over raw HTTP (initialize, then the initialized
/// notification) and returns its `mcp-session-id`.
pub async fn open_session(addr: SocketAddr) -> String {
    let init = json!({
        "jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "1.0.0"}
        }
    });
    let response = post(addr, init.to_string().as_bytes(), &[]).await;
    let Some(session) = response.header("mcp-session-id").map(str::to_owned) else {
        panic!(
            "initialize gave no session: {} {}",
            response.status,
            String::from_utf8_lossy(&response.body)
        );
    };
    let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    post(
        addr,
        note.to_string().as_bytes(),
        &[("mcp-session-id", &session)],
    )
    .await;
    session
}

/// A `tools/call` request body.
pub fn tool_call(id: i64, tool: &str) -> Vec<u8> {
    json!({
        "jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": tool, "arguments": {"message": "hi"}}
    })
    .to_string()
    .into_bytes()
}

/// An `initialize` request body.
pub fn initialize_body(id: i64) -> Vec<u8> {
    json!({
        "jsonrpc": "2.0", "id": id, "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "1.0.0"}
        }
    })
    .to_string()
    .into_bytes()
}
