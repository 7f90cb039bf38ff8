//! The injection decision and mutation, as pure functions.
//!
//! [`decide`] says whether a pod gets the mesh; [`mutate`] returns the pod
//! with the mesh added; [`inject`] combines them and returns a JSON patch
//! computed as the difference between the two, so the patch always applies
//! to the pod it was made for.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, ExecAction, HTTPGetAction, HostPathVolumeSource,
    Lifecycle, LifecycleHandler, ObjectFieldSelector, Pod, Probe, ProjectedVolumeSource, ResourceRequirements,
    SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};

use crate::config::InjectConfig;

/// Label on namespaces and pods that turns injection on or off.
pub const INJECT_LABEL: &str = "mizzen.dev/inject";
/// Annotation recording what was injected.
pub const STATUS_ANNOTATION: &str = "mizzen.dev/status";
/// Label marking a pod as meshed (its proxy speaks mTLS).
pub use mizzen_api::mesh::TLS_MODE_LABEL;
pub const INIT_NAME: &str = "mizzen-init";
pub use mizzen_api::mesh::PROXY_CONTAINER as PROXY_NAME;
pub const SOCKET_VOLUME: &str = "mizzen-agent-socket";
pub const TOKEN_VOLUME: &str = "mizzen-token";
/// Where the proxy finds the agent's socket and its token.
pub const SOCKET_MOUNT: &str = "/var/run/mizzen";
pub const TOKEN_MOUNT: &str = "/var/run/secrets/mizzen";
/// Env var carrying the app's original probes, by rewritten path.
pub const APP_PROBES_ENV: &str = "MIZZEN_APP_PROBES";
/// The env var carrying the pod's labels (JSON) to its proxy.
pub const POD_LABELS_ENV: &str = "MIZZEN_POD_LABELS";

/// Namespaces never injected.
pub const EXCLUDED_NAMESPACES: &[&str] = &["kube-system", "kube-public", "kube-node-lease", "mizzen-system"];

/// Customisation annotations, each validated.
pub const ANN_EXCLUDE_INBOUND_PORTS: &str = "mizzen.dev/exclude-inbound-ports";
pub const ANN_EXCLUDE_OUTBOUND_PORTS: &str = "mizzen.dev/exclude-outbound-ports";
pub const ANN_EXCLUDE_OUTBOUND_CIDRS: &str = "mizzen.dev/exclude-outbound-cidrs";
pub const ANN_PROXY_IMAGE: &str = "mizzen.dev/proxy-image";
pub const ANN_PROXY_CPU: &str = "mizzen.dev/proxy-cpu";
pub const ANN_PROXY_MEMORY: &str = "mizzen.dev/proxy-memory";
pub const ANN_PROXY_CPU_LIMIT: &str = "mizzen.dev/proxy-cpu-limit";
pub const ANN_PROXY_MEMORY_LIMIT: &str = "mizzen.dev/proxy-memory-limit";
pub const ANN_LOG_LEVEL: &str = "mizzen.dev/log-level";
/// Removed (PeerAuthentication decides); refused with a message saying so.
pub const ANN_MTLS_MODE: &str = "mizzen.dev/mtls-mode";
/// Threads the proxy serves connections with (1 to [`MAX_PROXY_WORKERS`];
/// default 1), Istio's `concurrency`.
pub const ANN_PROXY_WORKERS: &str = "mizzen.dev/proxy-workers";
pub const MAX_PROXY_WORKERS: u16 = 16;
/// `true`: the proxy writes a JSON access log line per HTTP request.
pub const ANN_ACCESS_LOG: &str = "mizzen.dev/access-log";
/// Namespaces (comma-separated, `*` for all) whose Services the proxy
/// follows; others are fetched on first use. Absent: the pod's own. Set on
/// a namespace, it is the default for the namespace's pods.
pub const ANN_DISCOVERY_NAMESPACES: &str = "mizzen.dev/discovery-namespaces";

