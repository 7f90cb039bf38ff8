//! The outbound listener (15001). Until discovery lands (issue 6) it
//! forwards every captured connection, as plaintext, to its original
//! destination, so a pod keeps working with the capture rules in place.
//! The proxy's own connections are not captured again (UID 1337).

use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::inbound::original_dst;

/// Serves outbound connections until the process ends.
pub async fn serve(listener: TcpListener, connections: crate::drain::Connections) {
    loop {
        let (mut conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let guard = connections.open();
        tokio::spawn(async move {
            let _guard = guard;
            let dst = match original_dst(&conn) {
                Ok(d) => d,
                Err(e) => return debug!(%peer, error = %e, "outbound connection without an original destination"),
            };
            match tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(dst)).await {
                Ok(Ok(mut upstream)) => {
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
                }
                Ok(Err(e)) => debug!(%peer, %dst, error = %e, "outbound connect failed"),
                Err(_) => debug!(%peer, %dst, "outbound connect timed out"),
            }
        });
    }
}
