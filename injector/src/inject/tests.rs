use super::*;

fn pod(json: serde_json::Value) -> Pod {
    serde_json::from_value(json).expect("pod")
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn app() -> Pod {
    pod(serde_json::json!({
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "app", "image": "app",
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
            "livenessProbe": {"tcpSocket": {"port": 8080}},
            "startupProbe": {"exec": {"command": ["true"]}}}]}
    }))
}

#[test]
fn decisions() {
    let enabled = labels(&[(INJECT_LABEL, "enabled")]);
    let disabled = labels(&[(INJECT_LABEL, "disabled")]);
    let none = labels(&[]);
    let with_label = |v: &str| {
        let mut p = app();
        p.metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(INJECT_LABEL.into(), v.into());
        p
    };
    let mut host = app();
    host.spec.as_mut().expect("spec").host_network = Some(true);
    let injected = mutate(&app(), &InjectConfig::default(), true).expect("injects");
    // The status a pod could carry to skip the mesh, with nothing injected.
    let mut forged = app();
    let claim = r#"{"initContainers":["mizzen-init","mizzen-proxy"],"containers":[],"volumes":["mizzen-agent-socket","mizzen-token"],"nativeSidecar":true}"#;
    forged.metadata.annotations = Some(labels(&[(STATUS_ANNOTATION, claim)]));
    let mut garbage = app();
    garbage.metadata.annotations = Some(labels(&[(STATUS_ANNOTATION, "{}")]));

    type Case<'a> = (&'a str, Pod, &'a str, &'a BTreeMap<String, String>, Result<(), Skip>);
    let cases: Vec<Case<'_>> = vec![
        ("labelled namespace", app(), "demo", &enabled, Ok(())),
        ("pod opts in", with_label("true"), "demo", &none, Ok(())),
        (
            "pod opts out",
            with_label("false"),
            "demo",
            &enabled,
            Err(Skip::PodOptedOut),
        ),
        (
            "namespace disabled beats pod opt-in",
            with_label("true"),
            "demo",
            &disabled,
            Err(Skip::NamespaceDisabled),
        ),
        ("nobody asks", app(), "demo", &none, Err(Skip::NotRequested)),
        ("host network", host, "demo", &enabled, Err(Skip::HostNetwork)),
        (
            "already injected",
            injected,
            "demo",
            &enabled,
            Err(Skip::AlreadyInjected),
        ),
        ("a forged status is not injection", forged, "demo", &enabled, Ok(())),
        (
            "an unreadable status is not injection",
            garbage,
            "demo",
            &enabled,
            Ok(()),
        ),
        (
            "kube-system",
            with_label("true"),
            "kube-system",
            &enabled,
            Err(Skip::ExcludedNamespace("kube-system".into())),
        ),
        (
            "mizzen-system",
            app(),
            "mizzen-system",
            &enabled,
            Err(Skip::ExcludedNamespace("mizzen-system".into())),
        ),
    ];
    for (name, p, ns, l, want) in cases {
        assert_eq!(decide(&p, ns, l), want, "{name}");
    }
}

