//! Small helpers: identifiers, timestamps, JSON navigation, name validation.

use rand::Rng;
use serde_json::{Map, Value};

/// A random UUID (version 4) string.
pub(crate) fn new_uid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    // 8-4-4-4-12; `hex` is always 32 ASCII chars.
    format!(
        "{}-{}-{}-{}-{}",
        hex.get(0..8).unwrap_or_default(),
        hex.get(8..12).unwrap_or_default(),
        hex.get(12..16).unwrap_or_default(),
        hex.get(16..20).unwrap_or_default(),
        hex.get(20..32).unwrap_or_default()
    )
}

/// Current time as RFC 3339 with second precision, UTC (`2024-01-02T03:04:05Z`).
pub(crate) fn now_rfc3339() -> String {
    let now = jiff::Timestamp::now();
    jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%SZ", now).unwrap_or_else(|_| now.to_string())
}

/// The random suffix used for `generateName` (same alphabet as the apiserver).
pub(crate) fn random_suffix(n: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..n)
        .map(|_| {
            let i = rng.random_range(0..ALPHABET.len());
            ALPHABET.get(i).copied().map(char::from).unwrap_or('x')
        })
        .collect()
}

pub(crate) fn meta(v: &Value) -> Option<&Map<String, Value>> {
    v.get("metadata").and_then(Value::as_object)
}

/// `metadata` of an object, created if missing. `None` if `v` is not an object.
pub(crate) fn meta_mut(v: &mut Value) -> Option<&mut Map<String, Value>> {
    let obj = v.as_object_mut()?;
    let m = obj
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !m.is_object() {
        *m = Value::Object(Map::new());
    }
    m.as_object_mut()
}

pub(crate) fn meta_str<'a>(v: &'a Value, field: &str) -> Option<&'a str> {
    meta(v).and_then(|m| m.get(field)).and_then(Value::as_str)
}

pub(crate) fn name_of(v: &Value) -> &str {
    meta_str(v, "name").unwrap_or_default()
}

pub(crate) fn uid_of(v: &Value) -> &str {
    meta_str(v, "uid").unwrap_or_default()
}

pub(crate) fn rv_of(v: &Value) -> &str {
    meta_str(v, "resourceVersion").unwrap_or_default()
}

pub(crate) fn labels_of(v: &Value) -> Option<&Map<String, Value>> {
    meta(v)
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_object)
}

pub(crate) fn finalizers_of(v: &Value) -> Vec<String> {
    meta(v)
        .and_then(|m| m.get("finalizers"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn is_deleting(v: &Value) -> bool {
    meta(v)
        .and_then(|m| m.get("deletionTimestamp"))
        .is_some_and(|t| !t.is_null())
}

/// UIDs of `metadata.ownerReferences`.
pub(crate) fn owner_uids(v: &Value) -> Vec<String> {
    meta(v)
        .and_then(|m| m.get("ownerReferences"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|r| r.get("uid").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Parse a JSON-path-like field path as used by CRD scale subresources
/// (`.spec.replicas`) into its segments.
pub(crate) fn parse_json_path(p: &str) -> Vec<String> {
    p.split('.')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

pub(crate) fn get_path<'a, S: AsRef<str>>(v: &'a Value, path: &[S]) -> Option<&'a Value> {
    let mut cur = v;
    for seg in path {
        cur = cur.get(seg.as_ref())?;
    }
    Some(cur)
}

/// Set `value` at `path`, creating intermediate objects. Returns false if an
/// intermediate value exists and is not an object.
pub(crate) fn set_path<S: AsRef<str>>(v: &mut Value, path: &[S], value: Value) -> bool {
    let Some((last, parents)) = path.split_last() else {
        *v = value;
        return true;
    };
    let mut cur = v;
    for seg in parents {
        let Some(obj) = cur.as_object_mut() else {
            return false;
        };
        let next = obj
            .entry(seg.as_ref())
            .or_insert_with(|| Value::Object(Map::new()));
        if next.is_null() {
            *next = Value::Object(Map::new());
        }
        cur = next;
    }
    match cur.as_object_mut() {
        Some(obj) => {
            obj.insert(last.as_ref().to_string(), value);
            true
        }
        None => false,
    }
}

/// RFC 1123 subdomain check used for object names.
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    if s.is_empty() || s.len() > 253 {
        return false;
    }
    s.split('.').all(|label| {
        let b = label.as_bytes();
        !b.is_empty()
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b.first().is_some_and(u8::is_ascii_alphanumeric)
            && b.last().is_some_and(u8::is_ascii_alphanumeric)
    })
}

/// Percent-decode a query component (`+` means space).
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes.get(i) {
            Some(b'+') => {
                out.push(b' ');
                i += 1;
            }
            Some(b'%') => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            Some(b) => {
                out.push(*b);
                i += 1;
            }
            None => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn hex_encode(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn hex_decode(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() / 2);
    let mut i = 0;
    while i < s.len() {
        let b = u8::from_str_radix(s.get(i..i + 2)?, 16).ok()?;
        out.push(b);
        i += 2;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_format() {
        let u = new_uid();
        assert_eq!(u.len(), 36);
        assert_eq!(u.chars().nth(14), Some('4'));
    }

    #[test]
    fn subdomain() {
        assert!(is_dns_subdomain("node-1.example"));
        assert!(!is_dns_subdomain("Node"));
        assert!(!is_dns_subdomain("-a"));
        assert!(!is_dns_subdomain(""));
    }

    #[test]
    fn decode() {
        assert_eq!(percent_decode("a%3Db+c%2"), "a=b c%2");
        assert_eq!(hex_decode(&hex_encode("ns/ä")).as_deref(), Some("ns/ä"));
        assert_eq!(hex_decode("zz"), None);
    }

    #[test]
    fn paths() {
        let mut v = serde_json::json!({});
        assert!(set_path(
            &mut v,
            &parse_json_path(".spec.replicas"),
            3.into()
        ));
        assert_eq!(get_path(&v, &["spec", "replicas"]), Some(&3.into()));
    }
}
