//! What discovery knows of the cluster, kept up to date event by event so
//! that a change costs what it touches, not the size of the cluster:
//!
//! - a Service event marks that Service;
//! - an EndpointSlice event marks the Service it belongs to (and the one
//!   it belonged to, if its label changed);
//! - a Pod event marks the Services whose endpoints list one of its
//!   addresses, and only if what discovery reads of it changed (its
//!   addresses, ServiceAccount, whether it is meshed): most Pod updates
//!   (status conditions, restarts) mark nothing.
//!
//! - a VirtualService or DestinationRule event marks the Services it names
//!   and named before ([`Rules`]).
//!
//! [`Index::rebuild`] then builds the marked Services only
//! ([`super::build_one`]). A relist after a broken watch ends with the
//! deletion of what it did not list again, as a reflector's store does.
//! Of each object only what discovery reads is kept: a Service's ports
//! and addresses, a slice's ports and ready addresses, a pod's addresses
//! and [`PodFacts`].

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::Event;
use mizzen_api::TrustDomain;
use mizzen_api::proto::discovery as pb;

use mizzen_api::routing::gateway::HTTPRoute;
use mizzen_api::routing::gateway::grpc::GRPCRoute;
use mizzen_api::routing::spec::{DestinationRule, VirtualService};

use super::rules::Rules;
use super::{IpOwner, PodFacts, ServiceRules, SliceShape, build_one, held_ips, key_of, service_of, shape_of};

/// What discovery reads of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodEntry {
    /// The addresses it holds (none when host-network or finished).
    ips: Vec<String>,
    facts: PodFacts,
}

impl PodEntry {
    fn of(pod: &Pod) -> Self {
        Self {
            ips: held_ips(pod),
            facts: PodFacts::of(pod),
        }
    }
}

/// Which keys a relist has listed so far, per kind.
#[derive(Debug, Default)]
struct Relists {
    services: Option<HashSet<String>>,
    slices: Option<HashSet<String>>,
    pods: Option<HashSet<String>>,
    virtual_services: Option<HashSet<String>>,
    destination_rules: Option<HashSet<String>>,
    http_routes: Option<HashSet<String>>,
    grpc_routes: Option<HashSet<String>>,
}

/// Whether each watch has listed once.
#[derive(Debug, Default, Clone, Copy)]
pub struct Synced {
    pub services: bool,
    pub slices: bool,
    pub pods: bool,
    pub virtual_services: bool,
    pub destination_rules: bool,
    /// Also set when the Gateway API's CRDs are not installed.
    pub http_routes: bool,
    /// Likewise.
    pub grpc_routes: bool,
}

impl Synced {
    pub fn all(self) -> bool {
        self.services
            && self.slices
            && self.pods
            && self.virtual_services
            && self.destination_rules
            && self.http_routes
            && self.grpc_routes
    }
}

/// The objects discovery is built from, and what must be rebuilt.
#[derive(Debug, Default)]
pub struct Index {
    /// Each Service as discovery reads it ([`shape_of`]).
    services: HashMap<String, pb::Service>,
    /// Slice key → the Service it belongs to, and what discovery reads of
    /// the slice.
    slices: HashMap<String, (String, SliceShape)>,
    slices_of: HashMap<String, BTreeSet<String>>,
    pods: HashMap<String, PodEntry>,
    pods_at_ip: HashMap<IpAddr, Vec<String>>,
    /// The Services whose built endpoints list an address, and the
    /// addresses each one's endpoints list.
    services_at_ip: HashMap<IpAddr, Vec<Arc<str>>>,
    /// Keyed by the one shared copy of each Service's key.
    ips_of_service: HashMap<Arc<str>, Vec<IpAddr>>,
    endpoints: usize,
    endpoints_of_service: HashMap<String, usize>,
    rules: Rules,
    dirty: HashSet<String>,
    relists: Relists,
    pub synced: Synced,
}

/// Turns one watch event into puts and deletes, handling relists: `Init`
/// starts one, `InitApply` lists an object, `InitDone` deletes what was
/// not listed again.
fn relist<K: kube::Resource>(
    listing: &mut Option<HashSet<String>>,
    known: impl FnOnce() -> Vec<String>,
    event: Event<K>,
    mut put: impl FnMut(K),
    mut delete: impl FnMut(String),
) -> bool {
    match event {
        Event::Apply(o) => put(o),
        Event::Delete(o) => {
            if let Some(key) = key_of(&o) {
                delete(key);
            }
        }
        Event::Init => *listing = Some(HashSet::new()),
        Event::InitApply(o) => {
            if let (Some(seen), Some(key)) = (listing.as_mut(), key_of(&o)) {
                seen.insert(key);
            }
            put(o);
        }
        Event::InitDone => {
            let seen = listing.take().unwrap_or_default();
            let gone: Vec<String> = known().into_iter().filter(|k| !seen.contains(k)).collect();
            gone.into_iter().for_each(delete);
            return true;
        }
    }
    false
}

