//! The bookkeeping every stream on the agent's socket shares, whatever it
//! carries: what a client subscribed to and holds, which nonce it answers,
//! and what to send it next.
//!
//! - [`StreamState`]: one resource type on an incremental (delta) stream,
//!   Envoy's protocol: the client names what it wants (names, whole
//!   namespaces as `<namespace>/*`, or everything as `*`), may list
//!   what it holds after a reconnect, and each response carries only what
//!   is new or changed for it, the names of what was removed, and a fresh
//!   nonce. Discovery's Services and the workload policy both use it.
//! - [`Acks`]: the nonce and version of a state-of-the-world stream (SDS):
//!   a request either answers the last response (ACK or NACK), answers an
//!   older one (stale: ignored) or asks anew.
//! - [`Snapshot`] and [`pack`]: resources as every stream shares them,
//!   each with a version naming its contents, and which of them changed
//!   since the snapshot before, so that a stream compares only those.
//! - [`Push`]: what one stream is owed, sent in responses of bounded size
//!   ([`Push::next_response`]); every response of a push but the last says
//!   [`MORE`] in `system_version_info`.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use envoy_types::pb::google::protobuf::Any;
use tonic::Status;

use crate::limits::{MAX_NAME_LEN, MAX_NAMES_PER_STREAM, MAX_VERSION_LEN};

pub use mizzen_api::proto::discovery::MORE;

/// All resources of one type, by name, as sent on streams.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Snapshot {
    /// A persistent map: the next snapshot shares all but what changed,
    /// so a change costs its own size, not the cluster's.
    pub resources: imbl::OrdMap<String, Arc<Resource>>,
    /// Counts the snapshots of one source.
    pub generation: u64,
    /// The names changed or removed since snapshot `generation - 1`;
    /// `None`: not known (a stream compares everything).
    pub changed: Option<Arc<BTreeSet<String>>>,
    /// Which resources each address belongs to, for `address/<ip>`
    /// subscriptions (empty for types that have none).
    pub addresses: crate::discovery::ByAddress,
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
        .map(|(name, value)| (name.clone(), resource(type_url, name, value)))
        .collect();
    Snapshot {
        resources,
        ..Default::default()
    }
}

/// One encoded resource of `type_url`, its version naming its contents.
pub fn resource(type_url: &str, name: String, value: Vec<u8>) -> Arc<Resource> {
    Arc::new(Resource {
        name,
        version: version_of(&value),
        resource: Some(Any {
            type_url: type_url.into(),
            value,
        }),
        ..Default::default()
    })
}

/// Replaces the published snapshot with `next` (whose `generation` and
/// `changed` are set here) unless its resources are the same; whether it
/// did.
pub fn publish(tx: &tokio::sync::watch::Sender<Option<Arc<Snapshot>>>, mut next: Snapshot) -> bool {
    tx.send_if_modified(|cur| {
        if cur.as_ref().is_some_and(|c| c.resources == next.resources) {
            return false;
        }
        next.generation = cur.as_ref().map_or(1, |c| c.generation + 1);
        next.changed = None;
        *cur = Some(Arc::new(next));
        true
    })
}

/// Publishes the snapshot before with `changes` applied (`None` removes
/// a resource), recording which names changed, unless nothing did;
/// whether it published. The map is persistent: the cost is that of the
/// changes, not of the map.
pub fn publish_changes(
    tx: &tokio::sync::watch::Sender<Option<Arc<Snapshot>>>,
    changes: impl IntoIterator<Item = (String, Option<Arc<Resource>>)>,
    addresses: crate::discovery::ByAddress,
) -> bool {
    tx.send_if_modified(|cur| {
        let before = cur.as_deref();
        let mut changed = BTreeSet::new();
        let mut updates = Vec::new();
        for (name, next) in changes {
            let now = before.and_then(|b| b.resources.get(&name));
            if now.map(|r| &r.version) != next.as_ref().map(|r| &r.version) {
                changed.insert(name.clone());
                updates.push((name, next));
            }
        }
        // The first snapshot is published even when empty: it tells
        // streams the cluster was listed.
        if changed.is_empty() && before.is_some() {
            return false;
        }
        let mut resources = before.map(|b| b.resources.clone()).unwrap_or_default();
        for (name, next) in updates {
            match next {
                Some(r) => resources.insert(name, r),
                None => resources.remove(&name),
            };
        }
        *cur = Some(Arc::new(Snapshot {
            resources,
            generation: before.map_or(1, |b| b.generation + 1),
            changed: before.map(|_| Arc::new(changed)),
            addresses,
        }));
        true
    })
}

