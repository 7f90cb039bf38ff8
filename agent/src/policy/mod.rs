//! Workload policy: for every pod on this node, the authorization
//! policies that select it and its effective peer authentication, served
//! to its proxy as one `mizzen.discovery.v1.WorkloadPolicy` resource named
//! `<namespace>/<pod>` ([`POLICY_TYPE`]).
//!
//! The agent watches `AuthorizationPolicy` and `PeerAuthentication` in
//! every namespace and the Pods of its node, and after each burst of
//! changes rebuilds every local pod's resource ([`build`], pure). Each
//! policy is compiled once per rebuild; one that cannot be compiled (which
//! admission should have refused) is replaced by a spec that fails closed
//! ([`mizzen_api::authz::compile::fail_closed`]), counted and logged, so
//! that one bad policy neither opens a hole nor blocks the others.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::{reflector, watcher};
use mizzen_api::authz::compile::{CompileError, applies, compile, fail_closed, name_of};
use mizzen_api::authz::peer::{self, Mode};
use mizzen_api::policy::{AuthorizationPolicy, AuthorizationPolicySpec, PeerAuthentication};
use mizzen_api::proto::discovery::{self as pb, POLICY_TYPE};
use prost::Message;
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::xds::{Snapshot, pack};

/// A policy that could not be compiled, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// `<namespace>/<name>`.
    pub policy: String,
    pub error: CompileError,
}

/// One authorization policy as the workloads it selects receive it.
struct Prepared<'a> {
    policy: &'a AuthorizationPolicy,
    name: String,
    /// The spec as sent: the policy's own, or its fail-closed stand-in.
    spec_json: String,
}

fn prepare(policy: &AuthorizationPolicy) -> (Prepared<'_>, Option<Rejected>) {
    let name = name_of(policy);
    // A spec is plain data: serialising it cannot fail.
    let json = |spec: &AuthorizationPolicySpec| serde_json::to_string(spec).unwrap_or_default();
    let (spec_json, rejected) = match compile(policy) {
        Ok(_) => (json(&policy.spec), None),
        Err(error) => (
            json(&fail_closed(&policy.spec)),
            Some(Rejected {
                policy: name.clone(),
                error,
            }),
        ),
    };
    (
        Prepared {
            policy,
            name,
            spec_json,
        },
        rejected,
    )
}

fn mode(m: Mode) -> pb::MtlsMode {
    match m {
        Mode::Permissive => pb::MtlsMode::Permissive,
        Mode::Strict => pb::MtlsMode::Strict,
        Mode::Disable => pb::MtlsMode::Disable,
    }
}

/// Every pod's workload policy, by `<namespace>/<pod>`, and the policies
/// that had to be replaced because they cannot be compiled.
pub fn build(
    authz: &[Arc<AuthorizationPolicy>],
    peer_authn: &[Arc<PeerAuthentication>],
    pods: &[Arc<Pod>],
    root_namespace: &str,
) -> (BTreeMap<String, pb::WorkloadPolicy>, Vec<Rejected>) {
    let mut prepared = Vec::with_capacity(authz.len());
    let mut rejected = Vec::new();
    for p in authz {
        let (ready, refused) = prepare(p);
        prepared.push(ready);
        rejected.extend(refused);
    }
    prepared.sort_by(|a, b| a.name.cmp(&b.name));
    let no_labels = BTreeMap::new();
    let mut out = BTreeMap::new();
    for pod in pods {
        let (Some(ns), Some(name)) = (pod.metadata.namespace.as_deref(), pod.metadata.name.as_deref()) else {
            continue;
        };
        let labels = pod.metadata.labels.as_ref().unwrap_or(&no_labels);
        let authorization = prepared
            .iter()
            .filter(|p| {
                applies(
                    p.policy.metadata.namespace.as_deref().unwrap_or_default(),
                    p.policy.spec.selector.as_ref(),
                    root_namespace,
                    ns,
                    labels,
                )
            })
            .map(|p| pb::AuthorizationPolicy {
                name: p.name.clone(),
                spec_json: p.spec_json.clone(),
            })
            .collect();
        let mtls = peer::effective(peer_authn.iter().map(|p| &**p), root_namespace, ns, labels);
        out.insert(
            format!("{ns}/{name}"),
            pb::WorkloadPolicy {
                authorization,
                mtls: mode(mtls.mode).into(),
                port_mtls: mtls
                    .ports
                    .iter()
                    .map(|(port, m)| (u32::from(*port), mode(*m).into()))
                    .collect(),
            },
        );
    }
    (out, rejected)
}

