//! Reading the JSON-RPC answers in a response body as it passes to the
//! client: an event stream (`text/event-stream`) is parsed line by line,
//! each chunk is forwarded unchanged the moment it arrives, and only the
//! `data` of the event being read is held.

use axum::body::Body;
use http_body_util::BodyExt;
use serde_json::Value;

/// The most `data` one event may carry and still be read (16 MiB): a larger
/// event passes unread, and its call ends neutral.
pub(crate) const MAX_EVENT_BYTES: usize = 16 << 20;

/// How one JSON-RPC response ended its call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// A result; `tool_error` for a tool result with `isError: true`.
    Result { tool_error: bool },
    /// A JSON-RPC error.
    Error { code: i32, message: String },
}

/// The JSON-RPC responses in one JSON text (a message or a batch), as
/// `(id as JSON text, answer)`. Requests and notifications are skipped.
pub(crate) fn answers(json: &[u8]) -> Vec<(String, Answer)> {
    match serde_json::from_slice::<Value>(json) {
        Ok(Value::Array(items)) => items.iter().filter_map(answer).collect(),
        Ok(value) => answer(&value).into_iter().collect(),
        Err(_) => Vec::new(),
    }
}

fn answer(value: &Value) -> Option<(String, Answer)> {
    let object = value.as_object()?;
    if object.contains_key("method") {
        return None;
    }
    let id = serde_json::to_string(object.get("id")?).ok()?;
    if let Some(error) = object.get("error") {
        let code = error
            .get("code")
            .and_then(Value::as_i64)
            .and_then(|c| i32::try_from(c).ok())?;
        let message = error
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        return Some((id, Answer::Error { code, message }));
    }
    let result = object.get("result")?;
    let tool_error = result.get("isError").and_then(Value::as_bool) == Some(true);
    Some((id, Answer::Result { tool_error }))
}

/// An incremental parser of the event-stream format: fed chunks as they
/// come, it hands out the `data` of each complete event.
#[derive(Debug, Default)]
pub(crate) struct EventReader {
    /// The current line, up to its newline.
    line: Vec<u8>,
    /// The `data` lines of the current event, joined with `\n`.
    data: Vec<u8>,
    has_data: bool,
    /// The current event grew past [`MAX_EVENT_BYTES`]: it is skipped.
    oversized: bool,
}

impl EventReader {
    /// Reads `chunk`, calling `on_event` with the data of each event it
    /// completes.
    pub(crate) fn feed(&mut self, mut chunk: &[u8], mut on_event: impl FnMut(&[u8])) {
        while !chunk.is_empty() {
            let (piece, rest, ended) = match chunk.iter().position(|&b| b == b'\n') {
                Some(n) => (&chunk[..n], &chunk[n + 1..], true),
                None => (chunk, &[][..], false),
            };
            chunk = rest;
            if !self.oversized {
                if self.line.len() + piece.len() > MAX_EVENT_BYTES {
                    self.oversized = true;
                    self.line = Vec::new();
                } else {
                    self.line.extend_from_slice(piece);
                }
            }
            if ended {
                self.end_line(&mut on_event);
            }
        }
    }

    fn end_line(&mut self, on_event: &mut impl FnMut(&[u8])) {
        let mut line = std::mem::take(&mut self.line);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.is_empty() {
            if self.has_data && !self.oversized {
                on_event(&self.data);
            }
            self.data.clear();
            self.has_data = false;
            self.oversized = false;
        } else if !self.oversized
            && let Some(value) = line.strip_prefix(b"data")
            && (value.is_empty() || value[0] == b':')
        {
            let value = value.strip_prefix(b":").unwrap_or(value);
            let value = value.strip_prefix(b" ").unwrap_or(value);
            if self.data.len() + value.len() + 1 > MAX_EVENT_BYTES {
                self.oversized = true;
                self.data = Vec::new();
            } else {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
        }
        // Keep the line's allocation for the next one.
        line.clear();
        self.line = line;
    }
}

/// Told about the answers found in a watched body.
pub(crate) trait AnswerSink: Send + 'static {
    /// Whether any call still waits for its answer (when none does, events
    /// pass without being parsed).
    fn waiting(&self) -> bool;

    /// The response with JSON-RPC id `id` (as JSON text) passed.
    fn answered(&mut self, id: &str, answer: Answer);
}

/// `body`, passed on unchanged, read on the way by an [`EventReader`]
/// that tells `sink` each answer before the client sees its bytes (a caller
/// that reads an answer finds the breaker already moved by it). Whatever
/// the sink still waits for when the body ends or is dropped is its to
/// settle, on its own drop.
pub(crate) fn watch<S: AnswerSink>(body: Body, mut sink: S) -> Body {
    let mut reader = EventReader::default();
    Body::new(body.map_frame(move |frame| {
        if let Some(data) = frame.data_ref() {
            let sink = &mut sink;
            reader.feed(data, |event| {
                if sink.waiting() {
                    for (id, answer) in answers(event) {
                        sink.answered(&id, answer);
                    }
                }
            });
        }
        frame
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&[u8]]) -> Vec<String> {
        let mut reader = EventReader::default();
        let mut out = Vec::new();
        for chunk in chunks {
            reader.feed(chunk, |d| out.push(String::from_utf8_lossy(d).into_owned()));
        }
        out
    }

    #[test]
    fn events_are_read_across_chunk_boundaries() {
        let stream =
            b"id: 1\nevent: message\ndata: {\"a\":1}\n\n: comment\ndata:x\r\ndata: y\r\n\r\n";
        let whole = events(&[stream]);
        assert_eq!(whole, vec!["{\"a\":1}".to_string(), "x\ny".to_string()]);
        for cut in 0..stream.len() {
            assert_eq!(
                events(&[&stream[..cut], &stream[cut..]]),
                whole,
                "cut at {cut}"
            );
        }
        let bytewise: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(events(&bytewise), whole);
        assert_eq!(events(&[b"data: incomplete\n"]), Vec::<String>::new());
        assert_eq!(events(&[b"datum: no\n\n"]), Vec::<String>::new());
    }

    #[test]
    fn answers_are_told_from_requests() {
        let batch = br#"[{"jsonrpc":"2.0","id":1,"result":{"isError":true}},
            {"jsonrpc":"2.0","id":"a","error":{"code":-32603,"message":"boom"}},
            {"jsonrpc":"2.0","id":9,"method":"sampling/createMessage"},
            {"jsonrpc":"2.0","method":"notifications/progress"}]"#;
        assert_eq!(
            answers(batch),
            vec![
                ("1".to_string(), Answer::Result { tool_error: true }),
                (
                    "\"a\"".to_string(),
                    Answer::Error {
                        code: -32603,
                        message: "boom".into()
                    }
                ),
            ]
        );
        assert!(answers(b"not json").is_empty());
    }
}