/// Why a pod is left alone. Not an error: the pod is admitted unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    #[error("namespace {0} is never injected")]
    ExcludedNamespace(String),
    #[error("namespace has {INJECT_LABEL}=disabled")]
    NamespaceDisabled,
    #[error("pod has {INJECT_LABEL}=false")]
    PodOptedOut,
    #[error("neither the namespace nor the pod asks for injection")]
    NotRequested,
    #[error("pod uses the host network")]
    HostNetwork,
    #[error("pod is already injected ({STATUS_ANNOTATION} is set)")]
    AlreadyInjected,
}

impl Skip {
    pub fn label(&self) -> &'static str {
        match self {
            Skip::ExcludedNamespace(_) => "excluded_namespace",
            Skip::NamespaceDisabled => "namespace_disabled",
            Skip::PodOptedOut => "pod_opted_out",
            Skip::NotRequested => "not_requested",
            Skip::HostNetwork => "host_network",
            Skip::AlreadyInjected => "already_injected",
        }
    }
}

/// Why a pod that should be injected cannot be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error("annotation {name}={value:?} is not valid: {reason}")]
    Annotation {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("pod has no spec")]
    NoSpec,
    #[error("pod already has a container named {0:?}; rename it to inject the mesh")]
    NameClash(String),
    #[error(
        "container {container:?} mounts volume {volume:?}: only the injected {PROXY_NAME} container may \
         mount Mizzen's volumes (mizzen-*), which hold the node agent's socket and the proxy's token"
    )]
    ReservedVolume { container: String, volume: String },
    #[error(
        "volume {volume:?} mounts the node agent's socket directory {path:?} from the host; only the \
         injected proxy may reach it"
    )]
    AgentHostPath { volume: String, path: String },
    #[error(
        "container {container:?} runs as UID or GID {uid}, the proxy's: its traffic would bypass the mesh; \
         run it as another user"
    )]
    ProxyUid { container: String, uid: u32 },
    #[error("BUG: cannot serialise the pod: {0}")]
    Serialize(String),
}

/// Refuses a pod whose own containers would run as the proxy's UID or GID:
/// the capture rules let that traffic through untouched (Istio documents
/// the same hazard). An image's own `USER 1337` is invisible here.
fn check_not_proxy_uid(spec: &k8s_openapi::api::core::v1::PodSpec, proxy_uid: u32) -> Result<(), InjectError> {
    let id = i64::from(proxy_uid);
    let pod = spec.security_context.as_ref();
    for c in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
        let sc = c.security_context.as_ref();
        let uid = sc.and_then(|s| s.run_as_user).or(pod.and_then(|p| p.run_as_user));
        let gid = sc.and_then(|s| s.run_as_group).or(pod.and_then(|p| p.run_as_group));
        if uid == Some(id) || gid == Some(id) {
            return Err(InjectError::ProxyUid {
                container: c.name.clone(),
                uid: proxy_uid,
            });
        }
    }
    Ok(())
}

/// Prefix of the volumes the injector adds; reserved for them.
pub const RESERVED_VOLUME_PREFIX: &str = "mizzen-";

/// Whether hostPath `path` is `dir` or inside it, however it is written
/// (repeated slashes, `.` segments, a trailing slash), with `/var/run` and
/// `/run` taken as one directory (a symlink on most hosts). The API server
/// refuses `..` in hostPath, so segments are only ever dropped, not popped.
fn within_host_dir(path: &str, dir: &str) -> bool {
    fn segments(p: &str) -> Vec<&str> {
        let s: Vec<&str> = p.split('/').filter(|s| !s.is_empty() && *s != ".").collect();
        match s.as_slice() {
            ["var", "run", ..] => s[1..].to_vec(),
            _ => s,
        }
    }
    let (path, dir) = (segments(path), segments(dir));
    path.len() >= dir.len() && path[..dir.len()] == dir[..]
}

