//! `mizzen-proxy init` in real network namespaces with real iptables: the
//! effective rules, and where connections actually land.

use anyhow::{Context, bail};
use mizzen_tests::{NetnsPod, workspace_bin};

const APP_UID: u32 = 1000;
const PROXY_UID: u32 = 1337;

fn testapp() -> &'static str {
    env!("CARGO_BIN_EXE_mizzen-testapp")
}

/// Connects from `pod` as `uid` to `addr`; returns (server uid, server's local address).
async fn reach(pod: &NetnsPod, uid: u32, addr: &str) -> anyhow::Result<(String, String)> {
    let out = pod
        .command_as(uid, uid, testapp())
        .args(["connect", addr, "hi"])
        .output()
        .await?;
    if !out.status.success() {
        bail!("connect {addr} as {uid}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let reply = String::from_utf8_lossy(&out.stdout);
    let f: Vec<&str> = reply.split_whitespace().collect();
    match f.as_slice() {
        [uid, _peer, local, "hi"] => Ok((uid.to_string(), local.to_string())),
        _ => bail!("unexpected reply {reply:?}"),
    }
}

async fn nat_rules(pod: &NetnsPod) -> anyhow::Result<Vec<String>> {
    let out = pod
        .command("iptables-save")
        .args(["-t", "nat"])
        .output()
        .await
        .context("iptables-save (apt-get install iptables)")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("-A"))
        .map(str::to_owned)
        .collect())
}

#[tokio::test]
async fn init_captures_inbound_and_outbound_traffic() -> anyhow::Result<()> {
    let proxy_bin = workspace_bin("mizzen-proxy");
    let app = NetnsPod::create("init-app")?;
    let server = NetnsPod::create("init-server")?;
    let init_args = [
        "init",
        "--exclude-inbound-ports=15020,15021",
        "--exclude-outbound-ports=9999",
        "--ipv6=off",
    ];

    // --dry-run prints the rules and changes nothing.
    let dry = app
        .command(&proxy_bin)
        .args(init_args)
        .arg("--dry-run")
        .output()
        .await?;
    assert!(dry.status.success());
    assert!(String::from_utf8_lossy(&dry.stdout).contains("REDIRECT --to-ports 15001"));
    assert!(nat_rules(&app).await?.is_empty(), "dry run applied nothing");

    // Without the capability it fails, saying what is missing.
    let denied = app
        .command_as(APP_UID, APP_UID, &proxy_bin)
        .args(init_args)
        .output()
        .await?;
    assert!(!denied.status.success());
    let msg = String::from_utf8_lossy(&denied.stderr);
    assert!(msg.contains("NET_ADMIN"), "{msg}");

    // Applied twice: the same rules.
    for _ in 0..2 {
        let out = app.command(&proxy_bin).args(init_args).output().await?;
        assert!(out.status.success(), "init: {}", String::from_utf8_lossy(&out.stderr));
    }
    let rules = nat_rules(&app).await?;
    assert_eq!(
        rules.iter().filter(|r| r.contains("-j MIZZEN_INBOUND")).count(),
        1,
        "{rules:#?}"
    );
    assert_eq!(
        rules.iter().filter(|r| r.contains("-j MIZZEN_OUTPUT")).count(),
        1,
        "{rules:#?}"
    );
    assert_eq!(
        rules.iter().filter(|r| r.contains("--to-ports 15006")).count(),
        1,
        "{rules:#?}"
    );

    // Listeners: the "proxy" on 15001/15006/15021 as 1337, the app on
    // loopback, real servers in the other pod.
    let _outbound = app.spawn_echo(PROXY_UID, "0.0.0.0:15001").await?;
    let _inbound = app.spawn_echo(PROXY_UID, "0.0.0.0:15006").await?;
    let _health = app.spawn_echo(PROXY_UID, "0.0.0.0:15021").await?;
    let _local = app.spawn_echo(APP_UID, "127.0.0.1:8081").await?;
    let _srv = server.spawn_echo(APP_UID, "0.0.0.0:8080").await?;
    let _srv_excluded = server.spawn_echo(APP_UID, "0.0.0.0:9999").await?;
    let (a, s) = (app.ip(), server.ip());

    // The app's outbound connection lands on the outbound port (REDIRECT
    // of locally generated traffic targets 127.0.0.1; the proxy reads the
    // original destination with SO_ORIGINAL_DST).
    let (uid, local) = reach(&app, APP_UID, &format!("{s}:8080")).await?;
    assert_eq!((uid, local), ("1337".to_string(), "127.0.0.1:15001".to_string()));
    // The proxy's own connection goes out as it is.
    let (uid, local) = reach(&app, PROXY_UID, &format!("{s}:8080")).await?;
    assert_eq!((uid, local), (APP_UID.to_string(), format!("{s}:8080")));
    // Excluded outbound port and loopback: not captured.
    let (uid, _) = reach(&app, APP_UID, &format!("{s}:9999")).await?;
    assert_eq!(uid, APP_UID.to_string());
    let (uid, local) = reach(&app, APP_UID, "127.0.0.1:8081").await?;
    assert_eq!((uid, local), (APP_UID.to_string(), "127.0.0.1:8081".to_string()));
    // Inbound to any port lands on the inbound port; excluded ports do not.
    let (uid, local) = reach(&server, APP_UID, &format!("{a}:8080")).await?;
    assert_eq!((uid, local), ("1337".to_string(), format!("{a}:15006")));
    let (uid, local) = reach(&server, APP_UID, &format!("{a}:15021")).await?;
    assert_eq!((uid, local), ("1337".to_string(), format!("{a}:15021")));
    // Hairpin: the proxy reaching its own pod IP is handled as inbound.
    let (uid, local) = reach(&app, PROXY_UID, &format!("{a}:8080")).await?;
    assert_eq!((uid, local), ("1337".to_string(), "127.0.0.1:15006".to_string()));
    Ok(())
}