#[test]
fn native_sidecar_comes_first_among_init_containers() {
    let mut p = app();
    p.spec.as_mut().expect("spec").init_containers = Some(vec![Container {
        name: "migrate".into(),
        image: Some("m".into()),
        ..Default::default()
    }]);
    let out = mutate(&p, &InjectConfig::default(), true).expect("inject");
    let spec = out.spec.as_ref().expect("spec");
    let inits: Vec<_> = spec.init_containers.iter().flatten().map(|c| c.name.as_str()).collect();
    assert_eq!(inits, [INIT_NAME, PROXY_NAME, "migrate"]);
    let names: Vec<_> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["app"]);
    let proxy = &spec.init_containers.as_ref().expect("inits")[1];
    assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
    let startup = proxy
        .startup_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("the app waits for the proxy's startup probe");
    assert_eq!(startup.path.as_deref(), Some("/healthz/ready"));
    assert_eq!(startup.port, IntOrString::Int(15021));
    let sc = proxy.security_context.as_ref().expect("sc");
    assert_eq!(
        (sc.run_as_user, sc.run_as_group, sc.run_as_non_root),
        (Some(1337), Some(1337), Some(true))
    );
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(
        sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".into()])
    );
    let init = &spec.init_containers.as_ref().expect("inits")[0];
    let caps = init
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.clone())
        .expect("caps");
    assert_eq!(caps.add, Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]));
    assert_eq!(caps.drop, Some(vec!["ALL".into()]));
    let env: Vec<_> = proxy.env.iter().flatten().map(|e| e.name.as_str()).collect();
    for want in [
        "POD_NAME",
        "POD_NAMESPACE",
        "INSTANCE_IP",
        "SERVICE_ACCOUNT",
        "NODE_NAME",
        APP_PROBES_ENV,
    ] {
        assert!(env.contains(&want), "{want} in {env:?}");
    }
    let vols: Vec<_> = spec.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
    assert_eq!(vols, [SOCKET_VOLUME, TOKEN_VOLUME]);
    let token = spec.volumes.as_ref().expect("v")[1]
        .projected
        .as_ref()
        .expect("projected");
    let sat = token.sources.as_ref().expect("s")[0]
        .service_account_token
        .as_ref()
        .expect("sat");
    assert_eq!(sat.audience.as_deref(), Some("mizzen-ca"));
    let status: Status =
        serde_json::from_str(&out.metadata.annotations.as_ref().expect("a")[STATUS_ANNOTATION]).expect("status");
    assert!(status.native_sidecar);
    assert_eq!(out.metadata.labels.as_ref().expect("l")[TLS_MODE_LABEL], "mizzen");
}

#[test]
fn regular_sidecar_on_old_clusters_holds_the_app() {
    let out = mutate(&app(), &InjectConfig::default(), false).expect("inject");
    let spec = out.spec.as_ref().expect("spec");
    let names: Vec<_> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, [PROXY_NAME, "app"]);
    assert!(spec.containers[0].restart_policy.is_none());
    assert!(
        spec.containers[0]
            .lifecycle
            .as_ref()
            .and_then(|l| l.post_start.as_ref())
            .is_some()
    );
    let inits: Vec<_> = spec.init_containers.iter().flatten().map(|c| c.name.as_str()).collect();
    assert_eq!(inits, [INIT_NAME]);
}

#[test]
fn probes_are_rewritten_and_carried() {
    let out = mutate(&app(), &InjectConfig::default(), true).expect("inject");
    let spec = out.spec.as_ref().expect("spec");
    let app = &spec.containers[0];
    let ready = app
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.clone())
        .expect("http");
    assert_eq!(ready.path.as_deref(), Some("/app-health/app/readyz"));
    assert_eq!(ready.port, IntOrString::Int(15020));
    let live = app.liveness_probe.as_ref().expect("live");
    assert!(live.tcp_socket.is_none());
    assert_eq!(
        live.http_get.as_ref().and_then(|h| h.path.as_deref()),
        Some("/app-health/app/livez")
    );
    assert!(
        app.startup_probe.as_ref().and_then(|p| p.exec.as_ref()).is_some(),
        "exec probes untouched"
    );
    let proxy = &spec.init_containers.as_ref().expect("i")[1];
    let carried = proxy
        .env
        .iter()
        .flatten()
        .find(|e| e.name == APP_PROBES_ENV)
        .and_then(|e| e.value.clone())
        .expect("env");
    let carried: serde_json::Value = serde_json::from_str(&carried).expect("json");
    assert_eq!(
        carried["/app-health/app/readyz"]["httpGet"]["port"], 8080,
        "named port resolved"
    );
    assert_eq!(carried["/app-health/app/readyz"]["httpGet"]["path"], "/ready");
    assert_eq!(carried["/app-health/app/livez"]["tcpSocket"]["port"], 8080);
}