/// Refuses a pod whose own containers could reach what the proxy alone may:
/// a mount of a `mizzen-*` volume, or its own hostPath to the agent's socket
/// directory (with which it could replace the socket and collect every
/// proxy's token on the node).
fn check_reserved(spec: &k8s_openapi::api::core::v1::PodSpec, agent_socket_dir: &str) -> Result<(), InjectError> {
    for v in spec.volumes.iter().flatten() {
        if v.name.starts_with(RESERVED_VOLUME_PREFIX) {
            return Err(InjectError::NameClash(v.name.clone()));
        }
        if let Some(h) = v
            .host_path
            .as_ref()
            .filter(|h| within_host_dir(&h.path, agent_socket_dir))
        {
            return Err(InjectError::AgentHostPath {
                volume: v.name.clone(),
                path: h.path.clone(),
            });
        }
    }
    let mounts = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .flat_map(|c| c.volume_mounts.iter().flatten().map(move |m| (&c.name, m)))
        .chain(
            spec.ephemeral_containers
                .iter()
                .flatten()
                .flat_map(|c| c.volume_mounts.iter().flatten().map(move |m| (&c.name, m))),
        );
    for (container, m) in mounts {
        if m.name.starts_with(RESERVED_VOLUME_PREFIX) {
            return Err(InjectError::ReservedVolume {
                container: container.clone(),
                volume: m.name.clone(),
            });
        }
    }
    Ok(())
}

/// What `mizzen.dev/status` records, so injection is idempotent and removable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub init_containers: Vec<String>,
    pub containers: Vec<String>,
    pub volumes: Vec<String>,
    pub native_sidecar: bool,
}

/// Whether `pod` in a namespace with `ns_labels` gets the mesh.
pub fn decide(pod: &Pod, namespace: &str, ns_labels: &BTreeMap<String, String>) -> Result<(), Skip> {
    if EXCLUDED_NAMESPACES.contains(&namespace) {
        return Err(Skip::ExcludedNamespace(namespace.to_owned()));
    }
    let ns = ns_labels.get(INJECT_LABEL).map(String::as_str);
    let pod_label = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(INJECT_LABEL))
        .map(String::as_str);
    if ns == Some("disabled") {
        return Err(Skip::NamespaceDisabled);
    }
    match (ns, pod_label) {
        (_, Some("false")) => return Err(Skip::PodOptedOut),
        (Some("enabled"), _) | (_, Some("true")) => {}
        _ => return Err(Skip::NotRequested),
    }
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        return Err(Skip::HostNetwork);
    }
    if is_injected(pod) {
        return Err(Skip::AlreadyInjected);
    }
    Ok(())
}

/// Whether the pod holds what its `mizzen.dev/status` says was injected.
/// The annotation alone proves nothing: a pod could carry it to skip the
/// mesh; one whose contents disagree is injected (and the annotation
/// rewritten).
fn is_injected(pod: &Pod) -> bool {
    let Some(status) = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(STATUS_ANNOTATION))
        .and_then(|s| serde_json::from_str::<Status>(s).ok())
    else {
        return false;
    };
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    let has = |names: &[String], present: &mut dyn Iterator<Item = &String>| {
        let present: Vec<&String> = present.collect();
        !names.is_empty() && names.iter().all(|n| present.contains(&n))
    };
    let proxy_present = status
        .containers
        .iter()
        .chain(&status.init_containers)
        .any(|n| n == PROXY_NAME);
    proxy_present
        && has(
            &status.init_containers,
            &mut spec.init_containers.iter().flatten().map(|c| &c.name),
        )
        && (status.containers.is_empty() || has(&status.containers, &mut spec.containers.iter().map(|c| &c.name)))
        && has(&status.volumes, &mut spec.volumes.iter().flatten().map(|v| &v.name))
}

