//! What a user installs: the images of `scripts/images.sh`, read back by
//! independent tools (umoci, skopeo), and `manifests/install.yaml`, kept in
//! sync with the per-component manifests. The mesh running from both on a
//! real node is `real_node.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, bail};
use mizzen_tests::cluster::repo_root;

const IMAGES: [&str; 5] = [
    "mizzen-proxy",
    "mizzen-ca",
    "mizzen-agent",
    "mizzen-injector",
    "mizzen-testapp",
];

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `scripts/images.sh --prebuilt` run twice into fresh directories (the
/// same binaries).
fn built_twice() -> &'static (PathBuf, PathBuf) {
    static BUILT: OnceLock<Result<(PathBuf, PathBuf), String>> = OnceLock::new();
    let res = BUILT.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("mizzen-images-test-{}", std::process::id()));
        mizzen_tests::reaper::at_exit(&format!(
            "rm -rf {}",
            mizzen_tests::reaper::shell_quote(&base.display().to_string())
        ));
        let build = |n: &str| -> Result<PathBuf, String> {
            let out = base.join(n);
            // Packaging only: scripts/test.sh built the release binaries.
            run(Command::new(repo_root().join("scripts/images.sh"))
                .arg("--prebuilt")
                .arg(&out))
            .map_err(|e| e.to_string())?;
            Ok(out)
        };
        Ok((build("first")?, build("second")?))
    });
    match res {
        Ok(dirs) => dirs,
        Err(e) => panic!("scripts/images.sh failed: {e}"),
    }
}

/// Unpacks image `name` of `dir` with umoci (not our script) into
/// `dir/unpack-<name>-<what>`; returns the bundle (`config.json`, `rootfs/`).
fn unpack(dir: &Path, name: &str, what: &str) -> anyhow::Result<PathBuf> {
    let work = dir.join(format!("unpack-{name}-{what}"));
    std::fs::create_dir_all(work.join("layout"))?;
    run(Command::new("tar")
        .arg("-xf")
        .arg(dir.join(format!("{name}.tar")))
        .arg("-C")
        .arg(work.join("layout")))?;
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!(
            "{}:{}",
            work.join("layout").display(),
            env!("CARGO_PKG_VERSION")
        ))
        .arg(work.join("bundle")))?;
    Ok(work.join("bundle"))
}

fn listing(dir: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(dir.join("images.txt")).with_context(|| format!("read {}/images.txt", dir.display()))
}

#[test]
fn images_built_twice_from_the_same_binaries_have_the_same_digests() -> anyhow::Result<()> {
    let (first, second) = built_twice();
    let (a, b) = (listing(first)?, listing(second)?);
    assert_eq!(a.lines().count(), IMAGES.len(), "one line per image: {a}");
    assert_eq!(a, b, "the same digests");
    for name in IMAGES {
        let x = std::fs::read(first.join(format!("{name}.tar")))?;
        let y = std::fs::read(second.join(format!("{name}.tar")))?;
        assert!(x == y, "{name}.tar is byte-for-byte the same");
    }
    Ok(())
}

#[test]
fn every_image_runs_its_entrypoint_inside_its_own_root_filesystem() -> anyhow::Result<()> {
    let (dir, _) = built_twice();
    let version = env!("CARGO_PKG_VERSION");
    for name in IMAGES {
        let bundle = unpack(dir, name, "version")?;
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(bundle.join("config.json"))?)?;
        let entry = config["process"]["args"][0]
            .as_str()
            .with_context(|| format!("{name} has an entrypoint"))?
            .to_owned();
        let out = run(Command::new("chroot")
            .arg(bundle.join("rootfs"))
            .arg(&entry)
            .arg("--version"))?;
        assert_eq!(
            out.trim(),
            format!("{name} {version}"),
            "{entry} --version in {name}'s own root filesystem"
        );
    }
    Ok(())
}

#[test]
fn the_proxy_image_carries_iptables_on_both_backends_for_its_init_container() -> anyhow::Result<()> {
    let (dir, _) = built_twice();
    let root = unpack(dir, "mizzen-proxy", "tools")?.join("rootfs");
    for tool in [
        "iptables-restore",
        "ip6tables-restore",
        "iptables-legacy-restore",
        "ip6tables-legacy-save",
    ] {
        let out = run(Command::new("chroot")
            .arg(&root)
            .arg(format!("/usr/sbin/{tool}"))
            .arg("--version"))?;
        let backend = if tool.contains("legacy") { "legacy" } else { "nf_tables" };
        assert!(out.contains(backend), "{tool} runs in the image ({backend}): {out}");
    }
    let ip = run(Command::new("chroot").arg(&root).args(["/usr/sbin/ip", "-V"]))?;
    assert!(ip.contains("iproute2"), "ip runs in the image: {ip}");
    Ok(())
}

#[test]
fn skopeo_reads_each_archive_with_the_digest_the_script_reported() -> anyhow::Result<()> {
    let (dir, _) = built_twice();
    let listing = listing(dir)?;
    for line in listing.lines() {
        let [archive, reference, digest] = line.split(' ').collect::<Vec<_>>()[..] else {
            bail!("bad images.txt line {line:?}");
        };
        let out = run(Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci-archive:{}", dir.join(archive).display())))?;
        let inspect: serde_json::Value = serde_json::from_str(&out)?;
        assert_eq!(inspect["Digest"], digest, "{reference}: {inspect}");
        let tag = reference.rsplit_once(':').map(|(_, t)| t).unwrap_or_default();
        assert_eq!(
            inspect["Labels"]["org.opencontainers.image.version"], tag,
            "{reference} is labelled with its version"
        );
    }
    Ok(())
}

#[test]
fn install_yaml_is_generated_from_the_component_manifests() -> anyhow::Result<()> {
    let fresh = std::env::temp_dir().join(format!("mizzen-install-{}.yaml", std::process::id()));
    run(Command::new(repo_root().join("scripts/manifests.sh")).arg(&fresh))?;
    let generated = std::fs::read_to_string(&fresh)?;
    std::fs::remove_file(&fresh)?;
    let committed = std::fs::read_to_string(repo_root().join("manifests/install.yaml"))?;
    assert!(
        generated == committed,
        "manifests/install.yaml is stale: run scripts/manifests.sh and commit it"
    );
    // Every component's objects are in it.
    for kind in [
        "kind: CustomResourceDefinition",
        "kind: DaemonSet",
        "kind: MutatingWebhookConfiguration",
        "kind: ValidatingAdmissionPolicy",
        "kind: PodDisruptionBudget",
    ] {
        assert!(committed.contains(kind), "install.yaml has a {kind}");
    }
    Ok(())
}
