//! The traffic rules of each Service: the `VirtualService` that routes it
//! and the `DestinationRule` that names its subsets, kept event by event
//! like the rest of the [`Index`](super::Index).
//!
//! A rule is compiled when it arrives ([`mizzen_api::routing::compile`],
//! [`compile_subsets`]); one that does not compile applies to nothing (the
//! CA writes why into its status) and is never sent to a proxy. When
//! several rules of a kind name the same Service, the oldest applies
//! (creation time, then `<namespace>/<name>`), as Istio settles conflicts
//! between sidecar rules; the others apply to nothing until it goes.
//!
//! Gateway API `HTTPRoute`s and `GRPCRoute`s bound to a Service all apply
//! together, translated into one VirtualService spec
//! ([`mizzen_api::routing::gateway::translate`]); a Service with any such
//! route is routed by its routes, and a VirtualService naming it is not
//! used for it.

use std::collections::{BTreeSet, HashMap};

use mizzen_api::proto::discovery as pb;
use mizzen_api::routing::gateway::grpc::GRPCRoute;
use mizzen_api::routing::gateway::{self, Bound, GammaRoute, HTTPRoute, HTTPRouteSpec};
use mizzen_api::routing::spec::{DestinationRule, VirtualService};
use mizzen_api::routing::{Subsets, compile, compile_subsets};

use super::key_of;

/// Which rule of a kind applies first: creation time (RFC 3339, so that
/// strings order like times), then key.
type Rank = (String, String);

/// One kind of rule, by key, and which of them name each Service.
#[derive(Debug)]
struct Kind<T> {
    /// Rule key → its rank, the Services it names and what it compiled to
    /// (`None`: it did not compile).
    rules: HashMap<String, (Rank, Vec<String>, Option<T>)>,
    /// Service key → the ranks of the rules naming it.
    naming: HashMap<String, BTreeSet<Rank>>,
}

impl<T> Default for Kind<T> {
    fn default() -> Self {
        Self {
            rules: HashMap::new(),
            naming: HashMap::new(),
        }
    }
}

impl<T> Kind<T> {
    /// Stores (or with `None` removes) the rule `key`; returns the Services
    /// whose rule may have changed.
    fn set(&mut self, key: &str, entry: Option<(Rank, Vec<String>, Option<T>)>) -> Vec<String> {
        let mut touched = Vec::new();
        if let Some((rank, services, _)) = self.rules.remove(key) {
            for s in services {
                if let Some(ranks) = self.naming.get_mut(&s) {
                    ranks.remove(&rank);
                    if ranks.is_empty() {
                        self.naming.remove(&s);
                    }
                }
                touched.push(s);
            }
        }
        if let Some((rank, services, compiled)) = entry {
            for s in &services {
                self.naming.entry(s.clone()).or_default().insert(rank.clone());
                touched.push(s.clone());
            }
            self.rules.insert(key.to_owned(), (rank, services, compiled));
        }
        touched
    }

    /// The rule that applies to `service`.
    fn for_service(&self, service: &str) -> Option<&T> {
        let (_, key) = self.naming.get(service)?.first()?;
        self.rules.get(key)?.2.as_ref()
    }

    /// Every rule naming `service`, oldest first, with its rank.
    fn all_for_service<'s>(&'s self, service: &str) -> impl Iterator<Item = (&'s Rank, &'s T)> + 's {
        self.naming
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|rank| Some((rank, self.rules.get(&rank.1)?.2.as_ref()?)))
    }

    fn keys(&self) -> Vec<String> {
        self.rules.keys().cloned().collect()
    }
}

/// The rank of `o`, a rule.
fn rank(o: &impl kube::Resource) -> Option<Rank> {
    let created = o
        .meta()
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    Some((created, key_of(o)?))
}

/// A DestinationRule compiled, and as proxies get it.
#[derive(Debug)]
struct Destination {
    subsets: Subsets,
    wire: pb::DestinationPolicy,
}

/// An HTTPRoute (or a GRPCRoute as its HTTPRoute) as the agent keeps it:
/// its spec and the port each Service it is bound to is narrowed to.
#[derive(Debug)]
struct HttpRouteEntry {
    spec: HTTPRouteSpec,
    ports: Vec<(String, Option<u16>)>,
}

/// Every Service's traffic rules.
#[derive(Debug, Default)]
pub(super) struct Rules {
    routes: Kind<pb::Routing>,
    destinations: Kind<Destination>,
    http_routes: Kind<HttpRouteEntry>,
    grpc_routes: Kind<HttpRouteEntry>,
}

