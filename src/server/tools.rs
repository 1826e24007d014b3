//! The server's tools, as the layer knows them: a tool name a client
//! invents must not mint a key of its own (each would cost memory and could
//! be opened by its caller's junk).

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use pmcp::types::JSONRPCRequest;
use serde_json::json;

use crate::scope::tool_name;

/// The name keys give every tool the server does not have: `tool:<unknown>`
/// under [`Scope::PerTool`](crate::Scope::PerTool).
pub const UNKNOWN_TOOL: &str = "<unknown>";

/// Where the layer learns the server's tools.
#[derive(Clone)]
pub(crate) enum ToolCatalog {
    /// A list given by the user.
    Names(Arc<HashSet<String>>),
    /// pmcp's server itself (its registered tools, `Server::has_tool`).
    Server(Arc<pmcp::Server>),
}

impl fmt::Debug for ToolCatalog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ToolCatalog::Names(names) => f.debug_tuple("Names").field(&names.len()).finish(),
            ToolCatalog::Server(_) => f.write_str("Server(..)"),
        }
    }
}

impl ToolCatalog {
    fn knows(&self, name: &str) -> bool {
        match self {
            ToolCatalog::Names(names) => names.contains(name),
            ToolCatalog::Server(server) => server.has_tool(name),
        }
    }
}

/// What a call is, as far as tools go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ToolCall {
    /// Not a `tools/call`, or a call of a tool the server has.
    Plain,
    /// A call of a tool the server does not have: keyed as
    /// [`UNKNOWN_TOOL`], and whatever the answer, the caller's mistake.
    Unknown,
    /// A `tools/call` the layer cannot check (no catalog): pmcp's own
    /// "Tool '<name>' not found" answer to it is the caller's mistake.
    Unchecked(String),
}

/// The call as keys see it (an unknown tool renamed [`UNKNOWN_TOOL`]), and
/// what kind of call it is.
pub(crate) fn classify<'a>(
    call: &'a JSONRPCRequest,
    catalog: Option<&ToolCatalog>,
) -> (Cow<'a, JSONRPCRequest>, ToolCall) {
    let Some(name) = tool_name(call) else {
        return (Cow::Borrowed(call), ToolCall::Plain);
    };
    match catalog {
        None => (Cow::Borrowed(call), ToolCall::Unchecked(name.to_owned())),
        Some(c) if c.knows(name) => (Cow::Borrowed(call), ToolCall::Plain),
        Some(_) => (
            // Only the name: keys of an unknown tool never read its arguments.
            Cow::Owned(JSONRPCRequest {
                jsonrpc: "2.0".into(),
                method: call.method.clone(),
                params: Some(json!({ "name": UNKNOWN_TOOL })),
                id: call.id.clone(),
            }),
            ToolCall::Unknown,
        ),
    }
}

/// Whether `message` (of a -32603 answer) is pmcp's answer to a call of a
/// tool it does not have.
pub(crate) fn is_not_found(tool: &str, code: i32, message: &str) -> bool {
    code == pmcp::ErrorCode::INTERNAL_ERROR.as_i32()
        && message.contains(&format!("Tool '{tool}' not found"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pmcp::types::RequestId;

    fn call(method: &str, name: &str) -> JSONRPCRequest {
        JSONRPCRequest {
            jsonrpc: "2.0".into(),
            method: method.into(),
            params: Some(json!({ "name": name, "arguments": {"q": 1} })),
            id: RequestId::from(1i64),
        }
    }

    #[test]
    fn unknown_tools_are_renamed_for_keys() {
        let names = ToolCatalog::Names(Arc::new(HashSet::from(["search".to_string()])));
        let known = call("tools/call", "search");
        assert_eq!(classify(&known, Some(&names)).1, ToolCall::Plain);
        let junk = call("tools/call", "x7f3");
        let (keyed, kind) = classify(&junk, Some(&names));
        assert_eq!(kind, ToolCall::Unknown);
        assert_eq!(tool_name(&keyed), Some(UNKNOWN_TOOL));
        assert_eq!(classify(&junk, None).1, ToolCall::Unchecked("x7f3".into()));
        assert_eq!(
            classify(&call("tools/list", "x"), Some(&names)).1,
            ToolCall::Plain
        );
        assert!(is_not_found(
            "x7f3",
            -32603,
            "Resource not found: Tool 'x7f3' not found"
        ));
        assert!(!is_not_found("x7f3", -32603, "database down"));

        let server = pmcp::Server::builder()
            .name("t")
            .version("1")
            .tool("search", pmcp::SyncTool::new("search", |_| Ok(json!({}))))
            .build()
            .expect("a server");
        let of_server = ToolCatalog::Server(Arc::new(server));
        assert_eq!(classify(&known, Some(&of_server)).1, ToolCall::Plain);
        assert_eq!(classify(&junk, Some(&of_server)).1, ToolCall::Unknown);
        assert!(!is_not_found("x7f3", -32602, "Tool 'x7f3' not found"));
    }
}