/// Packs workload policies as delta xDS resources.
pub fn snapshot(policies: BTreeMap<String, pb::WorkloadPolicy>) -> Snapshot {
    pack(
        POLICY_TYPE,
        policies.into_iter().map(|(name, p)| (name, p.encode_to_vec())),
    )
}

/// Keeps of a pod only what selection reads: its name and labels.
fn trim_pod(p: &mut Pod) {
    p.metadata.managed_fields = None;
    p.metadata.annotations = None;
    p.metadata.owner_references = None;
    p.spec = None;
    p.status = None;
}

fn trim_meta<K: kube::Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
    o.meta_mut().annotations = None;
}

/// Where the workload policies come from.
#[derive(Debug, Clone)]
pub struct Scope {
    /// The namespace whose policies apply mesh-wide.
    pub root_namespace: String,
    /// Only the pods of this node (`None`: every pod).
    pub node_name: Option<String>,
    pub debounce: Duration,
}

/// Watches the policies and this node's Pods and publishes a new
/// [`Snapshot`] on `tx` after each burst of changes. Nothing is published
/// until every watch has listed once: a proxy fails closed until then,
/// rather than act on a partial set of policies.
pub async fn follow(
    client: kube::Client,
    scope: Scope,
    tx: watch::Sender<Option<Arc<Snapshot>>>,
    metrics: Arc<Metrics>,
) {
    let changed = Arc::new(Notify::new());
    let (authz, w1) = reflector::store::<AuthorizationPolicy>();
    let (peer_authn, w2) = reflector::store::<PeerAuthentication>();
    let (pods, w3) = reflector::store::<Pod>();
    let all = watcher::Config::default();
    let local = match &scope.node_name {
        Some(node) => watcher::Config::default().fields(&format!("spec.nodeName={node}")),
        None => watcher::Config::default(),
    };
    tokio::spawn(crate::watch::reflect(
        watcher(Api::all(client.clone()), all.clone()),
        w1,
        changed.clone(),
        "authorizationpolicies",
        trim_meta,
    ));
    tokio::spawn(crate::watch::reflect(
        watcher(Api::all(client.clone()), all),
        w2,
        changed.clone(),
        "peerauthentications",
        trim_meta,
    ));
    tokio::spawn(crate::watch::reflect(
        watcher(Api::all(client), local),
        w3,
        changed.clone(),
        "local pods",
        trim_pod,
    ));
    for (ready, what) in [
        (authz.wait_until_ready().await.is_ok(), "authorizationpolicies"),
        (peer_authn.wait_until_ready().await.is_ok(), "peerauthentications"),
        (pods.wait_until_ready().await.is_ok(), "local pods"),
    ] {
        if !ready {
            warn!(what, "policy store closed before it was ready");
            return;
        }
    }
    info!("policy watches synced");
    loop {
        let started = std::time::Instant::now();
        let (built, rejected) = build(
            &authz.state(),
            &peer_authn.state(),
            &pods.state(),
            &scope.root_namespace,
        );
        for r in &rejected {
            warn!(policy = %r.policy, reason = r.error.reason(), error = %r.error,
                "authorization policy cannot be enforced as written; it fails closed");
        }
        metrics.policies_rejected.set(rejected.len() as i64);
        metrics.policy_workloads.set(built.len() as i64);
        let next = snapshot(built);
        if crate::xds::publish(&tx, next) {
            debug!(took = ?started.elapsed(), "workload policies rebuilt");
        }
        changed.notified().await;
        tokio::time::sleep(scope.debounce).await;
    }
}

#[cfg(test)]
mod tests;