impl Rules {
    /// Stores a VirtualService (or removes the one keyed `key`); returns
    /// the Services whose routing may have changed.
    pub(super) fn set_virtual_service(&mut self, key: &str, vs: Option<&VirtualService>) -> Vec<String> {
        let entry = vs.and_then(|vs| {
            let namespace = vs.metadata.namespace.as_deref()?;
            let rank = rank(vs)?;
            Some(match compile(&vs.spec, namespace) {
                Ok(compiled) => {
                    let routing = serde_json::to_string(&vs.spec).ok().map(|spec_json| pb::Routing {
                        virtual_service: key.to_owned(),
                        spec_json,
                    });
                    (rank, compiled.services, routing)
                }
                Err(_) => (rank, Vec::new(), None),
            })
        });
        self.routes.set(key, entry)
    }

    /// Stores a DestinationRule (or removes the one keyed `key`); returns
    /// the Services whose subsets may have changed.
    pub(super) fn set_destination_rule(&mut self, key: &str, dr: Option<&DestinationRule>) -> Vec<String> {
        let entry = dr.and_then(|dr| {
            let namespace = dr.metadata.namespace.as_deref()?;
            let rank = rank(dr)?;
            let compiled = compile_subsets(&dr.spec, namespace).ok().and_then(|subsets| {
                let wire = pb::DestinationPolicy {
                    name: key.to_owned(),
                    spec_json: serde_json::to_string(&dr.spec).ok()?,
                };
                Some(Destination { subsets, wire })
            });
            Some(match compiled {
                Some(d) => (rank, vec![d.subsets.service.clone()], Some(d)),
                None => (rank, Vec::new(), None),
            })
        });
        self.destinations.set(key, entry)
    }

    /// Stores an HTTPRoute (or removes the one keyed `key`); returns the
    /// Services whose routing may have changed.
    pub(super) fn set_http_route(&mut self, key: &str, route: Option<&HTTPRoute>) -> Vec<String> {
        self.http_routes.set(key, route.and_then(gamma_entry))
    }

    /// Stores a GRPCRoute (or removes the one keyed `key`); returns the
    /// Services whose routing may have changed.
    pub(super) fn set_grpc_route(&mut self, key: &str, route: Option<&GRPCRoute>) -> Vec<String> {
        self.grpc_routes.set(key, route.and_then(gamma_entry))
    }

    /// The routing of `service`: its HTTPRoutes translated, else the
    /// VirtualService that routes it.
    pub(super) fn routing(&self, service: &str) -> Option<pb::Routing> {
        let mut bound: Vec<Bound<'_>> = self
            .http_routes
            .all_for_service(service)
            .chain(self.grpc_routes.all_for_service(service))
            .map(|((created, key), e)| Bound {
                key,
                created,
                spec: &e.spec,
                port: e.ports.iter().find(|(s, _)| s == service).and_then(|(_, p)| *p),
            })
            .collect();
        if bound.is_empty() {
            return self.routes.for_service(service).cloned();
        }
        // Oldest first, whatever the kind.
        bound.sort_by_key(|b| (b.created, b.key));
        let spec = gateway::translate(service, &bound);
        let namespace = service.split_once('/').map_or("", |(ns, _)| ns);
        let names: Vec<&str> = bound.iter().map(|b| b.key).collect();
        Some(pb::Routing {
            virtual_service: format!("{namespace}/routes({})", names.join(",")),
            spec_json: serde_json::to_string(&spec).ok()?,
        })
    }

    pub(super) fn http_route_keys(&self) -> Vec<String> {
        self.http_routes.keys()
    }

    pub(super) fn grpc_route_keys(&self) -> Vec<String> {
        self.grpc_routes.keys()
    }

    /// The subsets of `service`, if a DestinationRule names them.
    pub(super) fn subsets(&self, service: &str) -> Option<&Subsets> {
        self.destinations.for_service(service).map(|d| &d.subsets)
    }

    /// The DestinationRule of `service`, as proxies get it.
    pub(super) fn destination_rule(&self, service: &str) -> Option<&pb::DestinationPolicy> {
        self.destinations.for_service(service).map(|d| &d.wire)
    }

    pub(super) fn virtual_service_keys(&self) -> Vec<String> {
        self.routes.keys()
    }

    pub(super) fn destination_rule_keys(&self) -> Vec<String> {
        self.destinations.keys()
    }
}

/// A Gateway API route as the agent keeps it, with its rank and the
/// Services it is bound to; one that Mizzen cannot apply as written is
/// bound to nothing.
fn gamma_entry(r: &impl GammaRoute) -> Option<(Rank, Vec<String>, Option<HttpRouteEntry>)> {
    let namespace = r.meta().namespace.as_deref()?;
    let rank = rank(r)?;
    let http = r.as_http().ok().filter(|h| gateway::check(h, namespace).is_ok());
    Some(match http {
        Some(spec) => {
            let ports = gateway::parents(&spec, namespace);
            let services = ports.iter().map(|(s, _)| s.clone()).collect();
            let entry = HttpRouteEntry {
                spec: spec.into_owned(),
                ports,
            };
            (rank, services, Some(entry))
        }
        None => (rank, Vec::new(), None),
    })
}
