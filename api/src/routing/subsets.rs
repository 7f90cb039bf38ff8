//! A `DestinationRule`'s subsets: which of a Service's endpoints a route's
//! `subset` means.

use std::collections::BTreeMap;

use super::RouteTable;
use super::compile::{RouteError, service_of};
use super::spec::DestinationRuleSpec;
use super::traffic_policy::{PolicyLevels, TrafficPolicy, compile_policy};

/// A Service's subsets, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subsets {
    /// `<namespace>/<name>` of the Service.
    pub service: String,
    /// Subset name to the labels its pods carry.
    pub by_name: BTreeMap<String, BTreeMap<String, String>>,
    /// The rule's traffic policy.
    pub policy: PolicyLevels,
    /// The subsets' own, for those that have one.
    pub subset_policies: BTreeMap<String, PolicyLevels>,
}

impl Subsets {
    /// The traffic policy of `subset` (the whole Service for `None`) on
    /// Service port `port`.
    pub fn policy_for(&self, subset: Option<&str>, port: u16) -> TrafficPolicy {
        match subset.and_then(|s| self.subset_policies.get(s)) {
            Some(own) => own.under(&self.policy, port),
            None => self.policy.at_port(port).clone(),
        }
    }

    /// The subsets a pod with `labels` is in.
    pub fn containing<'s>(&'s self, labels: &'s BTreeMap<String, String>) -> impl Iterator<Item = &'s str> + 's {
        self.by_name
            .iter()
            .filter(|(_, want)| want.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .map(|(name, _)| name.as_str())
    }

    /// Whether a pod with `labels` is in `subset` (`None` when the subset
    /// is not defined: such a route has no endpoints, Istio's 503 `NR`).
    pub fn selects(&self, subset: &str, labels: &BTreeMap<String, String>) -> Option<bool> {
        let want = self.by_name.get(subset)?;
        Some(want.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }
}

/// Compiles `spec`, a DestinationRule of `namespace`.
pub fn compile_subsets(spec: &DestinationRuleSpec, namespace: &str) -> Result<Subsets, RouteError> {
    let service = service_of("host", &spec.host, namespace)?;
    let policy = spec
        .traffic_policy
        .as_ref()
        .map(|p| compile_policy("trafficPolicy", p))
        .transpose()?
        .unwrap_or_default();
    let mut subset_policies = BTreeMap::new();
    let mut by_name = BTreeMap::new();
    for (i, s) in spec.subsets.iter().enumerate() {
        if !crate::mesh::is_namespace_name(&s.name) {
            return Err(RouteError::SubsetName {
                field: format!("subsets[{i}].name"),
                name: s.name.clone(),
            });
        }
        if by_name.insert(s.name.clone(), s.labels.clone()).is_some() {
            return Err(RouteError::DuplicateSubset {
                field: format!("subsets[{i}].name"),
                name: s.name.clone(),
            });
        }
        if let Some(p) = &s.traffic_policy {
            let own = compile_policy(&format!("subsets[{i}].trafficPolicy"), p)?;
            subset_policies.insert(s.name.clone(), own);
        }
    }
    Ok(Subsets {
        service,
        by_name,
        policy,
        subset_policies,
    })
}

/// The subsets `table` routes to that `subsets` (the DestinationRules of
/// the routes' Services) do not define, as `(<service>, <subset>)`: what a
/// VirtualService's status reports, since those requests get 503.
pub fn undefined_subsets<'t>(table: &'t RouteTable, subsets: &[Subsets]) -> Vec<(&'t str, &'t str)> {
    let mut missing = Vec::new();
    let http = table.routes.iter().flat_map(|r| &r.destinations);
    let tcp = table.tcp.iter().flat_map(|r| &r.destinations);
    for d in http.chain(tcp) {
        let Some(name) = d.subset.as_deref() else { continue };
        let defined = subsets
            .iter()
            .any(|s| s.service == d.service && s.by_name.contains_key(name));
        if !defined && !missing.contains(&(d.service.as_str(), name)) {
            missing.push((d.service.as_str(), name));
        }
    }
    missing
}
