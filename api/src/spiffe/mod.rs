//! SPIFFE IDs and trust domains.
//!
//! Both types are always valid: their fields are private and every
//! constructor checks the rules of the SPIFFE ID specification
//! (`standards/SPIFFE-ID.md`):
//!
//! - the scheme is exactly `spiffe` followed by `://`;
//! - the trust domain is non-empty, at most 255 bytes, and made only of
//!   lowercase letters, digits, `.`, `-` and `_` (so no port, no userinfo,
//!   no percent-encoding);
//! - the path is empty or a sequence of `/segment`, where a segment is
//!   non-empty, is neither `.` nor `..`, and is made only of letters, digits,
//!   `.`, `-` and `_` (so no trailing slash, no query, no fragment);
//! - the whole ID is at most 2048 bytes.
//!
//! Input that breaks a rule is refused, never "fixed up": an ID with an
//! uppercase trust domain or a `//` in its path is a different string from
//! the canonical one, and accepting it would let two spellings name one
//! identity (SPIRE CVE-2021-27099).

use std::fmt;
use std::str::FromStr;

/// The URI scheme prefix of every SPIFFE ID.
pub const SCHEME_PREFIX: &str = "spiffe://";
/// Longest SPIFFE ID accepted, in bytes, scheme included.
pub const MAX_ID_LEN: usize = 2048;
/// Longest trust domain name accepted, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// The trust domain Mizzen uses unless configured otherwise.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID must start with \"spiffe://\"")]
    WrongScheme,
    #[error("trust domain is missing")]
    MissingTrustDomain,
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error("trust domain may contain only lowercase letters, digits, '.', '-' and '_', found {0:?}")]
    BadTrustDomainChar(char),
    #[error("SPIFFE ID is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    #[error("path must not contain empty segments (\"//\" or a trailing \"/\")")]
    EmptySegment,
    #[error("path must not contain \".\" or \"..\" segments")]
    DotSegment,
    #[error("path segments may contain only letters, digits, '.', '-' and '_', found {0:?}")]
    BadPathChar(char),
    #[error("path must start with \"/\"")]
    RelativePath,
}

fn is_trust_domain_char(c: char) -> bool {
    matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_')
}

fn is_path_char(c: char) -> bool {
    matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_')
}

/// The name of a SPIFFE trust domain, such as `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (`cluster.local`, not a URI).
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        if name.is_empty() {
            return Err(SpiffeIdError::MissingTrustDomain);
        }
        if name.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(SpiffeIdError::TrustDomainTooLong);
        }
        if let Some(c) = name.chars().find(|c| !is_trust_domain_char(*c)) {
            return Err(SpiffeIdError::BadTrustDomainChar(c));
        }
        Ok(Self(name.to_owned()))
    }

    /// The trust domain name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own ID, `spiffe://<name>`, used by signing authorities.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            uri: format!("{SCHEME_PREFIX}{}", self.0),
            path_start: SCHEME_PREFIX.len() + self.0.len(),
        }
    }
}

impl Default for TrustDomain {
    fn default() -> Self {
        Self(DEFAULT_TRUST_DOMAIN.to_owned())
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A valid SPIFFE ID such as `spiffe://cluster.local/ns/default/sa/web`.
///
/// Equality is byte equality of the canonical form; since only canonical
/// forms can be constructed, two IDs naming the same identity are equal.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    uri: String,
    /// Byte offset where the path begins (== `uri.len()` when it is empty).
    path_start: usize,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID URI.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        let rest = s.strip_prefix(SCHEME_PREFIX).ok_or(SpiffeIdError::WrongScheme)?;
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        TrustDomain::new(td)?;
        validate_path(path)?;
        Ok(Self {
            uri: s.to_owned(),
            path_start: SCHEME_PREFIX.len() + td.len(),
        })
    }

    /// Builds an ID from a trust domain and a path (`""` or `/a/b`).
    pub fn from_parts(td: &TrustDomain, path: &str) -> Result<Self, SpiffeIdError> {
        validate_path(path)?;
        let uri = format!("{SCHEME_PREFIX}{}{path}", td.as_str());
        if uri.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        Ok(Self {
            path_start: uri.len() - path.len(),
            uri,
        })
    }

    /// The workload ID `spiffe://<td>/ns/<namespace>/sa/<service_account>`.
    ///
    /// Kubernetes namespace and ServiceAccount names are DNS labels and
    /// subdomains, which are always valid path segments; anything else is
    /// refused rather than escaped.
    pub fn workload(td: &TrustDomain, namespace: &str, service_account: &str) -> Result<Self, SpiffeIdError> {
        for seg in [namespace, service_account] {
            if seg.is_empty() {
                return Err(SpiffeIdError::EmptySegment);
            }
            if seg.contains('/') {
                return Err(SpiffeIdError::BadPathChar('/'));
            }
        }
        Self::from_parts(td, &format!("/ns/{namespace}/sa/{service_account}"))
    }

    /// The trust domain name, without scheme.
    pub fn trust_domain_name(&self) -> &str {
        &self.uri[SCHEME_PREFIX.len()..self.path_start]
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_owned())
    }

    /// The path, `""` or starting with `/`.
    pub fn path(&self) -> &str {
        &self.uri[self.path_start..]
    }

    /// `(namespace, service_account)` when the path is exactly
    /// `/ns/<namespace>/sa/<service_account>`, `None` otherwise.
    pub fn workload_parts(&self) -> Option<(&str, &str)> {
        let mut segs = self.path().strip_prefix('/')?.split('/');
        match (segs.next(), segs.next(), segs.next(), segs.next(), segs.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }

    /// The full URI.
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    let rest = path.strip_prefix('/').ok_or(SpiffeIdError::RelativePath)?;
    for seg in rest.split('/') {
        if seg.is_empty() {
            return Err(SpiffeIdError::EmptySegment);
        }
        if seg == "." || seg == ".." {
            return Err(SpiffeIdError::DotSegment);
        }
        if let Some(c) = seg.chars().find(|c| !is_path_char(*c)) {
            return Err(SpiffeIdError::BadPathChar(c));
        }
    }
    Ok(())
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<&str> for SpiffeId {
    type Error = SpiffeIdError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.uri)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.uri)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests;
