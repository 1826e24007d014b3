//! Redis key names: `<prefix>{<scope key>}:<suffix>`.

use std::fmt::Write;

/// Longest escaped scope key kept as is inside the hash tag.
const MAX_TAG: usize = 256;

/// Appends the hash tag's content for `scope_key` to `out`: `%`, `{`, `}`
/// and control characters escaped, bounded to [`MAX_TAG`] bytes.
fn push_tag(out: &mut String, scope_key: &str) {
    let start = out.len();
    // Most scope keys need no escape: copied in one go.
    let plain = scope_key
        .bytes()
        .all(|b| b.is_ascii() && !b.is_ascii_control() && !matches!(b, b'%' | b'{' | b'}'));
    if plain {
        out.push_str(scope_key);
    } else {
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
    }
    if out.len() - start > MAX_TAG {
        let mut cut = start + MAX_TAG / 2;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        let digest = crate::scope::fnv1a(scope_key.as_bytes());
        out.truncate(cut);
        let _ = write!(out, "%#{digest:016x}");
    }
}

/// The scope key back from a tag (a digested tag comes back as is).
pub(crate) fn untag(tag: &str) -> String {
    tag.replace("%7B", "{")
        .replace("%7D", "}")
        .replace("%25", "%")
}

/// A full key name.
pub(crate) fn key(prefix: &str, scope_key: &str, suffix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + scope_key.len() + suffix.len() + 3);
    out.push_str(prefix);
    out.push('{');
    push_tag(&mut out, scope_key);
    out.push_str("}:");
    out.push_str(suffix);
    out
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
        assert_eq!(key("p:", "a\u{1}\u{85}é", "cb"), "p:{a%01%85é}:cb");
        let plain = "y".repeat(300);
        assert_eq!(
            key("p:", &plain, "cb"),
            format!(
                "p:{{{}%#{:016x}}}:cb",
                &plain[..128],
                crate::scope::fnv1a(plain.as_bytes())
            )
        );
    }
}