/// Per-pod settings after annotations.
#[derive(Debug, Clone)]
struct Effective {
    image: String,
    exclude_inbound_ports: Vec<u16>,
    exclude_outbound_ports: Vec<u16>,
    exclude_outbound_cidrs: Vec<String>,
    cpu: String,
    memory: String,
    cpu_limit: String,
    memory_limit: String,
    log_level: String,
    workers: Option<u16>,
    access_log: bool,
    discovery_namespaces: Vec<String>,
}

fn ann_err(name: &'static str, value: &str, reason: impl Into<String>) -> InjectError {
    InjectError::Annotation {
        name,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

fn parse_ports(name: &'static str, value: &str) -> Result<Vec<u16>, InjectError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|p| match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(ann_err(name, value, format!("{p:?} is not a port (1-65535)"))),
        })
        .collect()
}

fn parse_cidrs(name: &'static str, value: &str) -> Result<Vec<String>, InjectError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|c| {
            let (ip, len) = c
                .split_once('/')
                .ok_or_else(|| ann_err(name, value, format!("{c:?} is not a CIDR")))?;
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| ann_err(name, value, format!("{c:?} has a bad address")))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            match len.parse::<u8>() {
                Ok(l) if l <= max => Ok(format!("{ip}/{l}")),
                _ => Err(ann_err(name, value, format!("{c:?} has a bad prefix length"))),
            }
        })
        .collect()
}

/// A Kubernetes quantity such as `100m`, `0.5`, `128Mi` or `1e3`.
fn is_quantity(s: &str) -> bool {
    let digits_end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, suffix) = s.split_at(digits_end);
    let num_ok = !num.is_empty() && num != "." && num.matches('.').count() <= 1;
    let suffix_ok = matches!(
        suffix,
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
    ) || (suffix.len() > 1
        && suffix.starts_with(['e', 'E'])
        && suffix[1..]
            .trim_start_matches(['+', '-'])
            .chars()
            .all(|c| c.is_ascii_digit())
        && !suffix[1..].trim_start_matches(['+', '-']).is_empty());
    num_ok && suffix_ok && s.len() <= 32
}

