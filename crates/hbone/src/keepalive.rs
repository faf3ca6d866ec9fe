//! HTTP/2 PING keepalive shared by the client and server sides: it detects a peer that vanished
//! without closing the TCP connection (node gone, path blackholed).

use std::time::Duration;

/// Pings every `interval` (the first one after `interval`) and returns only when a PONG did not
/// arrive within `timeout`; the caller then drops the connection. If pinging fails because the
/// connection is already closing, it waits forever and lets the connection report why.
pub(crate) async fn ping_until_unanswered(
    ping_pong: Option<h2::PingPong>,
    interval: Duration,
    timeout: Duration,
) {
    // h2 hands out the PingPong once per connection and we take it right after the handshake.
    let Some(mut ping_pong) = ping_pong else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(error)) => {
                tracing::debug!(%error, "keepalive PING failed; connection is closing");
                return std::future::pending().await;
            }
            Err(_elapsed) => return,
        }
    }
}
