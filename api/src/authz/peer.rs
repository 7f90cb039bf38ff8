//! `PeerAuthentication` resolved for one workload, Istio's way: a policy
//! whose selector matches the workload (in its namespace) overrides the
//! namespace's policy (no selector), which overrides the mesh's (no
//! selector, in the root namespace); `UNSET` inherits from the next scope
//! out, and the default at the top is PERMISSIVE. `portLevelMtls` is read
//! from the workload's own policy only (the CRD refuses it without a
//! selector). When several policies share a scope, the oldest wins (then
//! the first by name), as in Istio.

use std::collections::BTreeMap;

use crate::policy::{MtlsMode, PeerAuthentication, PeerAuthenticationSpec};

/// Why a `PeerAuthentication` cannot be enforced as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// A `portLevelMtls` key that is not a port number; that entry is
    /// ignored, so the port keeps the workload's mode.
    #[error("portLevelMtls: {0:?} is not a port number (1-65535)")]
    Port(String),
}

impl PeerError {
    /// The metric label / status reason.
    pub fn reason(&self) -> &'static str {
        match self {
            PeerError::Port(_) => "bad_port",
        }
    }
}

/// The port a `portLevelMtls` key names.
fn port_of(key: &str) -> Option<u16> {
    key.parse::<u16>().ok().filter(|p| *p != 0)
}

/// Whether `spec` is enforced exactly as written.
pub fn check(spec: &PeerAuthenticationSpec) -> Result<(), PeerError> {
    match spec.port_level_mtls.keys().find(|k| port_of(k).is_none()) {
        Some(bad) => Err(PeerError::Port(bad.clone())),
        None => Ok(()),
    }
}

/// A mode after inheritance: never UNSET.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Permissive,
    Strict,
    /// Plaintext accepted (mesh clients still use mTLS, which is accepted
    /// too).
    Disable,
}

impl Mode {
    /// `None` for UNSET.
    fn of(m: MtlsMode) -> Option<Self> {
        match m {
            MtlsMode::Unset => None,
            MtlsMode::Permissive => Some(Mode::Permissive),
            MtlsMode::Strict => Some(Mode::Strict),
            MtlsMode::Disable => Some(Mode::Disable),
        }
    }

    /// Whether plaintext connections are accepted.
    pub fn accepts_plaintext(self) -> bool {
        self != Mode::Strict
    }
}

/// The effective peer authentication of one workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effective {
    /// For every port without its own mode.
    pub mode: Mode,
    /// By the workload's port number.
    pub ports: BTreeMap<u16, Mode>,
}

impl Effective {
    /// The mode on `port`.
    pub fn on(&self, port: u16) -> Mode {
        self.ports.get(&port).copied().unwrap_or(self.mode)
    }
}

impl Default for Effective {
    fn default() -> Self {
        Self {
            mode: Mode::Permissive,
            ports: BTreeMap::new(),
        }
    }
}

/// The oldest of `candidates` (then the first by name).
fn oldest<'a>(candidates: impl Iterator<Item = &'a PeerAuthentication>) -> Option<&'a PeerAuthentication> {
    candidates.min_by(|a, b| {
        let key = |p: &'a PeerAuthentication| (p.metadata.creation_timestamp.clone(), p.metadata.name.clone());
        key(a).cmp(&key(b))
    })
}