fn effective(pod: &Pod, cfg: &InjectConfig) -> Result<Effective, InjectError> {
    let empty = BTreeMap::new();
    let ann = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let get = |k: &str| ann.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let mut e = Effective {
        image: cfg.proxy_image.clone(),
        exclude_inbound_ports: cfg.exclude_inbound_ports.clone(),
        exclude_outbound_ports: vec![],
        exclude_outbound_cidrs: cfg.exclude_outbound_cidrs.clone(),
        cpu: cfg.proxy_cpu_request.clone(),
        memory: cfg.proxy_memory_request.clone(),
        cpu_limit: cfg.proxy_cpu_limit.clone(),
        memory_limit: cfg.proxy_memory_limit.clone(),
        log_level: cfg.log_level.clone(),
        workers: None,
        access_log: false,
        discovery_namespaces: Vec::new(),
    };
    if let Some(v) = get(ANN_EXCLUDE_INBOUND_PORTS) {
        e.exclude_inbound_ports
            .extend(parse_ports(ANN_EXCLUDE_INBOUND_PORTS, v)?);
    }
    if let Some(v) = get(ANN_EXCLUDE_OUTBOUND_PORTS) {
        e.exclude_outbound_ports = parse_ports(ANN_EXCLUDE_OUTBOUND_PORTS, v)?;
    }
    if let Some(v) = get(ANN_EXCLUDE_OUTBOUND_CIDRS) {
        e.exclude_outbound_cidrs
            .extend(parse_cidrs(ANN_EXCLUDE_OUTBOUND_CIDRS, v)?);
    }
    if let Some(v) = get(ANN_PROXY_IMAGE) {
        if !cfg.allow_proxy_image_annotation {
            return Err(ann_err(
                ANN_PROXY_IMAGE,
                v,
                "choosing the proxy image per pod is off in this mesh (allowProxyImageAnnotation in the \
                 injector's config): the init container runs as root with NET_ADMIN",
            ));
        }
        if v.len() > 512 || v.contains(char::is_whitespace) {
            return Err(ann_err(ANN_PROXY_IMAGE, v, "not an image reference"));
        }
        e.image = v.to_owned();
    }
    for (name, slot) in [
        (ANN_PROXY_CPU, &mut e.cpu),
        (ANN_PROXY_MEMORY, &mut e.memory),
        (ANN_PROXY_CPU_LIMIT, &mut e.cpu_limit),
        (ANN_PROXY_MEMORY_LIMIT, &mut e.memory_limit),
    ] {
        if let Some(v) = get(name) {
            if !is_quantity(v) {
                return Err(ann_err(name, v, "not a Kubernetes quantity such as 100m or 128Mi"));
            }
            *slot = v.to_owned();
        }
    }
    if let Some(v) = get(ANN_LOG_LEVEL) {
        if !matches!(v, "trace" | "debug" | "info" | "warn" | "error") {
            return Err(ann_err(ANN_LOG_LEVEL, v, "use trace, debug, info, warn or error"));
        }
        e.log_level = v.to_owned();
    }
    if let Some(v) = get(ANN_MTLS_MODE) {
        // Refused rather than ignored: whoever set it expects plaintext to
        // be refused, and only a PeerAuthentication does that now.
        return Err(ann_err(
            ANN_MTLS_MODE,
            v,
            "this annotation was removed: apply a PeerAuthentication (security.mizzen.dev/v1) \
             with mtls.mode STRICT and a selector matching this pod instead",
        ));
    }
    if let Some(v) = get(ANN_PROXY_WORKERS) {
        match v.parse::<u16>() {
            Ok(n) if (1..=MAX_PROXY_WORKERS).contains(&n) => e.workers = Some(n),
            _ => {
                return Err(ann_err(
                    ANN_PROXY_WORKERS,
                    v,
                    format!("use a whole number from 1 to {MAX_PROXY_WORKERS}"),
                ));
            }
        }
    }
    if let Some(v) = get(ANN_ACCESS_LOG) {
        e.access_log = match v {
            "true" => true,
            "false" => false,
            _ => return Err(ann_err(ANN_ACCESS_LOG, v, "use true or false")),
        };
    }
    if let Some(v) = get(ANN_DISCOVERY_NAMESPACES) {
        for ns in v.split(',').map(str::trim) {
            if ns != "*" && !mizzen_api::mesh::is_namespace_name(ns) {
                return Err(ann_err(
                    ANN_DISCOVERY_NAMESPACES,
                    v,
                    format!("{ns:?} is not a namespace name: list namespaces separated by commas"),
                ));
            }
            e.discovery_namespaces.push(ns.to_owned());
        }
    }
    e.exclude_inbound_ports.sort_unstable();
    e.exclude_inbound_ports.dedup();
    Ok(e)
}

