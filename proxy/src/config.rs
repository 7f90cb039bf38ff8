//! The proxy's timeouts and limits, typed, with their defaults in one place.

use std::time::Duration;

/// How long each step of a connection may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Outbound: TCP connect to an endpoint, and then its TLS handshake.
    pub connect: Duration,
    /// Inbound: a peer proxy's TLS handshake, after its ClientHello.
    pub handshake: Duration,
    /// Inbound: connecting to the app on the pod's own address.
    pub app_connect: Duration,
    /// Inbound: a new connection's first bytes (a whole ClientHello).
    pub detect: Duration,
    /// Outbound, on a Service port whose protocol is not declared: how long
    /// the app has to send its first bytes before the connection is
    /// treated as TCP (server-first protocols wait this long once).
    pub sniff: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            handshake: Duration::from_secs(10),
            app_connect: Duration::from_secs(5),
            detect: Duration::from_secs(5),
            sniff: Duration::from_millis(300),
        }
    }
}