/// Resolves `policies` (any namespace; those that do not apply are
/// skipped) for a workload in `namespace` labelled `labels`.
pub fn effective<'a>(
    policies: impl IntoIterator<Item = &'a PeerAuthentication>,
    root_namespace: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Effective {
    let all: Vec<&PeerAuthentication> = policies.into_iter().collect();
    let in_ns = |ns: &str| {
        all.iter()
            .copied()
            .filter(|p| p.metadata.namespace.as_deref() == Some(ns))
            .collect::<Vec<_>>()
    };
    let mesh = oldest(in_ns(root_namespace).into_iter().filter(|p| p.spec.selector.is_none()));
    let ns_wide = oldest(in_ns(namespace).into_iter().filter(|p| p.spec.selector.is_none()));
    let workload = oldest(in_ns(namespace).into_iter().filter(|p| {
        p.spec
            .selector
            .as_ref()
            .is_some_and(|s| s.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }));
    let mode_of = |p: Option<&PeerAuthentication>| p.and_then(|p| Mode::of(p.spec.mtls.as_ref()?.mode));
    let mode = mode_of(workload)
        .or(mode_of(ns_wide))
        .or(mode_of(mesh))
        .unwrap_or(Mode::Permissive);
    let ports = workload
        .map(|w| {
            w.spec
                .port_level_mtls
                .iter()
                .filter_map(|(port, m)| Some((port_of(port)?, Mode::of(m.mode).unwrap_or(mode))))
                .collect()
        })
        .unwrap_or_default();
    Effective { mode, ports }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{MutualTls, PeerAuthenticationSpec, WorkloadSelector};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn pa(ns: &str, name: &str, age: i64, selector: Option<(&str, &str)>, mode: MtlsMode) -> PeerAuthentication {
        let mut p = PeerAuthentication::new(
            name,
            PeerAuthenticationSpec {
                selector: selector.map(|(k, v)| WorkloadSelector {
                    match_labels: [(k.to_owned(), v.to_owned())].into(),
                }),
                mtls: Some(MutualTls { mode }),
                port_level_mtls: BTreeMap::new(),
            },
        );
        p.metadata.namespace = Some(ns.into());
        let born = k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 - age).expect("time");
        p.metadata.creation_timestamp = Some(Time(born));
        p
    }

    fn web() -> BTreeMap<String, String> {
        [("app".to_owned(), "web".to_owned())].into()
    }

    fn resolve(policies: &[PeerAuthentication]) -> Effective {
        effective(policies, "mizzen-system", "demo", &web())
    }

    #[test]
    fn scopes_override_outwards_and_unset_inherits() {
        use MtlsMode::*;
        let mesh = pa("mizzen-system", "mesh", 9, None, Strict);
        let ns = pa("demo", "ns", 9, None, Permissive);
        let wl = pa("demo", "wl", 9, Some(("app", "web")), Disable);
        let other_wl = pa("demo", "other", 9, Some(("app", "db")), Strict);
        let other_ns = pa("prod", "ns", 9, None, Strict);
        let unset_wl = pa("demo", "unset", 9, Some(("app", "web")), Unset);
        let cases: &[(&str, Vec<PeerAuthentication>, Mode)] = &[
            ("nothing: PERMISSIVE", vec![], Mode::Permissive),
            ("mesh-wide", vec![mesh.clone()], Mode::Strict),
            ("namespace over mesh", vec![mesh.clone(), ns.clone()], Mode::Permissive),
            (
                "workload over namespace",
                vec![mesh.clone(), ns.clone(), wl.clone()],
                Mode::Disable,
            ),
            ("a selector for other pods", vec![mesh.clone(), other_wl], Mode::Strict),
            ("another namespace", vec![other_ns], Mode::Permissive),
            ("UNSET inherits", vec![mesh.clone(), unset_wl], Mode::Strict),
        ];
        for (what, policies, want) in cases {
            assert_eq!(resolve(policies).mode, *want, "{what}");
        }
    }

    #[test]
    fn the_oldest_policy_of_a_scope_wins() {
        let old = pa("demo", "zz-old", 100, None, MtlsMode::Strict);
        let new = pa("demo", "aa-new", 1, None, MtlsMode::Permissive);
        assert_eq!(resolve(&[new.clone(), old.clone()]).mode, Mode::Strict);
        assert_eq!(resolve(&[old, new]).mode, Mode::Strict);
    }

    #[test]
    fn port_level_modes_come_from_the_workload_policy() {
        let mut wl = pa("demo", "wl", 9, Some(("app", "web")), MtlsMode::Permissive);
        wl.spec.port_level_mtls = [
            ("8080".to_owned(), MutualTls { mode: MtlsMode::Strict }),
            ("9090".to_owned(), MutualTls { mode: MtlsMode::Unset }),
            ("http".to_owned(), MutualTls { mode: MtlsMode::Strict }),
        ]
        .into();
        let e = resolve(&[wl]);
        assert_eq!(e.on(8080), Mode::Strict);
        assert_eq!(
            e.on(9090),
            Mode::Permissive,
            "UNSET on a port inherits the workload's mode"
        );
        assert_eq!(e.on(7000), Mode::Permissive);
        assert_eq!(e.ports.len(), 2, "a port that is not a number is skipped");
    }

    #[test]
    fn check_names_a_port_key_that_is_not_a_port() {
        let mut spec = PeerAuthenticationSpec::default();
        for ok in ["1", "8080", "65535"] {
            spec.port_level_mtls = [(ok.to_owned(), MutualTls { mode: MtlsMode::Strict })].into();
            assert_eq!(check(&spec), Ok(()), "{ok}");
        }
        for bad in ["0", "65536", "http", "-1", " 80", ""] {
            spec.port_level_mtls = [(bad.to_owned(), MutualTls { mode: MtlsMode::Strict })].into();
            assert_eq!(check(&spec), Err(PeerError::Port(bad.to_owned())), "{bad:?}");
        }
    }
}
