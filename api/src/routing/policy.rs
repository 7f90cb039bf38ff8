//! What a route's fault and retry settings decide for one request, as pure
//! functions the proxy calls: whether to delay or abort it, and whether a
//! failed attempt may be tried again.

use std::time::Duration;

use super::{Fault, Retries};

/// Whether a share of `millionths` applies to a request whose roll
/// (uniform over `u32`) is `roll`.
pub fn applies(millionths: u32, roll: u32) -> bool {
    // Scaled like route weights: `millionths` of every million rolls.
    (u64::from(roll) * 1_000_000) >> 32 < u64::from(millionths)
}

impl Fault {
    /// The delay to inject before forwarding, for a request that rolled
    /// `roll`.
    pub fn delay_for(&self, roll: u32) -> Option<Duration> {
        self.delay.filter(|(_, share)| applies(*share, roll)).map(|(d, _)| d)
    }

    /// The status to answer with instead of forwarding (Istio's flag `FI`),
    /// for a request that rolled `roll`. Delay and abort roll separately,
    /// as Envoy does.
    pub fn abort_for(&self, roll: u32) -> Option<u16> {
        self.abort.filter(|(_, share)| applies(*share, roll)).map(|(s, _)| s)
    }
}

/// How an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection to the endpoint: nothing was sent.
    Connect,
    /// The endpoint refused the stream (HTTP/2 REFUSED_STREAM): not sent.
    RefusedStream,
    /// The connection or stream was reset after the request left.
    Reset,
    /// An answer with this status.
    Status(u16),
}

/// Methods whose repetition has the effect of one request (RFC 9110 9.2.2).
fn idempotent(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE")
}

impl Retries {
    /// Whether `failure` of attempt number `attempt` (1 for the first try)
    /// of a `method` request may be retried under these settings.
    ///
    /// A request that may have reached the app is retried only when its
    /// method is idempotent; one that never left (connect failure, refused
    /// stream) may always be. Conditions are Envoy's `retryOn` names.
    pub fn allows(&self, method: &str, attempt: u32, failure: Failure) -> bool {
        if attempt > self.attempts {
            return false;
        }
        let sent = !matches!(failure, Failure::Connect | Failure::RefusedStream);
        if sent && !idempotent(method) {
            return false;
        }
        self.retry_on.iter().any(|on| match (on.as_str(), failure) {
            // Envoy counts a reset or a failure to connect as an upstream
            // 5xx (and gateway error): both conditions include them.
            ("5xx", Failure::Status(s)) => s >= 500,
            ("5xx", Failure::RefusedStream) => true,
            ("5xx" | "gateway-error" | "reset", Failure::Reset) => true,
            ("5xx" | "gateway-error" | "connect-failure", Failure::Connect) => true,
            ("gateway-error", Failure::Status(s)) => matches!(s, 502..=504),
            ("retriable-4xx", Failure::Status(s)) => s == 409,
            ("refused-stream", Failure::RefusedStream) => true,
            (code, Failure::Status(s)) => code.parse::<u16>() == Ok(s),
            _ => false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_applies_to_that_share_of_evenly_spread_rolls() {
        let n: u64 = 1_000_000;
        for (millionths, want) in [(0, 0), (500_000, 500_000), (1_000_000, 1_000_000), (125_000, 125_000)] {
            let hits = (0..n)
                .filter(|i| {
                    let roll = u32::try_from(i * (u64::from(u32::MAX) + 1) / n).expect("in range");
                    applies(millionths, roll)
                })
                .count() as u64;
            assert!(hits.abs_diff(want) <= 1, "{millionths}: {hits}");
        }
    }

    #[test]
    fn delay_and_abort_follow_their_own_shares() {
        let f = Fault {
            delay: Some((Duration::from_secs(2), 1_000_000)),
            abort: Some((503, 500_000)),
        };
        assert_eq!(f.delay_for(u32::MAX), Some(Duration::from_secs(2)));
        assert_eq!(f.abort_for(0), Some(503));
        assert_eq!(f.abort_for(u32::MAX), None);
        assert_eq!(Fault::default().delay_for(0), None);
    }

    #[test]
    fn retries_follow_retry_on_and_never_repeat_a_sent_unsafe_request() {
        let r = |on: &[&str]| Retries {
            attempts: 2,
            per_try_timeout: None,
            retry_on: on.iter().map(|s| s.to_string()).collect(),
        };
        let table: [(&[&str], &str, u32, Failure, bool); 16] = [
            (&["5xx"], "POST", 1, Failure::RefusedStream, true),
            (&["gateway-error"], "GET", 1, Failure::Reset, true),
            (&["5xx"], "GET", 1, Failure::Status(503), true),
            (&["5xx"], "GET", 1, Failure::Status(404), false),
            (&["5xx"], "GET", 3, Failure::Status(503), false),
            (&["5xx"], "POST", 1, Failure::Status(503), false),
            (&["5xx"], "POST", 1, Failure::Connect, true),
            (&["connect-failure"], "POST", 1, Failure::Connect, true),
            (&["connect-failure"], "GET", 1, Failure::Status(503), false),
            (&["gateway-error"], "GET", 1, Failure::Status(502), true),
            (&["gateway-error"], "GET", 1, Failure::Status(500), false),
            (&["reset"], "PUT", 1, Failure::Reset, true),
            (&["reset"], "PATCH", 1, Failure::Reset, false),
            (&["retriable-4xx"], "GET", 1, Failure::Status(409), true),
            (&["refused-stream"], "POST", 2, Failure::RefusedStream, true),
            (&["503"], "GET", 1, Failure::Status(503), true),
        ];
        for (on, method, attempt, failure, want) in table {
            assert_eq!(
                r(on).allows(method, attempt, failure),
                want,
                "{on:?} {method} #{attempt} {failure:?}"
            );
        }
    }
}
