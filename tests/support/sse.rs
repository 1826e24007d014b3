//! Reading event-stream bodies in tests.

use serde_json::Value;

/// The `data` of every event in an event-stream body, as JSON.
pub fn events(body: &[u8]) -> Vec<Value> {
    let text = String::from_utf8_lossy(body);
    let mut out = Vec::new();
    let mut data = String::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            if !data.is_empty() {
                out.push(serde_json::from_str(&data).unwrap_or(Value::Null));
            }
            data.clear();
        } else if let Some(value) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(value.strip_prefix(' ').unwrap_or(value));
        }
    }
    out
}

/// The single JSON-RPC message of a POST answer, whether it came as JSON or
/// as an event stream (`Value::Null` if there is none).
pub fn answer(content_type: Option<&str>, body: &[u8]) -> Value {
    if content_type.is_some_and(|c| c.starts_with("text/event-stream")) {
        events(body).into_iter().next().unwrap_or(Value::Null)
    } else {
        serde_json::from_slice(body).unwrap_or(Value::Null)
    }
}