impl Index {
    /// Applies a Service event.
    pub fn service_event(&mut self, event: Event<Service>) {
        let mut puts = Vec::new();
        let mut deletes = Vec::new();
        let done = relist(
            &mut self.relists.services,
            || self.services.keys().cloned().collect(),
            event,
            |o| puts.push(o),
            |k| deletes.push(k),
        );
        for svc in puts {
            if let Some(key) = key_of(&svc) {
                self.services.insert(key.clone(), shape_of(&svc));
                self.dirty.insert(key);
            }
        }
        for key in deletes {
            self.services.remove(&key);
            self.dirty.insert(key);
        }
        self.synced.services |= done;
    }

    /// Applies an EndpointSlice event.
    pub fn slice_event(&mut self, event: Event<EndpointSlice>) {
        let mut puts = Vec::new();
        let mut deletes = Vec::new();
        let done = relist(
            &mut self.relists.slices,
            || self.slices.keys().cloned().collect(),
            event,
            |o| puts.push(o),
            |k| deletes.push(k),
        );
        for slice in puts {
            let Some(key) = key_of(&slice) else { continue };
            self.delete_slice(&key);
            if let Some(owner) = service_of(&slice) {
                self.slices_of.entry(owner.clone()).or_default().insert(key.clone());
                self.dirty.insert(owner.clone());
                self.slices.insert(key, (owner, SliceShape::of(&slice)));
            }
        }
        for key in deletes {
            self.delete_slice(&key);
        }
        self.synced.slices |= done;
    }

    fn delete_slice(&mut self, key: &str) {
        if let Some((owner, _)) = self.slices.remove(key) {
            if let Some(set) = self.slices_of.get_mut(&owner) {
                set.remove(key);
                if set.is_empty() {
                    self.slices_of.remove(&owner);
                }
            }
            self.dirty.insert(owner);
        }
    }

    /// Applies a Pod event.
    pub fn pod_event(&mut self, event: Event<Pod>) {
        let mut puts = Vec::new();
        let mut deletes = Vec::new();
        let done = relist(
            &mut self.relists.pods,
            || self.pods.keys().cloned().collect(),
            event,
            |o| puts.push(o),
            |k| deletes.push(k),
        );
        for pod in puts {
            if let Some(key) = key_of(&pod) {
                self.set_pod(key, Some(PodEntry::of(&pod)));
            }
        }
        for key in deletes {
            self.set_pod(key, None);
        }
        self.synced.pods |= done;
    }

    /// Applies an event of a kind of traffic rule: `listing` is its
    /// relist, `keys` lists its rules, `set` stores or removes one and
    /// says which Services it touched (marked). Returns whether a relist
    /// ended.
    fn rule_event<K: kube::Resource>(
        &mut self,
        event: Event<K>,
        listing: fn(&mut Relists) -> &mut Option<HashSet<String>>,
        keys: fn(&Rules) -> Vec<String>,
        set: fn(&mut Rules, &str, Option<&K>) -> Vec<String>,
    ) -> bool {
        let mut puts = Vec::new();
        let mut deletes = Vec::new();
        let rules = &self.rules;
        let done = relist(
            listing(&mut self.relists),
            || keys(rules),
            event,
            |o| puts.push(o),
            |k| deletes.push(k),
        );
        for o in puts {
            if let Some(key) = key_of(&o) {
                let touched = set(&mut self.rules, &key, Some(&o));
                self.dirty.extend(touched);
            }
        }
        for key in deletes {
            let touched = set(&mut self.rules, &key, None);
            self.dirty.extend(touched);
        }
        done
    }

    /// Applies a VirtualService event.
    pub fn virtual_service_event(&mut self, event: Event<VirtualService>) {
        self.synced.virtual_services |= self.rule_event(
            event,
            |r| &mut r.virtual_services,
            Rules::virtual_service_keys,
            Rules::set_virtual_service,
        );
    }

    /// Applies a DestinationRule event.
    pub fn destination_rule_event(&mut self, event: Event<DestinationRule>) {
        self.synced.destination_rules |= self.rule_event(
            event,
            |r| &mut r.destination_rules,
            Rules::destination_rule_keys,
            Rules::set_destination_rule,
        );
    }

    /// Applies an HTTPRoute event.
    pub fn http_route_event(&mut self, event: Event<HTTPRoute>) {
        self.synced.http_routes |= self.rule_event(
            event,
            |r| &mut r.http_routes,
            Rules::http_route_keys,
            Rules::set_http_route,
        );
    }

