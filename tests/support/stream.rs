//! An MCP session's GET event stream, read over raw HTTP/1.1 as it comes.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An open GET stream.
pub struct EventStream {
    stream: TcpStream,
    /// Bytes read and not yet de-chunked.
    raw: Vec<u8>,
    /// The body so far, de-chunked: exactly the bytes the server sent.
    pub body: Vec<u8>,
    /// How much of `body` has been handed out as events.
    read: usize,
}

impl EventStream {
    /// Opens the stream of `session`; panics unless it is answered 200 with
    /// an event stream.
    pub async fn open(addr: SocketAddr, session: &str) -> EventStream {
        let mut stream = match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => panic!("cannot connect to {addr}: {e}"),
        };
        let head = format!(
            "GET / HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\
             mcp-session-id: {session}\r\n\r\n"
        );
        if let Err(e) = stream.write_all(head.as_bytes()).await {
            panic!("cannot send to {addr}: {e}");
        }
        let mut this = EventStream {
            stream,
            raw: Vec::new(),
            body: Vec::new(),
            read: 0,
        };
        let end = loop {
            if let Some(end) = this.raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            this.fill().await;
        };
        let head = String::from_utf8_lossy(&this.raw[..end]).to_ascii_lowercase();
        assert!(
            head.starts_with("http/1.1 200"),
            "GET stream refused: {head}"
        );
        assert!(
            head.contains("text/event-stream"),
            "not an event stream: {head}"
        );
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        this.raw.drain(..end + 4);
        this
    }

    async fn fill(&mut self) {
        let mut buf = [0u8; 8192];
        match tokio::time::timeout(Duration::from_secs(60), self.stream.read(&mut buf)).await {
            Ok(Ok(0)) => panic!("the GET stream ended"),
            Ok(Ok(n)) => self.raw.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => panic!("the GET stream failed: {e}"),
            Err(_) => panic!("no event on the GET stream in time"),
        }
    }

    /// Moves complete chunks from `raw` to `body`.
    fn dechunk(&mut self) {
        while let Some(line) = self.raw.windows(2).position(|w| w == b"\r\n") {
            let size_text = String::from_utf8_lossy(&self.raw[..line]).into_owned();
            let size = usize::from_str_radix(size_text.trim(), 16).unwrap_or(0);
            if self.raw.len() < line + 2 + size + 2 {
                return;
            }
            let start = line + 2;
            self.body.extend_from_slice(&self.raw[start..start + size]);
            self.raw.drain(..start + size + 2);
        }
    }

    /// The next event's `data` as JSON, and its raw text.
    pub async fn next_event(&mut self) -> (Value, String) {
        loop {
            self.dechunk();
            if let Some(end) = self.body[self.read..].windows(2).position(|w| w == b"\n\n") {
                let text = String::from_utf8_lossy(&self.body[self.read..self.read + end + 2])
                    .into_owned();
                self.read += end + 2;
                let data: String = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect::<Vec<_>>()
                    .join("\n");
                if data.is_empty() {
                    continue; // a comment or keep-alive
                }
                return (serde_json::from_str(&data).unwrap_or(Value::Null), text);
            }
            self.fill().await;
        }
    }
}
