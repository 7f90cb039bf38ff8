//! Packet captures in a pod's network namespace with tcpdump, read back
//! with tshark: what actually crossed the wire between pods.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::eventually;

/// A running tcpdump writing to a file.
#[derive(Debug)]
pub struct Capture {
    child: tokio::process::Child,
    file: PathBuf,
}

impl Capture {
    /// Captures packets matching `filter` on `eth0` of network namespace
    /// `netns` into `file`, once tcpdump reports it is listening.
    pub async fn start(netns: &str, filter: &str, file: PathBuf) -> anyhow::Result<Self> {
        let log = file.with_extension("log");
        let child = tokio::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                netns,
                "tcpdump",
                "-i",
                "eth0",
                "--immediate-mode",
                "-U",
                "-n",
                "-w",
            ])
            .arg(&file)
            .arg(filter)
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .context("tcpdump (scripts/deps.sh installs it: apt-get install tcpdump)")?;
        eventually(Duration::from_secs(20), "tcpdump to listen", || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            async move { Ok(text.contains("listening on")) }
        })
        .await?;
        Ok(Self { child, file })
    }

    /// Stops once the file holds more than `at_least` bytes (tcpdump
    /// writes each packet as it sees it).
    pub async fn stop(mut self, at_least: u64) -> anyhow::Result<Pcap> {
        let file = self.file.clone();
        eventually(Duration::from_secs(10), "tcpdump to write the exchange", || {
            let len = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
            async move { Ok(len > at_least) }
        })
        .await?;
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        Ok(Pcap { file: self.file })
    }
}

/// A finished capture.
#[derive(Debug)]
pub struct Pcap {
    file: PathBuf,
}

/// What tshark saw of the TLS on a port.
#[derive(Debug)]
pub struct TlsReport {
    /// The version each ServerHello negotiated (`0x0304` is TLS 1.3).
    pub server_versions: Vec<String>,
    /// The ALPN values each ClientHello offered.
    pub alpns: Vec<String>,
    /// Frames with a TCP payload that is not TLS.
    pub non_tls_frames: Vec<String>,
}

impl TlsReport {
    /// Ok when TLS was seen, every ServerHello negotiated TLS 1.3, every
    /// ClientHello offered exactly `alpn`, and every payload was TLS.
    pub fn only_tls13_with_alpn(&self, alpn: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.server_versions.is_empty() && self.server_versions.iter().all(|v| v == "0x0304"),
            "every ServerHello negotiates TLS 1.3: {self:?}"
        );
        anyhow::ensure!(
            !self.alpns.is_empty() && self.alpns.iter().all(|a| a == alpn),
            "every ClientHello offers ALPN {alpn}: {self:?}"
        );
        anyhow::ensure!(self.non_tls_frames.is_empty(), "every payload is TLS: {self:?}");
        Ok(())
    }
}

impl Pcap {
    /// The captured bytes.
    pub fn raw(&self) -> anyhow::Result<Vec<u8>> {
        Ok(std::fs::read(&self.file)?)
    }

    fn fields(&self, port: u16, filter: &str, field: &str) -> anyhow::Result<Vec<String>> {
        let out = std::process::Command::new("tshark")
            .arg("-r")
            .arg(&self.file)
            .args([
                "-d",
                &format!("tcp.port=={port},tls"),
                "-Y",
                filter,
                "-T",
                "fields",
                "-e",
                field,
            ])
            .output()
            .context("tshark (scripts/deps.sh installs it: apt-get install tshark)")?;
        anyhow::ensure!(out.status.success(), "tshark: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect())
    }

    /// The TLS seen on `port`, decoded as TLS whatever the port number.
    pub fn tls(&self, port: u16) -> anyhow::Result<TlsReport> {
        Ok(TlsReport {
            server_versions: self.fields(
                port,
                "tls.handshake.type == 2",
                "tls.handshake.extensions.supported_version",
            )?,
            alpns: self.fields(port, "tls.handshake.type == 1", "tls.handshake.extensions_alpn_str")?,
            non_tls_frames: self.fields(port, "tcp.len > 0 and not tls", "frame.number")?,
        })
    }
}
