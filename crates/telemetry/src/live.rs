//! The live-connections table: every connection a proxy carries right now, with its ends, the
//! identities involved and its bytes so far, for the admin `/config_dump`.
//!
//! A [`ConnectionGuard`](crate::ConnectionGuard) registers itself with
//! [`track`](crate::ConnectionGuard::track) and is removed when dropped. The data path pays one
//! shard lock at open and one at close (never per byte): the bytes are read from the entry's
//! atomics, fed by the guard's periodic reports, or from the copy loop's own counters when it
//! hands them over with [`watch_bytes`](crate::ConnectionGuard::watch_bytes).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use crate::labels::{Reporter, TrafficLabels};

/// Shards of the table; an open or close locks one.
const SHARDS: usize = 16;

/// Reads a connection's live byte counts: (received from the client, sent to it).
pub type ByteSource = Box<dyn Fn() -> (u64, u64) + Send + Sync>;

/// Every open connection of one proxy. Cheap to clone (shared).
#[derive(Clone)]
pub struct LiveConnections {
    inner: Arc<Table>,
}

struct Table {
    shards: [Mutex<HashMap<u64, Arc<LiveEntry>>>; SHARDS],
    next_id: AtomicU64,
}

impl Default for LiveConnections {
    fn default() -> Self {
        LiveConnections {
            inner: Arc::new(Table {
                shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
                next_id: AtomicU64::new(0),
            }),
        }
    }
}

impl fmt::Debug for LiveConnections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveConnections")
            .field("open", &self.len())
            .finish()
    }
}

/// One open connection, shared by its guard and the table.
pub(crate) struct LiveEntry {
    id: u64,
    owner: Arc<str>,
    labels: Arc<TrafficLabels>,
    src: SocketAddr,
    dst: SocketAddr,
    upstream: Mutex<Option<SocketAddr>>,
    received: AtomicU64,
    sent: AtomicU64,
    live: OnceLock<ByteSource>,
    opened: SystemTime,
}

impl LiveEntry {
    pub(crate) fn set_upstream(&self, upstream: SocketAddr) {
        *self.upstream.lock().unwrap_or_else(|p| p.into_inner()) = Some(upstream);
    }

    pub(crate) fn record_bytes(&self, received: u64, sent: u64) {
        self.received.fetch_max(received, Ordering::Relaxed);
        self.sent.fetch_max(sent, Ordering::Relaxed);
    }

    pub(crate) fn watch_bytes(&self, source: ByteSource) {
        // The first source stays: a connection has one copy loop.
        let _ = self.live.set(source);
    }

    fn snapshot(&self) -> LiveConnection {
        let (mut received, mut sent) = (
            self.received.load(Ordering::Relaxed),
            self.sent.load(Ordering::Relaxed),
        );
        if let Some(live) = self.live.get() {
            let (r, s) = live();
            received = received.max(r);
            sent = sent.max(s);
        }
        let l = &self.labels;
        LiveConnection {
            owner: self.owner.to_string(),
            reporter: l.reporter(),
            src: self.src,
            dst: self.dst,
            upstream: *self.upstream.lock().unwrap_or_else(|p| p.into_inner()),
            mtls: l.mtls(),
            source_principal: l.source().principal.clone(),
            destination_principal: l.destination().principal.clone(),
            service: l.service().hostname.clone(),
            bytes_received: received,
            bytes_sent: sent,
            opened: self.opened,
        }
    }
}

/// What the table shows of one open connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveConnection {
    /// Who carries it: the pod uid for ztunnel, the Gateway (`namespace/name`) for a waypoint.
    pub owner: String,
    /// Who reports it: [`Reporter::Source`] is outbound, [`Reporter::Destination`] inbound.
    pub reporter: Reporter,
    /// The client's address.
    pub src: SocketAddr,
    /// What the client dialled.
    pub dst: SocketAddr,
    /// Where the bytes actually go (the HBONE next hop or the direct upstream), once known.
    pub upstream: Option<SocketAddr>,
    /// Carried over mutual TLS (HBONE).
    pub mtls: bool,
    /// The client's SPIFFE identity (verified inbound; our pod's own outbound), or empty.
    pub source_principal: String,
    /// The server's SPIFFE identity (proven or expected), or empty.
    pub destination_principal: String,
    /// The service addressed, or empty.
    pub service: String,
    /// Bytes received from the client so far.
    pub bytes_received: u64,
    /// Bytes sent to the client so far.
    pub bytes_sent: u64,
    /// When it was opened.
    pub opened: SystemTime,
}

