//! Pods as Linux network namespaces.
//!
//! Each [`NetnsPod`] is a network namespace with loopback up and an `eth0`
//! veth whose peer is attached to a per-process test bridge in the root
//! namespace. The bridge holds the gateway address (the "node" IP, where
//! kubelet probes would come from) and every pod gets the next address of
//! the bridge's /24, with a default route through the gateway. Pods on one
//! bridge reach each other directly.
//!
//! Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN), `ip` from iproute2 and
//! `setpriv` from util-linux; `scripts/test.sh` installs them.

use std::net::Ipv4Addr;
use std::process::Command as StdCommand;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, bail};

use crate::reaper::{self, shell_quote};

/// Runs a command to completion, failing with its standard error.
fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = StdCommand::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}: install it (apt-get install iproute2 util-linux)"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The per-process test bridge.
#[derive(Debug)]
struct Bridge {
    name: String,
    /// First three octets of the bridge's /24.
    prefix: [u8; 3],
    /// Host suffixes handed out so far (.1 is the gateway).
    next_host: Mutex<u8>,
}

static BRIDGE: OnceLock<Result<Bridge, String>> = OnceLock::new();
static POD_SEQ: AtomicU32 = AtomicU32::new(0);

fn create_bridge() -> anyhow::Result<Bridge> {
    let uid = run("id", &["-u"])?;
    if uid.trim() != "0" {
        bail!(
            "network-namespace pods need root (running as uid {}); run the tests as root",
            uid.trim()
        );
    }
    let pid = std::process::id();
    let name = format!("mzbr{pid:x}");
    // A /24 under 10.200.0.0/13 derived from the pid, skipping ones in use.
    let routes = run("ip", &["-4", "route", "show"])?;
    let base = pid % 2048;
    let prefix = (0..2048)
        .map(|i| {
            let n = (base + i) % 2048;
            [10u8, 200 + (n / 256) as u8, (n % 256) as u8]
        })
        .find(|p| !routes.contains(&format!("{}.{}.{}.", p[0], p[1], p[2])))
        .context("no free /24 under 10.200.0.0/13 for the test bridge")?;
    reaper::at_exit(&format!("ip link del {} 2>/dev/null", shell_quote(&name)));
    run("ip", &["link", "add", &name, "type", "bridge"])?;
    let gw = format!("{}.{}.{}.1/24", prefix[0], prefix[1], prefix[2]);
    run("ip", &["addr", "add", &gw, "dev", &name])?;
    // An IPv6 ULA /64 for dual-stack pods, without duplicate address
    // detection (which would leave addresses unusable for a second).
    let gw6 = format!("{}1/64", v6_prefix(prefix));
    run("ip", &["-6", "addr", "add", &gw6, "dev", &name, "nodad"])?;
    run("ip", &["link", "set", &name, "up"])?;
    Ok(Bridge {
        name,
        prefix,
        next_host: Mutex::new(1),
    })
}

/// The bridge's IPv6 /64, as `fd00:<a><b>:<c>::` (ending in `::`).
fn v6_prefix(p: [u8; 3]) -> String {
    format!("fd00:{:02x}{:02x}:{:02x}::", p[0], p[1], p[2])
}

fn bridge() -> anyhow::Result<&'static Bridge> {
    BRIDGE
        .get_or_init(|| create_bridge().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("cannot create the test bridge: {e}"))
}

/// The test bridge's gateway address in the root namespace: where pods
/// reach a server the test runs itself (creating the bridge if needed).
pub fn bridge_gateway() -> anyhow::Result<Ipv4Addr> {
    let p = bridge()?.prefix;
    Ok(Ipv4Addr::new(p[0], p[1], p[2], 1))
}

/// A pod's network: a network namespace with its own IP on the test bridge.
/// Dropping it kills every process left in the namespace and deletes it.
#[derive(Debug)]
pub struct NetnsPod {
    netns: String,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
    ip6: Option<std::net::Ipv6Addr>,
}

impl NetnsPod {
    /// Creates a network namespace named after `label` (for humans reading
    /// `ip netns`), wired to the test bridge.
    pub fn create(label: &str) -> anyhow::Result<Self> {
        Self::create_with(label, false)
    }

    /// Like [`create`](Self::create), with an IPv6 address and route too.
    pub fn create_dual_stack(label: &str) -> anyhow::Result<Self> {
        Self::create_with(label, true)
    }