/// What one stream is owed of one type: resources new or changed for it
/// and the names of those removed, sent in as many responses as
/// [`Push::next_response`] needs to keep each under its size.
#[derive(Debug, Default)]
pub struct Push {
    type_url: &'static str,
    /// In reverse order: the next one to send is last.
    resources: Vec<Arc<Resource>>,
    removed: Vec<String>,
    /// Whether a response was made: a push always gets at least one,
    /// even when empty (a first answer that nothing matches).
    answered: bool,
}

impl Push {
    /// How many resources and removals are left to send.
    pub fn len(&self) -> usize {
        self.resources.len() + self.removed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next response, of at most `max_bytes` encoded (a single
    /// resource larger than that goes alone), without a nonce; `None`
    /// when all was sent. Responses before the last say [`MORE`].
    pub fn next_response(&mut self, max_bytes: usize) -> Option<DeltaDiscoveryResponse> {
        use prost::Message;
        if self.is_empty() && self.answered {
            return None;
        }
        self.answered = true;
        // A name costs its bytes and a tag and length; a resource its
        // encoding and the same.
        let framed = |len: usize| len + 1 + prost::length_delimiter_len(len);
        let mut size = framed(self.type_url.len()) + 32;
        let mut removed = Vec::new();
        while let Some(name) = self.removed.last() {
            if !removed.is_empty() && size + framed(name.len()) > max_bytes {
                break;
            }
            size += framed(name.len());
            removed.extend(self.removed.pop());
        }
        let mut resources = Vec::new();
        while let Some(r) = self.resources.last() {
            let len = framed(r.encoded_len());
            if (!resources.is_empty() || !removed.is_empty()) && size + len > max_bytes {
                break;
            }
            size += len;
            resources.extend(self.resources.pop().map(|r| (*r).clone()));
        }
        Some(DeltaDiscoveryResponse {
            type_url: self.type_url.into(),
            system_version_info: if self.is_empty() { String::new() } else { MORE.into() },
            resources,
            removed_resources: removed,
            ..Default::default()
        })
    }
}

/// What one delta stream subscribed to of one type, and what it was sent.
#[derive(Debug)]
pub struct StreamState {
    type_url: &'static str,
    wildcard: bool,
    names: BTreeSet<String>,
    /// Namespaces subscribed to whole, as `<namespace>/*`.
    namespaces: BTreeSet<String>,
    /// Addresses subscribed to as `address/<ip>`: the resources they
    /// belong to are followed.
    addresses: BTreeSet<IpAddr>,
    /// Addresses subscribed to and not answered yet: one no resource has
    /// is answered by its subscription name among the removed ones.
    unanswered: BTreeSet<IpAddr>,
    /// The client may not choose its names: they were fixed by the server.
    pinned: bool,
    /// What the client holds (as far as the agent knows), by name; only
    /// the versions are read. A stream that follows everything holds the
    /// snapshot's own map, sharing its structure: it costs the stream
    /// next to nothing.
    sent: imbl::OrdMap<String, Arc<Resource>>,
    /// Whether the client's first request was seen.
    started: bool,
    /// Whether the client has a first state: the first response is sent
    /// even when empty, so that a client following nothing that exists
    /// yet learns that (and a proxy becomes ready).
    responded: bool,
    /// The generation of the snapshot last compared, while the
    /// subscription has not changed since.
    seen: Option<u64>,
}

impl StreamState {
    /// A stream of `type_url` whose client chooses what it follows.
    pub fn new(type_url: &'static str) -> Self {
        Self {
            type_url,
            wildcard: false,
            names: BTreeSet::new(),
            namespaces: BTreeSet::new(),
            addresses: BTreeSet::new(),
            unanswered: BTreeSet::new(),
            pinned: false,
            sent: imbl::OrdMap::new(),
            started: false,
            responded: false,
            seen: None,
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
        if first || !req.resource_names_subscribe.is_empty() || !req.resource_names_unsubscribe.is_empty() {
            // What the client wants changed: compare everything next time.
            self.seen = None;
        }
        if first {
            if req.initial_resource_versions.len() > MAX_NAMES_PER_STREAM {
                return Err(too_many());
            }
            // A client that holds something already has a first state.
            self.responded = !req.initial_resource_versions.is_empty();
            self.sent = req
                .initial_resource_versions
                .iter()
                .filter(|(k, _)| !self.pinned || self.names.contains(*k))
                .map(|(k, v)| {
                    let held = Resource {
                        name: k.clone(),
                        version: v.clone(),
                        ..Default::default()
                    };
                    (k.clone(), Arc::new(held))
                })
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
            match Subscription::of(n)? {
                Subscription::All => self.wildcard = true,
                Subscription::Namespace(ns) => {
                    self.namespaces.insert(ns.to_owned());
                }
                Subscription::Address(ip) => {
                    self.addresses.insert(ip);
                    self.unanswered.insert(ip);
                }
                Subscription::Name(name) => {
                    self.names.insert(name.to_owned());
                }
            }
        }
        for n in &req.resource_names_unsubscribe {
            match Subscription::of(n)? {
                Subscription::All => self.wildcard = false,
                Subscription::Namespace(ns) => {
                    self.namespaces.remove(ns);
                }
                Subscription::Address(ip) => {
                    self.addresses.remove(&ip);
                    self.unanswered.remove(&ip);
                }
                Subscription::Name(name) => {
                    self.names.remove(name);
                }
            }
        }
        if self.names.len() + self.namespaces.len() + self.addresses.len() > MAX_NAMES_PER_STREAM {
            return Err(too_many());
        }
        Ok(())
    }

    /// Whether the client follows resource `name`; `via_addresses` are
    /// the names its address subscriptions stand for in this snapshot.
    fn wants(&self, name: &str, via_addresses: &BTreeSet<String>) -> bool {
        self.wildcard
            || self.names.contains(name)
            || name.split_once('/').is_some_and(|(ns, _)| self.namespaces.contains(ns))
            || via_addresses.contains(name)
    }

    /// What brings the client from what it holds to `snap`, or `None`
    /// when it is up to date (or has not asked yet). Records the new
    /// versions as sent. When the client saw the snapshot before this one
    /// and its subscription has not changed since, only the names that
    /// changed are compared.
    pub fn push(&mut self, snap: &Snapshot) -> Option<Push> {
        if !self.started {
            return None;
        }
        let incremental = match (&snap.changed, self.seen) {
            (Some(changed), Some(seen)) if seen + 1 == snap.generation => Some(changed.clone()),
            _ if self.seen == Some(snap.generation) => return None,
            _ => None,
        };
        self.seen = Some(snap.generation);
        let via_addresses: BTreeSet<String> = self
            .addresses
            .iter()
            .filter_map(|ip| snap.addresses.get(ip))
            .flat_map(|names| names.iter().cloned())
            .collect();
        // An address no resource has is answered by its own name.
        let mut removed: Vec<String> = std::mem::take(&mut self.unanswered)
            .into_iter()
            .filter(|ip| !snap.addresses.contains_key(ip))
            .map(|ip| format!("{ADDRESS_PREFIX}{ip}"))
            .collect();
        let wanted = |name: &str| self.wants(name, &via_addresses);
        let mut resources = Vec::new();
        let mut consider = |name: &String| match snap.resources.get(name) {
            Some(r) if wanted(name) => {
                if self.sent.get(name).map(|h| &h.version) != Some(&r.version) {
                    resources.push(r.clone());
                }
            }
            _ => {
                if self.sent.contains_key(name) {
                    removed.push(name.clone());
                }
            }
        };
        match incremental {
            Some(changed) => changed.iter().for_each(&mut consider),
            None => {
                snap.resources.keys().for_each(&mut consider);
                self.sent
                    .keys()
                    .filter(|n| !snap.resources.contains_key(*n))
                    .for_each(|n| removed.push(n.clone()));
            }
        }
        if resources.is_empty() && removed.is_empty() && self.responded {
            return None;
        }
        self.responded = true;
        if self.wildcard && !self.pinned {
            // It now holds exactly the snapshot.
            self.sent = snap.resources.clone();
        } else {
            for n in &removed {
                self.sent.remove(n);
            }
            for r in &resources {
                self.sent.insert(r.name.clone(), r.clone());
            }
        }
        resources.reverse();
        removed.reverse();
        Some(Push {
            type_url: self.type_url,
            resources,
            removed,
            answered: false,
        })
    }
}

pub use mizzen_api::proto::discovery::ADDRESS_PREFIX;

/// One name a client subscribes to or unsubscribes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subscription<'a> {
    /// `*`: every resource of the type.
    All,
    /// `<namespace>/*`: every resource of a namespace, present and future.
    Namespace(&'a str),
    /// `address/<ip>`: the resources an address belongs to (a Service's
    /// cluster IP or an endpoint), present and future.
    Address(IpAddr),
    /// `<namespace>/<name>`, or any other name, followed as it is.
    Name(&'a str),
}

impl<'a> Subscription<'a> {
    fn of(name: &'a str) -> Result<Self, Status> {
        if name == "*" {
            return Ok(Subscription::All);
        }
        if let Some(ip) = name.strip_prefix(ADDRESS_PREFIX) {
            return ip.parse().map(Subscription::Address).map_err(|_| {
                Status::invalid_argument(format!("{name:?}: an address subscription is {ADDRESS_PREFIX}<ip>"))
            });
        }
        match name.strip_suffix("/*") {
            Some(ns) if mizzen_api::mesh::is_namespace_name(ns) => Ok(Subscription::Namespace(ns)),
            Some(_) => Err(Status::invalid_argument(format!(
                "{name:?}: a namespace subscription is <namespace>/*, the namespace a DNS label"
            ))),
            None => Ok(Subscription::Name(name)),
        }
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
