//! Mizzen's real binaries as processes under test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::{Cluster, eventually_some, workspace_bin};

/// A running component, killed when dropped. Its standard output and error
/// go to `<cluster dir>/logs/<name>-<admin port>.log`.
#[derive(Debug)]
pub struct Daemon {
    child: tokio::process::Child,
    pub admin_port: u16,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts workspace binary `name` with `KUBECONFIG=kubeconfig`, `args`
    /// then `--admin-addr=127.0.0.1:<admin_port>`, and waits until its
    /// `/readyz` answers 200. Fails at once, with the log, if it exits.
    pub async fn start(name: &str, kubeconfig: &Path, admin_port: u16, args: &[String]) -> anyhow::Result<Self> {
        Self::start_program(&workspace_bin(name), kubeconfig, admin_port, args).await
    }

    /// [`Daemon::start`] with the binary at `program` (a release build, say).
    pub async fn start_program(
        program: &Path,
        kubeconfig: &Path,
        admin_port: u16,
        args: &[String],
    ) -> anyhow::Result<Self> {
        let name = program
            .file_name()
            .and_then(|n| n.to_str())
            .context("a program name")?
            .to_owned();
        let log = Cluster::get().dir().join(format!("logs/{name}-{admin_port}.log"));
        let out = std::fs::File::create(&log)?;
        let child = tokio::process::Command::new(program)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", format!("info,{}=debug", name.replace('-', "_")))
            .args(args)
            .arg(format!("--admin-addr=127.0.0.1:{admin_port}"))
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        let mut d = Daemon { child, admin_port, log };
        let url = format!("http://127.0.0.1:{admin_port}/readyz");
        // Ok(Some(Err)) stops waiting at once: the process is gone.
        let result = eventually_some(Duration::from_secs(60), &format!("{name} to be ready"), || {
            let url = url.clone();
            let exited = d.child.try_wait().ok().flatten();
            async move {
                if let Some(status) = exited {
                    return Ok(Some(Err(anyhow::anyhow!("exited: {status}"))));
                }
                let ready = http_get(&url).await.map(|(code, _)| code == 200).unwrap_or(false);
                Ok(ready.then_some(Ok(())))
            }
        })
        .await
        .and_then(|r| r);
        if let Err(e) = result {
            bail!("{name}: {e:#}\n--- log ---\n{}", d.log_text());
        }
        Ok(d)
    }

    /// The process ID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(http_get(&format!("http://127.0.0.1:{}/metrics", self.admin_port))
            .await?
            .1)
    }

    /// Sends SIGKILL and waits for the process to go.
    pub async fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}

/// A tiny HTTP/1.0 GET over plain TCP, for admin ports.
pub async fn http_get(url: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").context("http URL")?;
    let (host, path) = rest.split_once('/').context("path")?;
    let mut s = tokio::net::TcpStream::connect(host).await?;
    s.write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("status")?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// The sum of every sample of the metric whose line starts with `name`
/// (a name, or a name with `{labels}`).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']) || name.ends_with('}'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The sum of every sample whose line starts with `prefix`, such as a
/// metric with its first labels (`name{a="x"` matches any further labels).
pub fn metric_where(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The value of `series` in the proxy's metrics at `ip` (admin port
/// 15020), with the whole text for assertion messages.
pub async fn proxy_metric(ip: impl std::fmt::Display, series: &str) -> anyhow::Result<(f64, String)> {
    let (_, text) = http_get(&format!("http://{ip}:15020/metrics")).await?;
    Ok((metric(&text, series), text))
}