#[test]
fn annotations_customise_and_bad_values_name_the_annotation() {
    let with = |k: &str, v: &str| {
        let mut p = app();
        p.metadata.annotations = Some(labels(&[(k, v)]));
        p
    };
    // Init container 0 is mizzen-init, 1 the native proxy.
    let injected = |k: &str, v: &str, i: usize| -> Container {
        mutate(&with(k, v), &InjectConfig::default(), true)
            .expect("ok")
            .spec
            .and_then(|s| s.init_containers)
            .expect("init containers")
            .swap_remove(i)
    };
    let args = injected(ANN_EXCLUDE_INBOUND_PORTS, "9090, 9091", 0).args.expect("args");
    assert!(
        args.contains(&"--exclude-inbound-ports=9090,9091,15020,15021".to_string()),
        "{args:?}"
    );
    let args = injected(ANN_EXCLUDE_OUTBOUND_CIDRS, "10.0.0.0/8,fd00::/8", 0)
        .args
        .expect("args");
    assert!(
        args.contains(&"--exclude-outbound-cidrs=10.0.0.0/8,fd00::/8".to_string()),
        "{args:?}"
    );
    let res = injected(ANN_PROXY_MEMORY, "64Mi", 1).resources.expect("r");
    assert_eq!(res.requests.expect("req")["memory"], Quantity("64Mi".into()));

    let env = injected(ANN_LOG_LEVEL, "debug", 1).env.expect("env");
    assert!(
        !env.iter()
            .any(|e| e.name == "MIZZEN_PROXY_WORKERS" || e.name == "MIZZEN_ACCESS_LOG"),
        "defaults: the proxy's own (one worker, no access log)"
    );
    let mut traced = InjectConfig::default();
    traced.tracing.otlp_endpoint = Some("http://collector:4317".into());
    let env = mutate(&with(ANN_LOG_LEVEL, "info"), &traced, true)
        .expect("ok")
        .spec
        .expect("spec")
        .init_containers
        .expect("init")
        .into_iter()
        .find(|c| c.name == "mizzen-proxy")
        .expect("native sidecar")
        .env
        .expect("env");
    assert!(
        env.iter()
            .any(|e| e.name == "MIZZEN_TRACING_OTLP_ENDPOINT" && e.value.as_deref() == Some("http://collector:4317")),
        "{env:?}"
    );
    let env = injected(ANN_PROXY_WORKERS, "2", 1).env.expect("env");
    assert!(
        env.iter()
            .any(|e| e.name == "MIZZEN_PROXY_WORKERS" && e.value.as_deref() == Some("2")),
        "{env:?}"
    );
    let env = injected(ANN_DISCOVERY_NAMESPACES, "demo, shared", 1).env.expect("env");
    assert!(
        env.iter()
            .any(|e| e.name == "MIZZEN_DISCOVERY_NAMESPACES" && e.value.as_deref() == Some("demo,shared")),
        "{env:?}"
    );
    let env = injected(ANN_ACCESS_LOG, "true", 1).env.expect("env");
    // A namespace's default, and a pod's own that wins over it.
    let ns: BTreeMap<String, String> = [(ANN_DISCOVERY_NAMESPACES.to_owned(), "*".to_owned())].into();
    let defaulted = with_namespace_defaults(with(ANN_LOG_LEVEL, "debug"), &ns);
    assert_eq!(
        defaulted
            .metadata
            .annotations
            .as_ref()
            .map(|a| a[ANN_DISCOVERY_NAMESPACES].as_str()),
        Some("*")
    );
    let own = with_namespace_defaults(with(ANN_DISCOVERY_NAMESPACES, "demo"), &ns);
    assert_eq!(
        own.metadata
            .annotations
            .as_ref()
            .map(|a| a[ANN_DISCOVERY_NAMESPACES].as_str()),
        Some("demo")
    );
    assert!(
        env.iter()
            .any(|e| e.name == "MIZZEN_ACCESS_LOG" && e.value.as_deref() == Some("true")),
        "{env:?}"
    );

    for (name, value) in [
        (ANN_EXCLUDE_INBOUND_PORTS, "80,http"),
        (ANN_EXCLUDE_INBOUND_PORTS, "0"),
        (ANN_EXCLUDE_OUTBOUND_PORTS, "70000"),
        (ANN_EXCLUDE_OUTBOUND_CIDRS, "10.0.0.0"),
        (ANN_EXCLUDE_OUTBOUND_CIDRS, "10.0.0.0/33"),
        (ANN_EXCLUDE_OUTBOUND_CIDRS, "nope/8"),
        (ANN_PROXY_CPU, "lots"),
        (ANN_PROXY_MEMORY, "12XB"),
        (ANN_PROXY_IMAGE, "two words"),
        (ANN_LOG_LEVEL, "verbose"),
        (ANN_MTLS_MODE, "STRICTER"),
        // Removed: PeerAuthentication decides, and a pod that still asks
        // for STRICT this way must not run believing it got it.
        (ANN_MTLS_MODE, "strict"),
        (ANN_PROXY_WORKERS, "0"),
        (ANN_PROXY_WORKERS, "17"),
        (ANN_PROXY_WORKERS, "two"),
        (ANN_ACCESS_LOG, "yes"),
        (ANN_DISCOVERY_NAMESPACES, "demo,"),
        (ANN_DISCOVERY_NAMESPACES, "Demo"),
        (ANN_DISCOVERY_NAMESPACES, "demo/*"),
    ] {
        match mutate(&with(name, value), &InjectConfig::default(), true) {
            Err(InjectError::Annotation { name: n, .. }) => assert_eq!(n, name, "{value}"),
            other => panic!("{name}={value}: {other:?}"),
        }
        let err = mutate(&with(name, value), &InjectConfig::default(), true).expect_err("bad");
        assert!(err.to_string().contains(name), "{err}");
    }
}

