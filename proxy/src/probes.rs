//! Kubelet's probes of the app, rewritten by the injector to
//! `/app-health/<container>/<livez|readyz|startupz>` on the admin port and
//! run here against the app's original probe (from `MIZZEN_APP_PROBES`), so
//! they work whatever the mTLS mode.
//!
//! HTTP GET and TCP probes are supported; a gRPC probe calls the standard
//! `grpc.health.v1.Health/Check`. Probes reach the app at the pod's IP, as
//! kubelet would, from source 127.0.0.6 like the proxy's inbound forwarding,
//! so the capture rules let them through to the app rather than back into
//! the proxy.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;

const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to the app: from the proxy's app-facing source (127.0.0.6, ::6,
/// which capture lets through) when the app is at the pod IP; loopback
/// targets and host names keep their own source.
async fn connect_app(host: &str, port: u16) -> Result<tokio::net::TcpStream, String> {
    match host.parse::<IpAddr>() {
        Ok(ip) if !ip.is_loopback() => {
            let dst = std::net::SocketAddr::new(ip, port);
            crate::net::connect_app(dst, PROBE_TIMEOUT)
                .await
                .map_err(|e| format!("connect {dst}: {e}"))
        }
        _ => tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("connect {host}:{port}: {e}")),
    }
}

/// An original probe, as the injector recorded it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub enum Probe {
    HttpGet(HttpGet),
    TcpSocket(TcpSocket),
    Grpc(Grpc),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpGet {
    #[serde(default)]
    pub path: Option<String>,
    pub port: serde_json::Value,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub http_headers: Vec<Header>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Header {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TcpSocket {
    pub port: serde_json::Value,
    #[serde(default)]
    pub host: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Grpc {
    pub port: u16,
    #[serde(default)]
    pub service: Option<String>,
}

/// The probes of a pod, by rewritten path.
#[derive(Debug, Clone, Default)]
pub struct Probes {
    by_path: BTreeMap<String, Probe>,
    pod_ip: Option<IpAddr>,
}

fn port(v: &serde_json::Value) -> Result<u16, String> {
    v.as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("probe port {v} is not a number (named ports are resolved by the injector)"))
}

impl Probes {
    /// Parses `MIZZEN_APP_PROBES` (a JSON object) and the pod IP.
    pub fn parse(json: Option<&str>, pod_ip: Option<IpAddr>) -> Result<Self, String> {
        let by_path = match json {
            None | Some("") => BTreeMap::new(),
            Some(j) => serde_json::from_str(j).map_err(|e| format!("MIZZEN_APP_PROBES is not valid: {e}"))?,
        };
        Ok(Self { by_path, pod_ip })
    }

    fn host(&self, explicit: Option<&str>) -> String {
        match (explicit, self.pod_ip) {
            (Some(h), _) if !h.is_empty() => h.to_owned(),
            (_, Some(ip)) => ip.to_string(),
            _ => "127.0.0.1".into(),
        }
    }

    /// Runs the probe behind `path`: Ok(()) when the app is healthy.
    pub async fn run(&self, path: &str) -> Result<(), (StatusCode, String)> {
        let probe = self
            .by_path
            .get(path)
            .ok_or((StatusCode::NOT_FOUND, format!("no probe {path}")))?;
        let fail = |e: String| (StatusCode::SERVICE_UNAVAILABLE, e);
        match probe {
            Probe::TcpSocket(t) => {
                let addr = format!("{}:{}", self.host(t.host.as_deref()), port(&t.port).map_err(fail)?);
                let host = self.host(t.host.as_deref());
                tokio::time::timeout(PROBE_TIMEOUT, connect_app(&host, port(&t.port).map_err(fail)?))
                    .await
                    .map_err(|_| fail(format!("connect {addr}: timed out")))?
                    .map_err(fail)?;
                Ok(())
            }
            Probe::HttpGet(h) => {
                if h.scheme.as_deref().is_some_and(|s| s.eq_ignore_ascii_case("https")) {
                    return Err(fail("HTTPS app probes are not supported yet".into()));
                }
                let host = self.host(h.host.as_deref());
                let p = port(&h.port).map_err(fail)?;
                let path = h.path.clone().unwrap_or_else(|| "/".into());
                http_status(&host, p, &path, &h.http_headers)
                    .await
                    .map_err(fail)
                    .and_then(|code| {
                        if (200..400).contains(&code) {
                            Ok(())
                        } else {
                            Err(fail(format!("app answered {code}")))
                        }
                    })
            }
            Probe::Grpc(g) => grpc_check(&self.host(None), g.port, g.service.clone().unwrap_or_default())
                .await
                .map_err(fail),
        }
    }
}

/// A plain HTTP/1.1 GET, as kubelet sends it; returns the status code.
async fn http_status(host: &str, port: u16, path: &str, headers: &[Header]) -> Result<u16, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = async {
        let mut s = connect_app(host, port).await?;
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/mizzen\r\nConnection: close\r\n"
        );
        for h in headers {
            if h.name.contains(['\r', '\n', ':']) || h.value.contains(['\r', '\n']) {
                return Err(format!("bad probe header {:?}", h.name));
            }
            req.push_str(&format!("{}: {}\r\n", h.name, h.value));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut head = vec![0u8; 64];
        let n = s.read(&mut head).await.map_err(|e| e.to_string())?;
        let line = String::from_utf8_lossy(&head[..n]);
        line.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("not an HTTP answer: {line:?}"))
    };
    tokio::time::timeout(PROBE_TIMEOUT, work)
        .await
        .map_err(|_| "timed out".to_string())?
}

