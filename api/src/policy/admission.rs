//! Patterns added to the policy schemas, so that the API server refuses at
//! `kubectl apply`, naming the field and value, string values the mesh
//! would never match: empty values, `*` anywhere but alone or at one end,
//! principals written as URIs (`spiffe://…`), namespaces that are not DNS
//! labels. Each would silently make a DENY rule deny less than it says.
//! The compiler ([`crate::authz::compile`]) refuses the same values, for
//! policies stored before these patterns existed.
//!
//! OpenAPI `pattern`s rather than CEL rules: the API server bounds a CEL
//! rule's estimated cost, which multiplies through the unbounded lists a
//! value sits in (rules, sources, values), so CEL would force limits on
//! list sizes that Istio's CRDs do not have. RE2 has no look-ahead, so
//! principals are refused any `:` (Istio's form,
//! `<trust-domain>/ns/<namespace>/sa/<account>`, has none; a URI has).

use schemars::Schema;
use serde_json::{Value, json};

/// A value, a value starting with `*` (suffix match), one ending with `*`
/// (prefix match), or `*` alone (presence).
const PATTERN: &str = r"^(\*|\*[^*]+|[^*]+\*?)$";
/// [`PATTERN`] without `:`.
const PRINCIPAL: &str = r"^(\*|\*[^*:]+|[^*:]+\*?)$";
/// [`PATTERN`] over a DNS label's characters.
const NAMESPACE: &str = r"^(\*|\*[a-z0-9-]+|[a-z0-9-]+\*?)$";

/// Sets `pattern` on the items of each list property `names` of `schema`.
fn patterns(schema: &mut Schema, names: &[&str], pattern: &str) {
    let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
        return;
    };
    for name in names {
        if let Some(items) = properties
            .get_mut(*name)
            .and_then(|f| f.get_mut("items"))
            .and_then(Value::as_object_mut)
        {
            items.insert("pattern".into(), json!(pattern));
        }
    }
}

/// `Source`: principals and namespaces.
pub(super) fn source(schema: &mut Schema) {
    patterns(schema, &["principals", "notPrincipals"], PRINCIPAL);
    patterns(schema, &["namespaces", "notNamespaces"], NAMESPACE);
}

/// `Operation`: hosts, methods and paths.
pub(super) fn operation(schema: &mut Schema) {
    patterns(
        schema,
        &["hosts", "notHosts", "methods", "notMethods", "paths", "notPaths"],
        PATTERN,
    );
}

/// `Condition`: its values (which of them are principals or namespaces
/// depends on the key; the compiler checks those).
pub(super) fn condition(schema: &mut Schema) {
    patterns(schema, &["values", "notValues"], PATTERN);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The patterns as the API server's RE2 reads them, checked with the
    /// same cases as the compiler's refusals.
    #[test]
    fn patterns_accept_istio_wildcards_only() {
        let re = |p: &str| regex::Regex::new(p).expect("pattern");
        let (plain, principal, namespace) = (re(PATTERN), re(PRINCIPAL), re(NAMESPACE));
        for ok in ["*", "/api/*", "*.css", "GET", "a"] {
            assert!(plain.is_match(ok), "{ok}");
        }
        for bad in ["", "**", "*admin*", "/api/*/x", "a**"] {
            assert!(!plain.is_match(bad), "{bad}");
        }
        for ok in ["*", "cluster.local/ns/a/sa/b", "cluster.local/ns/a/*", "*/sa/b"] {
            assert!(principal.is_match(ok), "{ok}");
        }
        for bad in ["spiffe://cluster.local/ns/a/sa/b", "", "cluster.local/ns/*/sa/b"] {
            assert!(!principal.is_match(bad), "{bad}");
        }
        for ok in ["*", "team-a", "team-*", "*-prod"] {
            assert!(namespace.is_match(ok), "{ok}");
        }
        for bad in ["Team_A", "", "a/b", "*team*"] {
            assert!(!namespace.is_match(bad), "{bad}");
        }
    }
}
