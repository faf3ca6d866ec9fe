//! The live-connections table as the admin `/config_dump` shows it (upstream ztunnel's shape).

use std::time::SystemTime;

use serde_json::{Value, json};

use crate::labels::Reporter;
use crate::live::LiveConnection;

/// One open connection in upstream ztunnel's shape (`src`, `originalDst`, `actualDst`,
/// `protocol`) plus Ambit's `peerIdentity`, `bytesSent`, `bytesReceived` and `durationSeconds`.
///
/// - Outbound (ztunnel, the client's side): `originalDst` is what the app dialled, `actualDst`
///   the next hop (the HBONE endpoint or the direct upstream).
/// - Inbound (ztunnel, the server's side): `originalDst` is the Service the client addressed (or
///   empty), `actualDst` the application address the bytes go to.
/// - Waypoint: `originalDst` is the address the tunnel named (a Service VIP:port or a pod
///   IP:port), `actualDst` the endpoint chosen, once dialled.
pub fn connection(c: &LiveConnection, now: SystemTime) -> Value {
    let (original, actual) = match c.reporter {
        Reporter::Source => (
            c.dst.to_string(),
            c.upstream.map(|u| u.to_string()).unwrap_or_default(),
        ),
        Reporter::Destination => (c.service.clone(), c.upstream.unwrap_or(c.dst).to_string()),
        Reporter::Waypoint => (
            c.dst.to_string(),
            c.upstream.map(|u| u.to_string()).unwrap_or_default(),
        ),
    };
    json!({
        "src": c.src.to_string(),
        "originalDst": original,
        "actualDst": actual,
        "protocol": if c.mtls { "HBONE" } else { "TCP" },
        "peerIdentity": c.peer_identity(),
        "bytesSent": c.bytes_sent,
        "bytesReceived": c.bytes_received,
        "durationSeconds": now.duration_since(c.opened).map(|d| d.as_secs()).unwrap_or(0),
    })
}