async fn grpc_check(host: &str, port: u16, service: String) -> Result<(), String> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let local = host
        .parse::<IpAddr>()
        .ok()
        .filter(|ip| ip.is_ipv4() && !ip.is_loopback())
        .map(|_| crate::net::APP_SOURCE.into());
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{host}:{port}"))
        .map_err(|e| e.to_string())?
        .local_address(local)
        .timeout(PROBE_TIMEOUT)
        .connect_timeout(PROBE_TIMEOUT)
        .connect()
        .await
        .map_err(|e| format!("connect {host}:{port}: {e}"))?;
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest { service })
        .await
        .map_err(|s| format!("health check: {:?} {}", s.code(), s.message()))?;
    match resp.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => Err(format!("app reports {other:?}")),
    }
}

/// `GET /app-health/{container}/{kind}`.
pub async fn handler(
    State(probes): State<std::sync::Arc<Probes>>,
    Path((container, kind)): Path<(String, String)>,
) -> (StatusCode, String) {
    match probes.run(&format!("/app-health/{container}/{kind}")).await {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err((code, msg)) => (code, format!("{msg}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_injector_writes() {
        let json = r#"{"/app-health/api/readyz":{"httpGet":{"path":"/ready","port":8080}},
                       "/app-health/api/livez":{"tcpSocket":{"port":8080}},
                       "/app-health/api/startupz":{"grpc":{"port":9090}}}"#;
        let p = Probes::parse(Some(json), None).expect("valid");
        assert!(matches!(p.by_path["/app-health/api/readyz"], Probe::HttpGet(_)));
        assert!(matches!(p.by_path["/app-health/api/livez"], Probe::TcpSocket(_)));
        assert!(matches!(
            p.by_path["/app-health/api/startupz"],
            Probe::Grpc(Grpc { port: 9090, .. })
        ));
        assert!(Probes::parse(Some("{"), None).is_err());
        assert!(Probes::parse(None, None).expect("none").by_path.is_empty());
    }

    #[tokio::test]
    async fn http_and_tcp_probes_follow_the_app() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]);
                let code = if req.starts_with("GET /ok ") {
                    "200 OK"
                } else {
                    "500 Internal Server Error"
                };
                let _ = s
                    .write_all(format!("HTTP/1.1 {code}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let json = format!(
            r#"{{"/app-health/a/readyz":{{"httpGet":{{"path":"/ok","port":{port}}}}},
                "/app-health/a/livez":{{"httpGet":{{"path":"/bad","port":{port}}}}},
                "/app-health/a/startupz":{{"tcpSocket":{{"port":{port}}}}},
                "/app-health/b/readyz":{{"tcpSocket":{{"port":1}}}}}}"#
        );
        let p = Probes::parse(Some(&json), Some("127.0.0.1".parse().expect("ip"))).expect("valid");
        assert!(p.run("/app-health/a/readyz").await.is_ok());
        assert_eq!(
            p.run("/app-health/a/livez").await.map_err(|e| e.0),
            Err(StatusCode::SERVICE_UNAVAILABLE)
        );
        assert!(p.run("/app-health/a/startupz").await.is_ok());
        assert_eq!(
            p.run("/app-health/b/readyz").await.map_err(|e| e.0),
            Err(StatusCode::SERVICE_UNAVAILABLE)
        );
        assert_eq!(
            p.run("/app-health/nope/readyz").await.map_err(|e| e.0),
            Err(StatusCode::NOT_FOUND)
        );
    }
}