impl LiveConnection {
    /// `inbound`, `outbound` or `waypoint`.
    pub fn direction(&self) -> &'static str {
        self.reporter.direction()
    }

    /// The identity of the other end as this proxy sees it: the client inbound, the server
    /// outbound.
    pub fn peer_identity(&self) -> &str {
        match self.reporter {
            Reporter::Source => &self.destination_principal,
            Reporter::Destination | Reporter::Waypoint => &self.source_principal,
        }
    }
}

impl LiveConnections {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn register(
        &self,
        owner: Arc<str>,
        labels: Arc<TrafficLabels>,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Arc<LiveEntry> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(LiveEntry {
            id,
            owner,
            labels,
            src,
            dst,
            upstream: Mutex::new(None),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            live: OnceLock::new(),
            opened: SystemTime::now(),
        });
        self.shard(id).insert(id, entry.clone());
        entry
    }

    pub(crate) fn remove(&self, entry: &LiveEntry) {
        self.shard(entry.id).remove(&entry.id);
    }

    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<LiveEntry>>> {
        // The shard count divides u64's range, so the modulo stays in bounds.
        let index = usize::try_from(id % SHARDS as u64).unwrap_or(0);
        self.inner.shards[index]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Open connections right now.
    pub fn len(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// True when no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every open connection with its bytes so far, oldest first.
    pub fn snapshot(&self) -> Vec<LiveConnection> {
        let entries: Vec<Arc<LiveEntry>> = self
            .inner
            .shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut all: Vec<(u64, LiveConnection)> =
            entries.iter().map(|e| (e.id, e.snapshot())).collect();
        all.sort_by_key(|(id, _)| *id);
        all.into_iter().map(|(_, c)| c).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ConnectionGuard, ServiceLabels, WorkloadLabels};
    use ambit_core::metrics::Registry;

    fn labels(reporter: Reporter) -> Arc<TrafficLabels> {
        Arc::new(TrafficLabels::new(
            reporter,
            WorkloadLabels {
                principal: "spiffe://cluster.local/ns/demo/sa/client".into(),
                ..WorkloadLabels::default()
            },
            WorkloadLabels {
                principal: "spiffe://cluster.local/ns/demo/sa/echo".into(),
                ..WorkloadLabels::default()
            },
            ServiceLabels {
                hostname: "echo.demo.svc.cluster.local".into(),
                ..ServiceLabels::default()
            },
            true,
        ))
    }

    #[test]
    fn a_tracked_connection_is_listed_with_its_bytes_until_dropped() {
        let registry = Registry::new();
        let table = LiveConnections::new();
        let src: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let dst: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let mut outbound = ConnectionGuard::open(&registry, labels(Reporter::Source), src, dst);
        outbound.track(&table, Arc::from("uid-client"));
        outbound.set_upstream("10.0.1.5:15008".parse().unwrap());
        outbound.record_bytes(10, 20);
        let inbound = {
            let mut g = ConnectionGuard::open(&registry, labels(Reporter::Destination), src, dst);
            g.track(&table, Arc::from("uid-echo"));
            // The copy loop's counters are ahead of the guard's last report.
            g.watch_bytes(Box::new(|| (300, 4000)));
            g
        };

        let open = table.snapshot();
        assert_eq!(open.len(), 2);
        let out = &open[0];
        assert_eq!(
            (out.owner.as_str(), out.direction(), out.peer_identity()),
            (
                "uid-client",
                "outbound",
                "spiffe://cluster.local/ns/demo/sa/echo"
            )
        );
        assert_eq!(out.upstream, Some("10.0.1.5:15008".parse().unwrap()));
        assert_eq!((out.bytes_received, out.bytes_sent), (10, 20));
        let inb = &open[1];
        assert_eq!(
            (inb.direction(), inb.peer_identity()),
            ("inbound", "spiffe://cluster.local/ns/demo/sa/client")
        );
        assert_eq!((inb.bytes_received, inb.bytes_sent), (300, 4000));

        drop(outbound);
        let open = table.snapshot();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].owner, "uid-echo");
        drop(inbound);
        assert!(table.is_empty());
    }

    #[test]
    fn an_untracked_guard_is_not_listed() {
        let registry = Registry::new();
        let table = LiveConnections::new();
        let guard = ConnectionGuard::open(
            &registry,
            labels(Reporter::Waypoint),
            "10.0.0.1:1".parse().unwrap(),
            "10.0.0.2:2".parse().unwrap(),
        );
        guard.watch_bytes(Box::new(|| (1, 1)));
        assert!(table.is_empty());
    }
}
