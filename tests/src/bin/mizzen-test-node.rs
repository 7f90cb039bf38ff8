//! `mizzen-test-node`: the tests' kubelet stand-in as a program, so that a
//! local control plane (`scripts/run-local.sh up`) runs meshed pods.
//!
//! ```text
//! mizzen-test-node --node NAME --pods-dir DIR
//!                  [--image NAME=BINARY]... [--host-path PATH=DIR]...
//! ```
//! Registers node NAME and runs the pods bound to it as processes in
//! network namespaces (see `mizzen_tests::node`), with the cluster from
//! KUBECONFIG. Images whose repository ends in NAME run BINARY; hostPath
//! volumes at PATH mount DIR. Container logs go to
//! `DIR/<namespace>_<pod>/<container>.log`. Runs until SIGINT or SIGTERM,
//! then stops every pod's processes and removes their namespaces. Needs
//! root.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use mizzen_tests::node::{Images, Node};

const USAGE: &str =
    "usage: mizzen-test-node --node NAME --pods-dir DIR [--image NAME=BINARY]... [--host-path PATH=DIR]...";

fn pair(v: &str, what: &str) -> Result<(String, PathBuf), String> {
    let (k, p) = v
        .split_once('=')
        .ok_or_else(|| format!("{what} {v:?} is not NAME=PATH\n{USAGE}"))?;
    Ok((k.to_owned(), PathBuf::from(p)))
}

async fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let (mut node, mut dir) = (None, None);
    let mut images = Images::new();
    let mut host_paths = HashMap::new();
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value\n{USAGE}"));
        match a.as_str() {
            "--node" => node = Some(value()?),
            "--pods-dir" => dir = Some(PathBuf::from(value()?)),
            "--image" => {
                let (name, bin) = pair(&value()?, "--image")?;
                if !bin.exists() {
                    return Err(format!("--image {name}: {} does not exist", bin.display()));
                }
                images = images.with(&name, bin);
            }
            "--host-path" => {
                let (path, d) = pair(&value()?, "--host-path")?;
                host_paths.insert(path, d);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let (Some(node), Some(dir)) = (node, dir) else {
        return Err(USAGE.into());
    };
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("connect to the cluster (KUBECONFIG): {e}"))?;
    let running = Node::start_with(client, &node, images, host_paths, dir.clone())
        .await
        .map_err(|e| format!("{e:#}"))?;
    eprintln!(
        "mizzen-test-node: running pods bound to node {node}; logs under {}",
        dir.display()
    );
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(|e| e.to_string())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("mizzen-test-node: stopping");
    drop(running);
    // Let the aborted pod tasks drop their processes and namespaces.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mizzen-test-node: {e}");
            ExitCode::FAILURE
        }
    }
}