    /// Applies a GRPCRoute event.
    pub fn grpc_route_event(&mut self, event: Event<GRPCRoute>) {
        self.synced.grpc_routes |= self.rule_event(
            event,
            |r| &mut r.grpc_routes,
            Rules::grpc_route_keys,
            Rules::set_grpc_route,
        );
    }

    fn set_pod(&mut self, key: String, entry: Option<PodEntry>) {
        let old = match &entry {
            Some(e) => self.pods.insert(key.clone(), e.clone()),
            None => self.pods.remove(&key),
        };
        if old == entry {
            return;
        }
        let parsed = |e: Option<PodEntry>| -> Vec<IpAddr> {
            e.map(|e| e.ips.iter().filter_map(|ip| ip.parse().ok()).collect())
                .unwrap_or_default()
        };
        let (old_ips, new_ips) = (parsed(old), parsed(entry));
        for ip in &old_ips {
            if let Some(holders) = self.pods_at_ip.get_mut(ip) {
                holders.retain(|k| k != &key);
                if holders.is_empty() {
                    self.pods_at_ip.remove(ip);
                }
            }
        }
        for ip in &new_ips {
            self.pods_at_ip.entry(*ip).or_default().push(key.clone());
        }
        for ip in old_ips.iter().chain(&new_ips) {
            if let Some(services) = self.services_at_ip.get(ip) {
                self.dirty.extend(services.iter().map(|s| s.to_string()));
            }
        }
    }

    /// Who holds `ip`, as the Pods say.
    pub fn owner(&self, ip: &str) -> IpOwner {
        let holders = ip.parse::<IpAddr>().ok().and_then(|ip| self.pods_at_ip.get(&ip));
        match holders.map(Vec::as_slice) {
            Some([one]) => self
                .pods
                .get(one)
                .map_or(IpOwner::Unknown, |p| IpOwner::Pod(p.facts.clone())),
            Some([_, _, ..]) => IpOwner::Conflict,
            _ => IpOwner::Unknown,
        }
    }

    /// How many Services wait to be rebuilt.
    pub fn dirty(&self) -> usize {
        self.dirty.len()
    }

    /// Endpoints of every Service, as last built.
    pub fn endpoints(&self) -> usize {
        self.endpoints
    }

    /// Builds the Services marked since the last call: each key with its
    /// resource, or `None` for a Service that no longer exists.
    pub fn rebuild(&mut self, trust_domain: &TrustDomain) -> Vec<(String, Option<pb::Service>)> {
        let dirty: Vec<String> = self.dirty.drain().collect();
        let mut out = Vec::with_capacity(dirty.len());
        for key in dirty {
            let built = self.services.get(&key).map(|svc| {
                let slices = self
                    .slices_of
                    .get(&key)
                    .into_iter()
                    .flatten()
                    .filter_map(|s| self.slices.get(s).map(|(_, slice)| slice));
                let routing = self.rules.routing(&key);
                let rules = ServiceRules {
                    routing: routing.as_ref(),
                    subsets: self.rules.subsets(&key),
                    destination_rule: self.rules.destination_rule(&key),
                };
                build_one(svc, slices, |ip| self.owner(ip), rules, trust_domain)
            });
            let ips: Vec<IpAddr> = built
                .iter()
                .flat_map(|b| b.endpoints.iter().flat_map(|e| e.addresses.iter()))
                .filter_map(|a| a.parse().ok())
                .collect();
            self.record_ips(&key, ips);
            let count = built.as_ref().map_or(0, |b| b.endpoints.len());
            let before = match count {
                0 => self.endpoints_of_service.remove(&key),
                n => self.endpoints_of_service.insert(key.clone(), n),
            };
            self.endpoints = self.endpoints + count - before.unwrap_or(0);
            out.push((key, built));
        }
        out
    }

    /// Remembers which addresses `key`'s endpoints list, for Pod events.
    fn record_ips(&mut self, key: &str, ips: Vec<IpAddr>) {
        let shared: Arc<str> = match self.ips_of_service.remove_entry(key) {
            Some((shared, old)) => {
                for ip in old {
                    if let Some(list) = self.services_at_ip.get_mut(&ip) {
                        list.retain(|s| **s != *key);
                        if list.is_empty() {
                            self.services_at_ip.remove(&ip);
                        }
                    }
                }
                shared
            }
            None => key.into(),
        };
        for ip in &ips {
            let list = self.services_at_ip.entry(*ip).or_default();
            if !list.contains(&shared) {
                list.push(shared.clone());
            }
        }
        if !ips.is_empty() {
            self.ips_of_service.insert(shared, ips);
        }
    }
}

#[cfg(test)]
mod tests;