    fn create_with(label: &str, dual_stack: bool) -> anyhow::Result<Self> {
        let br = bridge()?;
        let host = {
            let mut next = br.next_host.lock().unwrap_or_else(|p| p.into_inner());
            if *next >= 254 {
                bail!("the test bridge has no free addresses left");
            }
            *next += 1;
            *next
        };
        let [a, b, c] = br.prefix;
        let ip = Ipv4Addr::new(a, b, c, host);
        let gateway = Ipv4Addr::new(a, b, c, 1);
        let pid = std::process::id();
        let seq = POD_SEQ.fetch_add(1, Ordering::Relaxed);
        let label: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' })
            .take(40)
            .collect();
        let netns = format!("mizzen-{pid}-{seq}-{label}");
        // Interface names are limited to 15 bytes.
        let host_if = format!("mzv{pid:x}-{host}");
        let tmp_if = format!("mzp{pid:x}-{host}");
        let ip6 = dual_stack
            .then(|| format!("{}{host:x}", v6_prefix(br.prefix)).parse::<std::net::Ipv6Addr>())
            .transpose()?;
        let pod = NetnsPod {
            netns,
            ip,
            gateway,
            ip6,
        };
        reaper::at_exit(&cleanup_command(&pod.netns));
        let ns = pod.netns.as_str();
        run("ip", &["netns", "add", ns])?;
        run(
            "ip",
            &["link", "add", &host_if, "type", "veth", "peer", "name", &tmp_if],
        )?;
        run("ip", &["link", "set", &host_if, "master", &br.name, "up"])?;
        run("ip", &["link", "set", &tmp_if, "netns", ns])?;
        let in_ns = |args: &[&str]| -> anyhow::Result<String> {
            let mut full = vec!["netns", "exec", ns, "ip"];
            full.extend_from_slice(args);
            run("ip", &full)
        };
        in_ns(&["link", "set", &tmp_if, "name", "eth0"])?;
        in_ns(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        in_ns(&["link", "set", "eth0", "up"])?;
        in_ns(&["link", "set", "lo", "up"])?;
        in_ns(&["route", "add", "default", "via", &gateway.to_string()])?;
        if let Some(ip6) = pod.ip6 {
            in_ns(&["-6", "addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])?;
            in_ns(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("{}1", v6_prefix(br.prefix)),
            ])?;
        }
        Ok(pod)
    }

    /// The pod's IP on the test bridge.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The pod's IPv6 address, for a dual-stack pod.
    pub fn ip6(&self) -> Option<std::net::Ipv6Addr> {
        self.ip6
    }

    /// The bridge address in the root namespace (the node's IP, seen from
    /// the pod).
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// The network namespace's name (`ip netns exec <name> ...`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// A command that runs `program` as root inside the pod's network
    /// namespace. The child is killed when the returned command's child
    /// handle is dropped.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.netns]).arg(program).kill_on_drop(true);
        cmd
    }

    /// A command that runs `program` inside the pod's network namespace as
    /// `uid`:`gid` with no supplementary groups and no capabilities.
    pub fn command_as(&self, uid: u32, gid: u32, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.netns, "setpriv"])
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .args(["--clear-groups", "--inh-caps=-all", "--"])
            .arg(program)
            .kill_on_drop(true);
        cmd
    }
}

impl NetnsPod {
    /// Starts `mizzen-testapp echo-server addr` in the pod as `uid` and waits
    /// until it listens. The server lives as long as the returned child.
    pub async fn spawn_echo(&self, uid: u32, addr: &str) -> anyhow::Result<tokio::process::Child> {
        use tokio::io::AsyncBufReadExt;
        let mut child = self
            .command_as(uid, uid, crate::workspace_bin("mizzen-testapp"))
            .args(["echo-server", addr])
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().context("echo server stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let first = tokio::time::timeout(std::time::Duration::from_secs(20), lines.next_line())
            .await
            .context("echo server start timed out")??;
        if !first.as_deref().unwrap_or("").starts_with("listening") {
            bail!("echo server on {addr} did not start: {first:?}");
        }
        Ok(child)
    }

    /// Runs `mizzen-proxy init` (IPv6 too when the pod has it; the proxy's ports excluded) in the pod.
    pub async fn capture(&self) -> anyhow::Result<()> {
        let out = self
            .command(crate::workspace_bin("mizzen-proxy"))
            .args(["init", "--exclude-inbound-ports=15020,15021", "--ipv6=auto"])
            .output()
            .await?;
        if !out.status.success() {
            bail!("mizzen-proxy init: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}

fn cleanup_command(netns: &str) -> String {
    let q = shell_quote(netns);
    format!("ip netns pids {q} 2>/dev/null | xargs -r kill -9 2>/dev/null; ip netns del {q} 2>/dev/null")
}

impl Drop for NetnsPod {
    fn drop(&mut self) {
        // Deleting the namespace also deletes its veth and the bridge-side peer.
        let _ = StdCommand::new("sh")
            .arg("-c")
            .arg(cleanup_command(&self.netns))
            .status();
    }
}
