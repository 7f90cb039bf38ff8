//! `mizzen-proxy init`: the pod's traffic capture, written to the nat table
//! with `iptables-restore` in one transaction per address family.
//!
//! - Inbound TCP is redirected to the inbound port (15006), except the
//!   proxy's own ports and excluded ports.
//! - Outbound TCP is redirected to the outbound port (15001), except traffic
//!   of the proxy's UID or GID, loopback, excluded ports and CIDRs.
//! - The proxy forwards inbound connections to the app from 127.0.0.6 (::6),
//!   which is never captured again.
//! - Hairpin: the proxy connecting to its own pod's IP (a pod calling itself
//!   through a Service) leaves through `lo`; that is sent to the inbound
//!   port so it is handled as inbound traffic.
//!
//! [`rules`] is pure; [`apply`] runs the tools. Running it twice leaves the
//! same rules: our chains are flushed and refilled, and the jumps into them
//! are added only when missing.

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

/// What to capture and what to leave alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitConfig {
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_outbound_cidrs: Vec<(IpAddr, u8)>,
}

/// IPv4 or IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }
    fn save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }
    /// The source the proxy uses towards the app.
    fn inbound_source(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.6/32",
            Family::V6 => "::6/128",
        }
    }
    fn localhost(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }
}

const CHAINS: [&str; 4] = [
    "MIZZEN_INBOUND",
    "MIZZEN_IN_REDIRECT",
    "MIZZEN_OUTPUT",
    "MIZZEN_REDIRECT",
];
/// The jumps from the built-in chains into ours.
const JUMPS: [(&str, &str); 2] = [("PREROUTING", "MIZZEN_INBOUND"), ("OUTPUT", "MIZZEN_OUTPUT")];

/// Parses `a.b.c.d/n` or `x::/n`.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (ip, len) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not a CIDR (address/prefix)"))?;
    let ip: IpAddr = ip.parse().map_err(|_| format!("{s:?} has a bad address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    match len.parse::<u8>() {
        Ok(l) if l <= max => Ok((ip, l)),
        _ => Err(format!("{s:?} has a bad prefix length")),
    }
}

/// The `iptables-restore --noflush` input for `family`.
pub fn rules(cfg: &InitConfig, family: Family) -> String {
    let mut r = String::from("*nat\n");
    for c in CHAINS {
        r.push_str(&format!(":{c} - [0:0]\n"));
    }
    // Inbound. The proxy's own capture ports are never redirected: a
    // connection to podIP:15006 redirected to 15006 would have the proxy
    // forward it to itself, again and again. Uncaptured, it reaches the
    // listener directly, which refuses it (see `net::captured_dst`).
    let mut not_captured = vec![cfg.inbound_port, cfg.outbound_port];
    not_captured.extend(&cfg.exclude_inbound_ports);
    not_captured.sort_unstable();
    not_captured.dedup();
    for p in not_captured {
        r.push_str(&format!("-A MIZZEN_INBOUND -p tcp --dport {p} -j RETURN\n"));
    }
    r.push_str("-A MIZZEN_INBOUND -p tcp -j MIZZEN_IN_REDIRECT\n");
    r.push_str(&format!(
        "-A MIZZEN_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}\n",
        cfg.inbound_port
    ));
    r.push_str(&format!(
        "-A MIZZEN_REDIRECT -p tcp -j REDIRECT --to-ports {}\n",
        cfg.outbound_port
    ));
    // Outbound: the proxy's own forwarding to the app is never captured.
    r.push_str(&format!(
        "-A MIZZEN_OUTPUT -s {} -o lo -j RETURN\n",
        family.inbound_source()
    ));
    for (owner, id) in [("--uid-owner", cfg.proxy_uid), ("--gid-owner", cfg.proxy_gid)] {
        // Hairpin: the proxy reaching its own pod IP goes through lo.
        r.push_str(&format!(
            "-A MIZZEN_OUTPUT ! -d {} -o lo -m owner {owner} {id} -j MIZZEN_IN_REDIRECT\n",
            family.localhost()
        ));
        // The app talking to itself over loopback stays local.
        r.push_str(&format!("-A MIZZEN_OUTPUT -o lo -m owner ! {owner} {id} -j RETURN\n"));
        // Everything else the proxy sends goes out as it is.
        r.push_str(&format!("-A MIZZEN_OUTPUT -m owner {owner} {id} -j RETURN\n"));
    }
    r.push_str(&format!("-A MIZZEN_OUTPUT -d {} -j RETURN\n", family.localhost()));
    for p in &cfg.exclude_outbound_ports {
        r.push_str(&format!("-A MIZZEN_OUTPUT -p tcp --dport {p} -j RETURN\n"));
    }
    for (ip, len) in &cfg.exclude_outbound_cidrs {
        if ip.is_ipv4() == (family == Family::V4) {
            r.push_str(&format!("-A MIZZEN_OUTPUT -d {ip}/{len} -j RETURN\n"));
        }
    }
    r.push_str("-A MIZZEN_OUTPUT -p tcp -j MIZZEN_REDIRECT\n");
    r.push_str("COMMIT\n");
    r
}