fn join<T: ToString>(items: &[T]) -> String {
    items.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn quantities(cpu: &str, memory: &str) -> Option<BTreeMap<String, Quantity>> {
    let mut m = BTreeMap::new();
    if !cpu.is_empty() {
        m.insert("cpu".into(), Quantity(cpu.into()));
    }
    if !memory.is_empty() {
        m.insert("memory".into(), Quantity(memory.into()));
    }
    (!m.is_empty()).then_some(m)
}

/// Rewrites app probes to the proxy's admin port; returns the originals by path.
fn rewrite_probes(containers: &mut [Container], admin_port: u16) -> BTreeMap<String, serde_json::Value> {
    let mut originals = BTreeMap::new();
    for c in containers.iter_mut() {
        let ports = c.ports.clone().unwrap_or_default();
        let name = c.name.clone();
        for (kind, probe) in [
            ("livez", &mut c.liveness_probe),
            ("readyz", &mut c.readiness_probe),
            ("startupz", &mut c.startup_probe),
        ] {
            let Some(p) = probe.as_mut() else { continue };
            if p.exec.is_some() {
                continue; // runs inside the container; mTLS does not affect it
            }
            // Resolve named ports now: the proxy only sees numbers.
            let resolve = |port: &IntOrString| match port {
                IntOrString::String(n) => ports
                    .iter()
                    .find(|p| p.name.as_deref() == Some(n.as_str()))
                    .map(|p| IntOrString::Int(p.container_port))
                    .unwrap_or_else(|| port.clone()),
                other => other.clone(),
            };
            let original = if let Some(h) = p.http_get.as_ref() {
                let mut h = h.clone();
                h.port = resolve(&h.port);
                serde_json::json!({ "httpGet": h })
            } else if let Some(t) = p.tcp_socket.as_ref() {
                let mut t = t.clone();
                t.port = resolve(&t.port);
                serde_json::json!({ "tcpSocket": t })
            } else if let Some(g) = p.grpc.as_ref() {
                serde_json::json!({ "grpc": g })
            } else {
                continue;
            };
            let path = format!("/app-health/{name}/{kind}");
            originals.insert(path.clone(), original);
            p.http_get = Some(HTTPGetAction {
                path: Some(path),
                port: IntOrString::Int(i32::from(admin_port)),
                scheme: Some("HTTP".into()),
                ..Default::default()
            });
            p.tcp_socket = None;
            p.grpc = None;
        }
    }
    originals
}

/// The pod with the mesh added. `native` chooses a native sidecar.
pub fn mutate(pod: &Pod, cfg: &InjectConfig, native: bool) -> Result<Pod, InjectError> {
    let e = effective(pod, cfg)?;
    let mut pod = pod.clone();
    let spec = pod.spec.as_mut().ok_or(InjectError::NoSpec)?;
    for c in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
        if c.name == INIT_NAME || c.name == PROXY_NAME {
            return Err(InjectError::NameClash(c.name.clone()));
        }
    }
    check_reserved(spec, &cfg.agent_socket_dir)?;
    check_not_proxy_uid(spec, cfg.proxy_uid)?;
    let uid = i64::from(cfg.proxy_uid);
    let mut inbound_excluded = vec![cfg.admin_port, cfg.health_port];
    inbound_excluded.extend(e.exclude_inbound_ports.iter().copied());
    inbound_excluded.sort_unstable();
    inbound_excluded.dedup();
    let mut init_args = vec![
        "init".to_string(),
        format!("--proxy-uid={}", cfg.proxy_uid),
        format!("--proxy-gid={}", cfg.proxy_uid),
        format!("--inbound-port={}", cfg.inbound_capture_port),
        format!("--outbound-port={}", cfg.outbound_capture_port),
        format!("--exclude-inbound-ports={}", join(&inbound_excluded)),
    ];
    if !e.exclude_outbound_ports.is_empty() {
        init_args.push(format!("--exclude-outbound-ports={}", join(&e.exclude_outbound_ports)));
    }
    if !e.exclude_outbound_cidrs.is_empty() {
        init_args.push(format!("--exclude-outbound-cidrs={}", join(&e.exclude_outbound_cidrs)));
    }
    let init = Container {
        name: INIT_NAME.into(),
        image: Some(e.image.clone()),
        image_pull_policy: Some(cfg.image_pull_policy.clone()),
        args: Some(init_args),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        }),
        resources: Some(ResourceRequirements {
            requests: quantities(&e.cpu, &e.memory),
            limits: quantities(&e.cpu_limit, &e.memory_limit),
            ..Default::default()
        }),
        ..Default::default()
    };

    let probes = rewrite_probes(&mut spec.containers, cfg.admin_port);
    let mut env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("INSTANCE_IP", "status.podIP"),
        field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        field_env("NODE_NAME", "spec.nodeName"),
        EnvVar {
            name: "MIZZEN_LOG_LEVEL".into(),
            value: Some(e.log_level.clone()),
            ..Default::default()
        },
    ];
    let literal = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        ..Default::default()
    };
    if let Some(n) = e.workers {
        env.push(literal("MIZZEN_PROXY_WORKERS", n.to_string()));
    }
    if e.access_log {
        env.push(literal("MIZZEN_ACCESS_LOG", "true".into()));
    }
    if !e.discovery_namespaces.is_empty() {
        env.push(literal("MIZZEN_DISCOVERY_NAMESPACES", e.discovery_namespaces.join(",")));
    }
    if let Some(endpoint) = &cfg.tracing.otlp_endpoint {
        env.push(literal("MIZZEN_TRACING_OTLP_ENDPOINT", endpoint.clone()));
        env.push(literal(
            "MIZZEN_TRACING_SAMPLING_PERCENT",
            cfg.tracing.sampling_percent.to_string(),
        ));
    }
    if let Some(labels) = pod.metadata.labels.as_ref().filter(|l| !l.is_empty()) {
        // For routes' sourceLabels: the pod's labels as it was admitted.
        let json = serde_json::to_string(labels).map_err(|e| InjectError::Serialize(e.to_string()))?;
        env.push(literal(POD_LABELS_ENV, json));
    }
    if !probes.is_empty() {
        env.push(EnvVar {
            name: APP_PROBES_ENV.into(),
            value: Some(serde_json::to_string(&probes).map_err(|e| InjectError::Serialize(e.to_string()))?),
            ..Default::default()
        });
    }
    let mut proxy = Container {
        name: PROXY_NAME.into(),
        image: Some(e.image.clone()),
        image_pull_policy: Some(cfg.image_pull_policy.clone()),
        args: Some(vec![
            "proxy".into(),
            format!("--inbound-port={}", cfg.inbound_capture_port),
            format!("--outbound-port={}", cfg.outbound_capture_port),
            format!("--admin-port={}", cfg.admin_port),
            format!("--health-port={}", cfg.health_port),
            format!("--agent-socket={SOCKET_MOUNT}/agent.sock"),
            format!("--token-file={TOKEN_MOUNT}/token"),
        ]),
        env: Some(env),
        ports: Some(vec![
            ContainerPort {
                name: Some("mizzen-admin".into()),
                container_port: i32::from(cfg.admin_port),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some("mizzen-health".into()),
                container_port: i32::from(cfg.health_port),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
        ]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz/ready".into()),
                port: IntOrString::Int(i32::from(cfg.health_port)),
                ..Default::default()
            }),
            period_seconds: Some(2),
            failure_threshold: Some(30),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(uid),
            run_as_group: Some(uid),
            run_as_non_root: Some(true),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..Default::default()
        }),
        resources: Some(ResourceRequirements {
            requests: quantities(&e.cpu, &e.memory),
            limits: quantities(&e.cpu_limit, &e.memory_limit),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            // Read-only: connecting to the socket needs no write access, and
            // nothing in the pod may replace it.
            VolumeMount {
                name: SOCKET_VOLUME.into(),
                mount_path: SOCKET_MOUNT.into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: TOKEN_VOLUME.into(),
                mount_path: TOKEN_MOUNT.into(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        ..Default::default()
    };

    let inits = spec.init_containers.get_or_insert_with(Vec::new);
    let status;
    if native {
        proxy.restart_policy = Some("Always".into());
        // The kubelet starts the next containers only once a native
        // sidecar's startup probe passes: the app starts with the proxy
        // holding its certificate and the mesh's routes.
        if cfg.hold_application_until_proxy_starts {
            proxy.startup_probe = Some(Probe {
                http_get: Some(HTTPGetAction {
                    path: Some("/healthz/ready".into()),
                    port: IntOrString::Int(i32::from(cfg.health_port)),
                    ..Default::default()
                }),
                period_seconds: Some(1),
                failure_threshold: Some(600),
                ..Default::default()
            });
        }
        // Before the user's init containers, so they (and the app) run with the proxy up.
        inits.splice(0..0, [init, proxy]);
        status = Status {
            init_containers: vec![INIT_NAME.into(), PROXY_NAME.into()],
            containers: vec![],
            volumes: vec![SOCKET_VOLUME.into(), TOKEN_VOLUME.into()],
            native_sidecar: true,
        };
    } else {
        inits.insert(0, init);
        if cfg.hold_application_until_proxy_starts {
            // Kubelet starts containers in order and waits for postStart.
            proxy.lifecycle = Some(Lifecycle {
                post_start: Some(LifecycleHandler {
                    exec: Some(ExecAction {
                        command: Some(vec!["mizzen-proxy".into(), "wait".into()]),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        spec.containers.insert(0, proxy);
        status = Status {
            init_containers: vec![INIT_NAME.into()],
            containers: vec![PROXY_NAME.into()],
            volumes: vec![SOCKET_VOLUME.into(), TOKEN_VOLUME.into()],
            native_sidecar: false,
        };
    }
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    volumes.push(Volume {
        name: SOCKET_VOLUME.into(),
        host_path: Some(HostPathVolumeSource {
            path: cfg.agent_socket_dir.clone(),
            type_: Some("Directory".into()),
        }),
        ..Default::default()
    });
    volumes.push(Volume {
        name: TOKEN_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(cfg.token_audience.clone()),
                    expiration_seconds: Some(cfg.token_expiration_seconds),
                    path: "token".into(),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    });
    let status = serde_json::to_string(&status).map_err(|e| InjectError::Serialize(e.to_string()))?;
    pod.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(STATUS_ANNOTATION.into(), status);
    pod.metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(TLS_MODE_LABEL.into(), mizzen_api::mesh::TLS_MODE_MIZZEN.into());
    Ok(pod)
}

/// The outcome for one pod.
#[derive(Debug)]
pub enum Outcome {
    Inject(json_patch::Patch),
    Skip(Skip),
}

/// Decides and, if so, returns the patch that injects `pod`.
/// Customisation annotations a namespace may set for all its pods (a
/// pod's own wins).
pub const NAMESPACE_DEFAULTS: &[&str] = &[ANN_DISCOVERY_NAMESPACES];

/// `pod` with the [`NAMESPACE_DEFAULTS`] its namespace sets and it does not.
pub fn with_namespace_defaults(mut pod: Pod, ns_annotations: &BTreeMap<String, String>) -> Pod {
    for name in NAMESPACE_DEFAULTS {
        if let Some(v) = ns_annotations.get(*name) {
            pod.metadata
                .annotations
                .get_or_insert_default()
                .entry((*name).to_owned())
                .or_insert_with(|| v.clone());
        }
    }
    pod
}

pub fn inject(
    pod: &Pod,
    namespace: &str,
    ns_labels: &BTreeMap<String, String>,
    ns_annotations: &BTreeMap<String, String>,
    cfg: &InjectConfig,
    native: bool,
) -> Result<Outcome, InjectError> {
    if let Err(skip) = decide(pod, namespace, ns_labels) {
        return Ok(Outcome::Skip(skip));
    }
    // The patch applies to the pod as submitted: the namespace's defaults
    // it takes are part of the patch.
    let before = serde_json::to_value(pod).map_err(|e| InjectError::Serialize(e.to_string()))?;
    let defaulted = with_namespace_defaults(pod.clone(), ns_annotations);
    let after =
        serde_json::to_value(mutate(&defaulted, cfg, native)?).map_err(|e| InjectError::Serialize(e.to_string()))?;
    Ok(Outcome::Inject(json_patch::diff(&before, &after)))
}

#[cfg(test)]
mod tests;