#[test]
fn patch_applies_and_reinjection_is_a_no_op() {
    let enabled = labels(&[(INJECT_LABEL, "enabled")]);
    let original = app();
    let Outcome::Inject(patch) = inject(
        &original,
        "demo",
        &enabled,
        &BTreeMap::new(),
        &InjectConfig::default(),
        true,
    )
    .expect("ok") else {
        panic!("should inject")
    };
    let mut doc = serde_json::to_value(&original).expect("json");
    json_patch::patch(&mut doc, &patch).expect("the patch applies to its pod");
    let patched: Pod = serde_json::from_value(doc).expect("still a pod");
    assert_eq!(patched, mutate(&original, &InjectConfig::default(), true).expect("ok"));
    match inject(
        &patched,
        "demo",
        &enabled,
        &BTreeMap::new(),
        &InjectConfig::default(),
        true,
    )
    .expect("ok")
    {
        Outcome::Skip(Skip::AlreadyInjected) => {}
        other => panic!("re-injection must be skipped: {other:?}"),
    }
}

#[test]
fn name_clashes_are_errors() {
    let mut p = app();
    p.spec.as_mut().expect("s").containers[0].name = PROXY_NAME.into();
    assert_eq!(
        mutate(&p, &InjectConfig::default(), true),
        Err(InjectError::NameClash(PROXY_NAME.into()))
    );
}

#[test]
fn agent_host_dir_is_recognised_however_written() {
    let dir = "/var/run/mizzen";
    for (path, within) in [
        ("/var/run/mizzen", true),
        ("/var/run/mizzen/", true),
        ("//var//run/./mizzen", true),
        ("/run/mizzen", true),
        ("/run/mizzen/agent.sock", true),
        ("/var/run/mizzen/sub/dir", true),
        ("/var/run", false),
        ("/var/run/mizzen2", false),
        ("/var/lib/mizzen", false),
        ("/", false),
    ] {
        assert_eq!(within_host_dir(path, dir), within, "{path}");
    }
}

fn with_app_mount(volume: &str) -> Pod {
    let mut p = app();
    let spec = p.spec.as_mut().expect("spec");
    spec.containers[0].volume_mounts = Some(vec![VolumeMount {
        name: volume.into(),
        mount_path: "/s".into(),
        ..Default::default()
    }]);
    p
}

#[test]
fn an_app_container_mounting_the_agent_socket_volume_is_refused() {
    // The hijack: the volume does not exist yet when the pod is sent; the
    // injector adds it, so the container would get the socket's directory.
    assert_eq!(
        mutate(&with_app_mount(SOCKET_VOLUME), &InjectConfig::default(), true),
        Err(InjectError::ReservedVolume {
            container: "app".into(),
            volume: SOCKET_VOLUME.into()
        })
    );
}

#[test]
fn an_init_container_mounting_the_token_volume_is_refused() {
    let mut p = app();
    p.spec.as_mut().expect("spec").init_containers = Some(vec![Container {
        name: "setup".into(),
        volume_mounts: Some(vec![VolumeMount {
            name: TOKEN_VOLUME.into(),
            mount_path: "/t".into(),
            ..Default::default()
        }]),
        ..Default::default()
    }]);
    assert!(matches!(
        mutate(&p, &InjectConfig::default(), false),
        Err(InjectError::ReservedVolume { container, .. }) if container == "setup"
    ));
}

