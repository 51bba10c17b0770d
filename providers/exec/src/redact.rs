//! Redaction of secrets out of program output before it reaches an error message or a log.
//!
//! A program may echo its environment or its request (a `set -x` shell script does), so every
//! Secret value and the bootstrap token of the request are replaced by [`REDACTED`] in any text
//! kube-node keeps from stdout or stderr.

/// What a secret is replaced with.
pub const REDACTED: &str = "<redacted>";

/// Secrets shorter than this are not redacted: replacing every `1` or `yes` in the output would
/// make it unreadable and such values are not secret anyway.
pub const MIN_SECRET_LEN: usize = 4;

/// The byte strings to cut out of program output.
#[derive(Clone, Default)]
pub(crate) struct Redactor {
    /// Longest first, so a secret containing another is replaced whole.
    needles: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} secrets)", self.needles.len())
    }
}

impl Redactor {
    /// A redactor for these secrets (those shorter than [`MIN_SECRET_LEN`] are ignored).
    pub(crate) fn new<'a>(secrets: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut r = Self::default();
        r.extend(secrets);
        r
    }

    /// This redactor plus more secrets (a request's user data and its token).
    pub(crate) fn with<'a>(&self, secrets: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut r = self.clone();
        r.extend(secrets);
        r
    }

    fn extend<'a>(&mut self, secrets: impl IntoIterator<Item = &'a [u8]>) {
        for s in secrets {
            if s.len() >= MIN_SECRET_LEN && !self.needles.iter().any(|n| n == s) {
                self.needles.push(s.to_vec());
            }
        }
        self.needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
    }

    /// The longest secret, in bytes.
    pub(crate) fn longest(&self) -> usize {
        self.needles.first().map_or(0, Vec::len)
    }

    /// `text` with every secret replaced.
    pub(crate) fn redact(&self, text: &[u8]) -> Vec<u8> {
        let mut out = text.to_vec();
        for needle in &self.needles {
            out = replace_all(&out, needle, REDACTED.as_bytes());
        }
        out
    }

    /// `text` with every secret replaced, as (lossy) UTF-8.
    pub(crate) fn redact_str(&self, text: &[u8]) -> String {
        String::from_utf8_lossy(&self.redact(text)).into_owned()
    }

    /// The redacted text of a buffer that kept only the tail of a longer output. A secret cut
    /// in half by the capture's start would survive redaction as a fragment, so when the
    /// buffer was truncated its first `longest()` bytes are dropped too.
    pub(crate) fn redact_tail(&self, tail: &[u8], truncated: bool) -> String {
        let skip = if truncated {
            self.longest().min(tail.len())
        } else {
            0
        };
        self.redact_str(&tail[skip..])
    }
}

fn replace_all(hay: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    if needle.is_empty() || hay.len() < needle.len() {
        return hay.to_vec();
    }
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

/// The kubeadm bootstrap tokens (`[a-z0-9]{6}.[a-z0-9]{16}`) in a join payload, and their
/// secret halves, so they are redacted even when a program prints only the token and not the
/// whole payload.
pub(crate) fn bootstrap_tokens(payload: &str) -> Vec<&str> {
    let b = payload.as_bytes();
    let tok = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let mut found = Vec::new();
    for (dot, _) in b.iter().enumerate().filter(|(_, c)| **c == b'.') {
        let (Some(start), end) = (dot.checked_sub(6), dot + 17) else {
            continue;
        };
        if end > b.len()
            || !b[start..dot].iter().all(|c| tok(*c))
            || !b[dot + 1..end].iter().all(|c| tok(*c))
            || (start > 0 && tok(b[start - 1]))
            || (end < b.len() && tok(b[end]))
        {
            continue;
        }
        // Indices are ASCII positions, so these are char boundaries.
        found.push(&payload[start..end]);
        found.push(&payload[dot + 1..end]);
    }
    found
}

/// The last `max` bytes of `text`, cut at a char boundary, with a note of what was cut.
pub(crate) fn tail_chars(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("[{} bytes cut]...{}", start, &text[start..])
}

/// The first `max` bytes of `text`, cut at a char boundary.
pub(crate) fn head_chars(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...[{} bytes cut]", &text[..end], text.len() - end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_every_occurrence_longest_first() {
        let r = Redactor::new([b"hunter2".as_slice(), b"hunter2-long".as_slice(), b"abc"]);
        assert_eq!(
            r.redact_str(b"a hunter2-long and hunter2, abc"),
            "a <redacted> and <redacted>, abc"
        );
    }

    #[test]
    fn truncated_tail_drops_a_cut_secret() {
        let r = Redactor::new([b"s3cr3t-value".as_slice()]);
        // The capture started in the middle of the secret: "3t-value" would leak.
        let tail = b"3t-value then the rest of the line";
        let out = r.redact_tail(tail, true);
        assert!(!out.contains("3t-value"), "{out}");
        assert_eq!(r.redact_tail(b"x s3cr3t-value", false), "x <redacted>");
    }

    #[test]
    fn finds_bootstrap_tokens() {
        let ud = "token: \"abcdef.0123456789abcdef\"\nnot: abcdefg.0123456789abcdef\n";
        assert_eq!(
            bootstrap_tokens(ud),
            vec!["abcdef.0123456789abcdef", "0123456789abcdef"]
        );
        assert!(bootstrap_tokens("a.b").is_empty());
        assert!(bootstrap_tokens("").is_empty());
    }

    #[test]
    fn cuts_at_char_boundaries() {
        let s = "ééééé";
        assert!(tail_chars(s, 3).ends_with('é'));
        assert!(head_chars(s, 3).starts_with('é'));
        assert_eq!(tail_chars("abc", 10), "abc");
    }
}