/// The jump rules `rules` needs in the built-in chains, for those missing
/// from `saved` (the output of `iptables-save -t nat`).
pub fn missing_jumps(saved: &str) -> Vec<String> {
    JUMPS
        .iter()
        .map(|(from, to)| format!("-A {from} -p tcp -j {to}"))
        .filter(|rule| !saved.lines().any(|l| l.trim() == rule))
        .collect()
}

/// Why the rules could not be written.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{tool} is not installed: the init image needs iptables and iproute2 (apt-get install iptables iproute2)")]
    Missing { tool: &'static str },
    #[error(
        "{tool} failed ({status}): {stderr}{hint}",
        hint = if stderr.contains("ermission denied") || stderr.contains("Operation not permitted") {
            " — the init container needs the NET_ADMIN and NET_RAW capabilities"
        } else { "" }
    )]
    Failed {
        tool: &'static str,
        status: String,
        stderr: String,
    },
}

fn run(tool: &'static str, args: &[&str], stdin: Option<&str>) -> Result<String, InitError> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => InitError::Missing { tool },
            _ => InitError::Failed {
                tool,
                status: "not started".into(),
                stderr: e.to_string(),
            },
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(|e| InitError::Failed {
            tool,
            status: "stdin".into(),
            stderr: e.to_string(),
        })?;
    }
    let out = child.wait_with_output().map_err(|e| InitError::Failed {
        tool,
        status: "wait".into(),
        stderr: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(InitError::Failed {
            tool,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes the rules for `family` and returns what was applied.
pub fn apply(cfg: &InitConfig, family: Family) -> Result<String, InitError> {
    let saved = run(family.save(), &["-t", "nat"], None)?;
    let mut input = rules(cfg, family);
    let jumps = missing_jumps(&saved);
    if !jumps.is_empty() {
        let at = input.rfind("COMMIT").unwrap_or(input.len());
        input.insert_str(at, &(jumps.join("\n") + "\n"));
    }
    run(family.restore(), &["--noflush"], Some(&input))?;
    if family == Family::V6 {
        // IPv4's 127.0.0.6 is loopback already; ::6 must be added, or the
        // app's replies to the proxy's ::6 connections would be routed away.
        run("ip", &["-6", "addr", "replace", "::6/128", "dev", "lo"], None)?;
    }
    Ok(input)
}

/// Whether this network namespace has a non-loopback IPv6 address.
pub fn has_ipv6() -> bool {
    std::fs::read_to_string("/proc/net/if_inet6")
        .map(|t| {
            t.lines()
                .any(|l| !l.trim_end().ends_with(" lo") && !l.starts_with("fe80"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> InitConfig {
        InitConfig {
            proxy_uid: 1337,
            proxy_gid: 1337,
            inbound_port: 15006,
            outbound_port: 15001,
            exclude_inbound_ports: vec![15020, 15021],
            exclude_outbound_ports: vec![5432],
            exclude_outbound_cidrs: vec![
                parse_cidr("10.96.0.0/12").expect("v4"),
                parse_cidr("fd00::/8").expect("v6"),
            ],
        }
    }

    #[test]
    fn v4_rules() {
        let r = rules(&cfg(), Family::V4);
        for want in [
            "-A MIZZEN_INBOUND -p tcp --dport 15021 -j RETURN",
            "-A MIZZEN_INBOUND -p tcp --dport 15006 -j RETURN",
            "-A MIZZEN_INBOUND -p tcp --dport 15001 -j RETURN",
            "-A MIZZEN_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "-A MIZZEN_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-A MIZZEN_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN",
            "-A MIZZEN_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 1337 -j MIZZEN_IN_REDIRECT",
            "-A MIZZEN_OUTPUT -m owner --gid-owner 1337 -j RETURN",
            "-A MIZZEN_OUTPUT -p tcp --dport 5432 -j RETURN",
            "-A MIZZEN_OUTPUT -d 10.96.0.0/12 -j RETURN",
        ] {
            assert!(r.lines().any(|l| l == want), "missing {want:?} in\n{r}");
        }
        assert!(!r.contains("fd00::"), "no IPv6 CIDR in IPv4 rules");
        assert!(r.starts_with("*nat\n") && r.ends_with("COMMIT\n"));
        // The final catch-all comes after every exception.
        let last = r.lines().rfind(|l| l.starts_with("-A MIZZEN_OUTPUT"));
        assert_eq!(last, Some("-A MIZZEN_OUTPUT -p tcp -j MIZZEN_REDIRECT"));
    }

    #[test]
    fn v6_rules() {
        let r = rules(&cfg(), Family::V6);
        assert!(r.contains("-A MIZZEN_OUTPUT -s ::6/128 -o lo -j RETURN"));
        assert!(r.contains("-A MIZZEN_OUTPUT -d fd00::/8 -j RETURN"));
        assert!(!r.contains("10.96.0.0"));
    }

    #[test]
    fn jumps_are_added_once() {
        assert_eq!(missing_jumps("").len(), 2);
        let saved = "*nat\n-A PREROUTING -p tcp -j MIZZEN_INBOUND\n-A OUTPUT -p tcp -j MIZZEN_OUTPUT\nCOMMIT\n";
        assert!(missing_jumps(saved).is_empty());
    }

    #[test]
    fn cidrs() {
        assert!(parse_cidr("10.0.0.0/8").is_ok());
        for bad in ["10.0.0.0", "10.0.0.0/33", "x/8", "::/129"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }
}
