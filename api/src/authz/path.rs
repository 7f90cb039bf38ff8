//! Request paths as authorization sees them, normalised once, before any
//! rule is matched, into the form the most lenient app would see: the
//! class of bugs where RBAC and the app disagree about a path (Envoy/Istio
//! CVE-2019-9901, CVE-2021-31920, CVE-2021-39156) comes from normalising
//! differently, or not at all.
//!
//! In order:
//! 1. the query (`?…`) and fragment (`#…`) are dropped;
//! 2. control characters, a raw `\`, raw non-ASCII bytes (HTTP allows
//!    only ASCII in a request target), and the encoded separators `%2F` and
//!    `%5C` (either case) are refused: an app may decode them into path
//!    separators, or read them in another charset, the rules never saw;
//! 3. percent-encodings of unreserved characters (`A-Z a-z 0-9 - . _ ~`)
//!    are decoded, others kept with upper-case hex; a malformed escape is
//!    refused;
//! 4. path parameters (`;…` up to the next `/`) are removed from each
//!    segment, as servlet containers do (`/admin;x/` is `/admin/`);
//! 5. runs of `/` are merged;
//! 6. `.` and `..` segments are resolved (RFC 3986 5.2.4), never above `/`.
//!
//! A refused path is a denied request.

/// Why a path cannot be authorised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path does not start with '/'")]
    NotAbsolute,
    #[error("the path contains a control character")]
    Control,
    #[error("the path contains a backslash")]
    Backslash,
    #[error("the path contains an encoded separator (%2F or %5C)")]
    EncodedSeparator,
    #[error("the path contains a malformed percent-encoding")]
    BadEscape,
    #[error("the path contains a raw non-ASCII byte")]
    NonAscii,
}

impl PathError {
    /// A metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            PathError::NotAbsolute => "path_not_absolute",
            PathError::Control => "path_control_character",
            PathError::Backslash => "path_backslash",
            PathError::EncodedSeparator => "path_encoded_separator",
            PathError::BadEscape => "path_bad_escape",
            PathError::NonAscii => "path_non_ascii",
        }
    }
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Steps 1 to 3: the path without query or fragment, escapes checked and
/// unreserved ones decoded.
fn decode(raw: &str) -> Result<String, PathError> {
    let path = raw.split(['?', '#']).next().unwrap_or_default();
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (h, l) = match (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) {
                    (Some(h), Some(l)) => (h, l),
                    _ => return Err(PathError::BadEscape),
                };
                let c = h * 16 + l;
                if c == b'/' || c == b'\\' {
                    return Err(PathError::EncodedSeparator);
                }
                if unreserved(c) {
                    out.push(c as char);
                } else {
                    out.push_str(&format!("%{c:02X}"));
                }
                i += 3;
                continue;
            }
            b'\\' => return Err(PathError::Backslash),
            _ if !b.is_ascii() => return Err(PathError::NonAscii),
            _ if b.is_ascii_control() => return Err(PathError::Control),
            _ => out.push(b as char),
        }
        i += 1;
    }
    Ok(out)
}

/// The normalised form of `raw` (a request target's path, with or without
/// a query), or why it is refused.
pub fn normalize(raw: &str) -> Result<String, PathError> {
    let decoded = decode(raw)?;
    let mut segments: Vec<&str> = Vec::new();
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    for segment in decoded.split('/') {
        let segment = segment.split(';').next().unwrap_or_default();
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || (trailing && !out.ends_with('/')) {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_normalise_the_way_a_lenient_app_reads_them() {
        let table: &[(&str, &str)] = &[
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("/a/b?x=1", "/a/b"),
            ("/a/b#frag", "/a/b"),
            ("/a//b///c", "/a/b/c"),
            ("/a/./b", "/a/b"),
            ("/a/../admin", "/admin"),
            ("/../../admin", "/admin"),
            ("/public/..%2e/admin", "/public/.../admin"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/admin;jsessionid=1/x", "/admin/x"),
            ("/public;/../admin", "/admin"),
            ("/a/b/.", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/a%20b", "/a%20b"),
            ("/~user/x", "/~user/x"),
        ];
        for (raw, want) in table {
            assert_eq!(normalize(raw).as_deref(), Ok(*want), "{raw}");
        }
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        let table: &[(&str, PathError)] = &[
            ("/admin%2Fsecret", PathError::EncodedSeparator),
            ("/admin%2fsecret", PathError::EncodedSeparator),
            ("/admin%5Csecret", PathError::EncodedSeparator),
            ("/admin%5csecret", PathError::EncodedSeparator),
            ("/admin\\secret", PathError::Backslash),
            ("/admin%zz", PathError::BadEscape),
            ("/admin%4", PathError::BadEscape),
            ("/admin\u{0}x", PathError::Control),
            ("/a\tb", PathError::Control),
            ("admin", PathError::NotAbsolute),
            ("*", PathError::NotAbsolute),
            ("", PathError::NotAbsolute),
            // Found by the fuzzer: a raw multi-byte character read byte by
            // byte normalised to a different path the second time.
            ("/public/%61dmin/../x\u{498}ses-sx", PathError::NonAscii),
            ("/caf\u{e9}", PathError::NonAscii),
        ];
        for (raw, want) in table {
            assert_eq!(normalize(raw), Err(want.clone()), "{raw:?}");
        }
    }
}