#[test]
fn a_pod_hostpath_to_the_agent_directory_is_refused() {
    let mut p = with_app_mount("sock");
    p.spec.as_mut().expect("spec").volumes = Some(vec![Volume {
        name: "sock".into(),
        host_path: Some(HostPathVolumeSource {
            path: "/run/mizzen/".into(),
            type_: None,
        }),
        ..Default::default()
    }]);
    assert!(matches!(
        mutate(&p, &InjectConfig::default(), true),
        Err(InjectError::AgentHostPath { volume, .. }) if volume == "sock"
    ));
}

#[test]
fn the_proxy_mounts_the_agent_socket_read_only() {
    for native in [true, false] {
        let pod = mutate(&app(), &InjectConfig::default(), native).expect("injects");
        let spec = pod.spec.expect("spec");
        let proxy = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|c| c.name == PROXY_NAME)
            .expect("proxy");
        let mount = proxy
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == SOCKET_VOLUME)
            .expect("socket mount");
        assert_eq!(mount.read_only, Some(true), "native={native}");
    }
}

#[test]
fn the_proxy_image_annotation_is_refused_unless_the_mesh_allows_it() {
    let mut p = app();
    p.metadata.annotations = Some(labels(&[(ANN_PROXY_IMAGE, "evil.example/root-shell:1")]));
    assert!(matches!(
        mutate(&p, &InjectConfig::default(), true),
        Err(InjectError::Annotation {
            name: ANN_PROXY_IMAGE,
            ..
        })
    ));
    let allowed = InjectConfig {
        allow_proxy_image_annotation: true,
        ..InjectConfig::default()
    };
    let pod = mutate(&p, &allowed, true).expect("allowed by the mesh config");
    let images: Vec<_> = pod
        .spec
        .expect("spec")
        .init_containers
        .into_iter()
        .flatten()
        .filter_map(|c| c.image)
        .collect();
    assert!(images.iter().all(|i| i == "evil.example/root-shell:1"), "{images:?}");
}

#[test]
fn an_app_running_as_the_proxy_uid_is_refused() {
    for (container_uid, pod_gid) in [(Some(1337), None), (None, Some(1337))] {
        let mut p = app();
        let spec = p.spec.as_mut().expect("spec");
        spec.containers[0].security_context = Some(SecurityContext {
            run_as_user: container_uid,
            ..Default::default()
        });
        spec.security_context = Some(k8s_openapi::api::core::v1::PodSecurityContext {
            run_as_group: pod_gid,
            ..Default::default()
        });
        assert_eq!(
            mutate(&p, &InjectConfig::default(), true),
            Err(InjectError::ProxyUid {
                container: "app".into(),
                uid: 1337
            }),
            "uid {container_uid:?} gid {pod_gid:?}"
        );
    }
}

#[test]
fn quantities() {
    for ok in ["100m", "0.5", "1", "128Mi", "1Gi", "2e3", "1E+2"] {
        assert!(is_quantity(ok), "{ok}");
    }
    for bad in ["", "m", "1.2.3", "12XB", "-1", "1 Gi", "e3"] {
        assert!(!is_quantity(bad), "{bad}");
    }
}

/// For routes' sourceLabels, the proxy learns its pod's labels.
#[test]
fn the_proxy_is_told_the_pods_labels() {
    let patched = mutate(&app(), &InjectConfig::default(), true).expect("injects");
    let proxy = patched
        .spec
        .expect("spec")
        .init_containers
        .expect("init")
        .into_iter()
        .find(|c| c.name == "mizzen-proxy")
        .expect("proxy");
    let labels = proxy
        .env
        .into_iter()
        .flatten()
        .find(|e| e.name == POD_LABELS_ENV)
        .and_then(|e| e.value)
        .expect("labels env");
    let labels: BTreeMap<String, String> = serde_json::from_str(&labels).expect("JSON");
    assert_eq!(labels.get("app").map(String::as_str), Some("web"));
}
