//! The bookkeeping every stream on the agent's socket shares, whatever it
//! carries: what a client subscribed to and holds, which nonce it answers,
//! and what to send it next.
//!
//! - [`StreamState`]: one resource type on an incremental (delta) stream,
//!   Envoy's protocol: the client names what it wants (or `*`), may list
//!   what it holds after a reconnect, and each response carries only what
//!   is new or changed for it, the names of what was removed, and a fresh
//!   nonce. Discovery's Services and the workload policy both use it.
//! - [`Acks`]: the nonce and version of a state-of-the-world stream (SDS):
//!   a request either answers the last response (ACK or NACK), answers an
//!   older one (stale: ignored) or asks anew.
//! - [`Snapshot`] and [`pack`]: resources as every stream shares them,
//!   each with a version naming its contents.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use envoy_types::pb::google::protobuf::Any;
use tonic::Status;

use crate::limits::{MAX_NAME_LEN, MAX_NAMES_PER_STREAM, MAX_VERSION_LEN};

/// All resources of one type, by name, as sent on streams.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Snapshot {
    pub resources: BTreeMap<String, Arc<Resource>>,
}

/// The version of encoded contents: the first 8 bytes of their SHA-256.
pub fn version_of(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Packs encoded resources of `type_url` as delta xDS resources whose
/// version names their contents.
pub fn pack(type_url: &str, encoded: impl IntoIterator<Item = (String, Vec<u8>)>) -> Snapshot {
    let resources = encoded
        .into_iter()
        .map(|(name, value)| {
            let resource = Resource {
                name: name.clone(),
                version: version_of(&value),
                resource: Some(Any {
                    type_url: type_url.into(),
                    value,
                }),
                ..Default::default()
            };
            (name, Arc::new(resource))
        })
        .collect();
    Snapshot { resources }
}

/// Replaces the published snapshot with `next` unless they are equal;
/// whether it did.
pub fn publish(tx: &tokio::sync::watch::Sender<Option<Arc<Snapshot>>>, next: Snapshot) -> bool {
    tx.send_if_modified(|cur| {
        if cur.as_deref() == Some(&next) {
            return false;
        }
        *cur = Some(Arc::new(next));
        true
    })
}

/// What one delta stream subscribed to of one type, and what it was sent.
#[derive(Debug)]
pub struct StreamState {
    type_url: &'static str,
    wildcard: bool,
    names: BTreeSet<String>,
    /// The client may not choose its names: they were fixed by the server.
    pinned: bool,
    /// Name → version the client holds (as far as the agent knows).
    sent: BTreeMap<String, String>,
    /// Whether the client's first request was seen.
    started: bool,
}

impl StreamState {
    /// A stream of `type_url` whose client chooses what it follows.
    pub fn new(type_url: &'static str) -> Self {
        Self {
            type_url,
            wildcard: false,
            names: BTreeSet::new(),
            pinned: false,
            sent: BTreeMap::new(),
            started: false,
        }
    }

    /// A stream of `type_url` that carries `names` and nothing else,
    /// whatever the client asks (what a proxy may know of its own pod).
    pub fn pinned(type_url: &'static str, names: impl IntoIterator<Item = String>) -> Self {
        Self {
            names: names.into_iter().collect(),
            pinned: true,
            ..Self::new(type_url)
        }
    }

    pub fn type_url(&self) -> &'static str {
        self.type_url
    }

    /// Whether the client has asked for this type yet.
    pub fn started(&self) -> bool {
        self.started
    }

    /// Applies a request's subscription changes (the first request of the
    /// type: an empty subscription means all). Refuses names and versions
    /// that cannot be ours, and more of them than [`MAX_NAMES_PER_STREAM`]:
    /// any local caller may ask.
    pub fn subscribe(&mut self, req: &DeltaDiscoveryRequest) -> Result<(), Status> {
        let too_long = |n: &String| n.len() > MAX_NAME_LEN;
        if let Some(n) = req
            .resource_names_subscribe
            .iter()
            .chain(&req.resource_names_unsubscribe)
            .chain(req.initial_resource_versions.keys())
            .find(|n| too_long(n))
        {
            return Err(Status::invalid_argument(format!(
                "resource name of {} bytes: names are <namespace>/<name>, at most {MAX_NAME_LEN}",
                n.len()
            )));
        }
        if req
            .initial_resource_versions
            .values()
            .any(|v| v.len() > MAX_VERSION_LEN)
        {
            return Err(Status::invalid_argument(format!(
                "a resource version is longer than {MAX_VERSION_LEN} bytes"
            )));
        }
        let first = !self.started;
        self.started = true;
        if first {
            if req.initial_resource_versions.len() > MAX_NAMES_PER_STREAM {
                return Err(too_many());
            }
            self.sent = req
                .initial_resource_versions
                .iter()
                .filter(|(k, _)| !self.pinned || self.names.contains(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if self.pinned {
                return Ok(());
            }
            self.wildcard = req.resource_names_subscribe.is_empty();
        }
        if self.pinned {
            return Ok(());
        }
        for n in &req.resource_names_subscribe {
            if n == "*" {
                self.wildcard = true;
            } else {
                self.names.insert(n.clone());
            }
        }
        for n in &req.resource_names_unsubscribe {
            if n == "*" {
                self.wildcard = false;
            } else {
                self.names.remove(n);
            }
        }
        if self.names.len() > MAX_NAMES_PER_STREAM {
            return Err(too_many());
        }
        Ok(())
    }

    /// The response that brings the client from what it holds to `snap`,
    /// or `None` when it is up to date (or has not asked yet). Records the
    /// new versions as sent.
    pub fn diff(&mut self, snap: &Snapshot, nonce: String) -> Option<DeltaDiscoveryResponse> {
        if !self.started {
            return None;
        }
        let wanted = |name: &str| self.wildcard || self.names.contains(name);
        let mut resources = Vec::new();
        for (name, r) in &snap.resources {
            if wanted(name) && self.sent.get(name) != Some(&r.version) {
                resources.push((**r).clone());
            }
        }
        let removed: Vec<String> = self
            .sent
            .keys()
            .filter(|n| !wanted(n) || !snap.resources.contains_key(*n))
            .cloned()
            .collect();
        if resources.is_empty() && removed.is_empty() {
            return None;
        }
        for n in &removed {
            self.sent.remove(n);
        }
        for r in &resources {
            self.sent.insert(r.name.clone(), r.version.clone());
        }
        Some(DeltaDiscoveryResponse {
            type_url: self.type_url.into(),
            resources,
            removed_resources: removed,
            nonce,
            ..Default::default()
        })
    }
}

fn too_many() -> Status {
    Status::invalid_argument(format!(
        "more than {MAX_NAMES_PER_STREAM} resource names on one stream: subscribe to everything (*) instead"
    ))
}

/// What a state-of-the-world request says about the last response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// No nonce: the client asks anew (first request, or new names).
    Fresh,
    /// It answers an older response than the last one: ignore it.
    Stale,
    /// It accepted the last response.
    Ack,
    /// It rejected the last response, with this message.
    Nack(String),
}

/// The nonce and version of a state-of-the-world stream.
#[derive(Debug, Default)]
pub struct Acks {
    nonces: u64,
    last_nonce: Option<String>,
    last_version: Option<String>,
}

impl Acks {
    /// Reads a request's `response_nonce` and `error_detail`. A fresh
    /// request, or one whose version differs from what was last sent, gets
    /// an answer even if nothing changed.
    pub fn answer(&mut self, nonce: &str, version: &str, error: Option<&str>) -> Answer {
        if nonce.is_empty() {
            self.last_version = None;
            return Answer::Fresh;
        }
        if self.last_nonce.as_deref() != Some(nonce) {
            return Answer::Stale;
        }
        match error {
            Some(e) => Answer::Nack(e.to_owned()),
            None => {
                if self.last_version.as_deref() != Some(version) {
                    self.last_version = None;
                }
                Answer::Ack
            }
        }
    }

    /// The nonce for a response of `version`, or `None` when the client
    /// already has it.
    pub fn send(&mut self, version: &str) -> Option<String> {
        if self.last_version.as_deref() == Some(version) {
            return None;
        }
        self.nonces += 1;
        let nonce = self.nonces.to_string();
        self.last_nonce = Some(nonce.clone());
        self.last_version = Some(version.to_owned());
        Some(nonce)
    }

    /// The version last sent.
    pub fn version(&self) -> Option<&str> {
        self.last_version.as_deref()
    }
}

#[cfg(test)]
mod tests;
