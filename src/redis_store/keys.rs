//! Redis key names: `<prefix>{<scope key>}:<suffix>`.

use std::fmt::Write;

/// Longest escaped scope key kept as is inside the hash tag.
const MAX_TAG: usize = 256;

/// The hash tag's content for `scope_key`: `%`, `{`, `}` escaped, bounded.
pub(crate) fn tag(scope_key: &str) -> String {
    let mut out = String::with_capacity(scope_key.len() + 8);
    for c in scope_key.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c if c.is_control() => {
                let _ = write!(out, "%{:02X}", u32::from(c) & 0xff);
            }
            c => out.push(c),
        }
    }
    if out.len() > MAX_TAG {
        let mut cut = MAX_TAG / 2;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        let digest = crate::scope::fnv1a(scope_key.as_bytes());
        out.truncate(cut);
        let _ = write!(out, "%#{digest:016x}");
    }
    out
}

/// The scope key back from a tag (a digested tag comes back as is).
pub(crate) fn untag(tag: &str) -> String {
    tag.replace("%7B", "{")
        .replace("%7D", "}")
        .replace("%25", "%")
}

/// A full key name.
pub(crate) fn key(prefix: &str, scope_key: &str, suffix: &str) -> String {
    format!("{prefix}{{{}}}:{suffix}", tag(scope_key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrusted_parts_cannot_break_the_hash_tag() {
        let k = key("p:", "session:a}b{c%", "cb");
        assert_eq!(k, "p:{session:a%7Db%7Bc%25}:cb");
        assert_eq!(untag("session:a%7Db%7Bc%25"), "session:a}b{c%");
        let long = "x{".repeat(400);
        let k = key("p:", &long, "cb");
        assert!(k.len() < 300);
        assert_eq!(k.matches('{').count(), 1);
        assert_eq!(k.matches('}').count(), 1);
        assert_ne!(key("p:", &long, "cb"), key("p:", &"x{".repeat(401), "cb"));
    }
}
