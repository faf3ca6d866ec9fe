//! Connection accounting for ztunnel's paths: what is known about a connection's two ends
//! (workloads from the state index) turned into Istio's label set once, and the byte-counting
//! copies that feed the connection's [`ConnectionGuard`]. The series, the guard and the access log
//! live in `ambit-telemetry`, shared with the waypoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ambit_core::metrics::Registry;
use ambit_hbone::HboneStream;
use ambit_hbone::copy::ByteCounters;
use ambit_identity::Identity;
use ambit_state::{Service, Workload};
pub use ambit_telemetry::{ConnectionGuard, Reporter, ResponseFlag, ResponseFlags};
use ambit_telemetry::{ServiceLabels, TrafficLabels, WorkloadLabels};

/// Registers the help texts of the traffic metrics.
pub fn describe(registry: &Registry) {
    ambit_telemetry::describe_tcp(registry);
}

/// Everything the metrics and access log say about one connection's endpoints, gathered as the
/// proxy learns it; [`open`](Self::open) turns it into the connection's guard.
#[derive(Clone, Debug, Default)]
pub struct ConnectionInfo {
    /// The client's workload, when known.
    pub source: Option<Arc<Workload>>,
    /// The client's identity: proven by mTLS (inbound) or our own pod's (outbound).
    pub source_identity: Option<Identity>,
    /// The server's workload (or the waypoint carrying the connection).
    pub destination: Option<Arc<Workload>>,
    /// The identity the destination proved or was expected to prove.
    pub destination_identity: Option<Identity>,
    /// The service the client addressed, when there is one.
    pub service: Option<Arc<Service>>,
    /// Carried over mutual TLS.
    pub mtls: bool,
    /// Where the bytes go (the HBONE next hop or the direct upstream), once known.
    pub upstream: Option<SocketAddr>,
}

impl ConnectionInfo {
    /// Istio's label set for this connection as seen by `reporter`.
    pub fn labels(&self, reporter: Reporter) -> TrafficLabels {
        let service = self
            .service
            .as_deref()
            .map(|s| ServiceLabels {
                hostname: s.hostname.to_string(),
                namespace: s.namespace.to_string(),
                name: s.name.to_string(),
            })
            .unwrap_or_default();
        TrafficLabels::new(
            reporter,
            workload_labels(self.source.as_deref(), self.source_identity.as_ref()),
            workload_labels(
                self.destination.as_deref(),
                self.destination_identity.as_ref(),
            ),
            service,
            self.mtls,
        )
    }

    /// Counts the connection from `src` to `dst` (what the client dialled) as opened; the guard
    /// counts it closed when dropped. The label set comes from `cache` when an earlier connection
    /// between the same ends built it (its series then looked up once for all of them).
    pub fn open(
        &self,
        cache: &LabelCache,
        registry: &Registry,
        reporter: Reporter,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> ConnectionGuard {
        let labels = cache.labels(self, reporter);
        let mut guard = ConnectionGuard::open(registry, labels, src, dst);
        if let Some(upstream) = self.upstream {
            guard.set_upstream(upstream);
        }
        guard
    }
}

/// The objects a label set is built from, by address (the state index replaces a workload or
/// service that changes, never mutates it, so a changed one is a new key), and the rest of what
/// the labels say.
type LabelKey = (
    Reporter,
    usize,
    Option<Identity>,
    usize,
    Option<Identity>,
    usize,
    bool,
);

/// A cached label set and the objects whose addresses key it, held so that no address is reused
/// by another object while the entry lives.
type CachedLabels = (
    Option<Arc<Workload>>,
    Option<Arc<Workload>>,
    Option<Arc<Service>>,
    Arc<TrafficLabels>,
);

/// Label sets kept per pod before its cache starts over.
const MAX_CACHED_LABELS: usize = 256;

/// One pod's label sets by the workloads and service they describe: a connection between the
/// same ends as an earlier one reuses its labels and their series instead of building ~30 label
/// strings and looking up five series.
#[derive(Default)]
pub struct LabelCache(std::sync::Mutex<std::collections::HashMap<LabelKey, CachedLabels>>);

impl std::fmt::Debug for LabelCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LabelCache")
    }
}

impl LabelCache {
    /// The label set of `info` as `reporter` sees it, built on first use.
    pub fn labels(&self, info: &ConnectionInfo, reporter: Reporter) -> Arc<TrafficLabels> {
        fn address<T>(value: Option<&Arc<T>>) -> usize {
            value.map_or(0, |v| Arc::as_ptr(v) as usize)
        }
        let key = (
            reporter,
            address(info.source.as_ref()),
            info.source_identity.clone(),
            address(info.destination.as_ref()),
            info.destination_identity.clone(),
            address(info.service.as_ref()),
            info.mtls,
        );
        let mut cache = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, _, _, labels)) = cache.get(&key) {
            return labels.clone();
        }
        if cache.len() >= MAX_CACHED_LABELS {
            cache.clear();
        }
        let labels = Arc::new(info.labels(reporter));
        cache.insert(
            key,
            (
                info.source.clone(),
                info.destination.clone(),
                info.service.clone(),
                labels.clone(),
            ),
        );
        labels
    }
}

fn workload_labels(w: Option<&Workload>, id: Option<&Identity>) -> WorkloadLabels {
    let principal = id.map(Identity::to_string).unwrap_or_default();
    let Some(w) = w else {
        return WorkloadLabels {
            principal,
            ..WorkloadLabels::default()
        };
    };
    let locality = w.locality.as_deref();
    WorkloadLabels {
        name: w.name.to_string(),
        workload: w.workload_name.to_string(),
        namespace: w.namespace.to_string(),
        canonical_service: w.canonical_name.to_string(),
        canonical_revision: w.canonical_revision.to_string(),
        principal,
        cluster: w.cluster_id.to_string(),
        region: locality.map(|l| l.region.to_string()).unwrap_or_default(),
        zone: locality.map(|l| l.zone.to_string()).unwrap_or_default(),
    }
}

/// Copies between the client (`downstream`) and the server side, reporting byte counts to the
/// connection's guard every few seconds so long-lived connections show up in the metrics while open.
pub async fn copy_counted<D, U>(
    downstream: D,
    upstream: U,
    conn: &mut ConnectionGuard,
    forced: impl std::future::Future<Output = ()>,
) -> std::io::Result<()>
where
    D: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let counters = Arc::new(ByteCounters::new());
    let copy = ambit_hbone::copy::copy_bidirectional(downstream, upstream, &counters);
    counted(copy, &counters, Direction::SocketIsDownstream, conn, forced).await
}

/// [`copy_counted`] for a client socket and an HBONE tunnel to the server side, handing bytes to
/// HTTP/2 without copying them. `early` bytes of the client's were already sent through the
/// tunnel with its CONNECT; they count as sent.
pub async fn copy_counted_to_tunnel<D>(
    downstream: D,
    tunnel: HboneStream,
    early: u64,
    conn: &mut ConnectionGuard,
    forced: impl std::future::Future<Output = ()>,
) -> std::io::Result<()>
where
    D: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let counters = Arc::new(ByteCounters::starting_at(early, 0));
    let copy = ambit_hbone::copy::copy_with_tunnel(downstream, tunnel, &counters);
    counted(copy, &counters, Direction::SocketIsDownstream, conn, forced).await
}

/// [`copy_counted`] for a tunnel from the client and a socket to the application, without copying
/// the bytes in user space.
pub async fn copy_counted_from_tunnel<U>(
    tunnel: HboneStream,
    upstream: U,
    conn: &mut ConnectionGuard,
    forced: impl std::future::Future<Output = ()>,
) -> std::io::Result<()>
where
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let counters = Arc::new(ByteCounters::new());
    let copy = ambit_hbone::copy::copy_with_tunnel(upstream, tunnel, &counters);
    counted(copy, &counters, Direction::SocketIsUpstream, conn, forced).await
}

/// How often a running connection's bytes are reported to its guard (metrics, live table).
const REPORT_INTERVAL: Duration = Duration::from_secs(5);

/// Which side of the copy the counters' `a` is.
#[derive(Clone, Copy)]
enum Direction {
    /// `a` is the client side: `a_to_b` is bytes sent.
    SocketIsDownstream,
    /// `a` is the application side: `a_to_b` is bytes received.
    SocketIsUpstream,
}

/// Drives `copy`, reporting `counters` to `conn` every few seconds and at the end, or aborts it
/// when the drain deadline (`forced`) passes.
async fn counted(
    copy: impl std::future::Future<Output = std::io::Result<()>>,
    counters: &Arc<ByteCounters>,
    direction: Direction,
    conn: &mut ConnectionGuard,
    forced: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    // The live-connections table reads the copy's own counters (two relaxed loads per dump).
    let live = counters.clone();
    conn.watch_bytes(Box::new(move || match direction {
        Direction::SocketIsDownstream => (live.a_to_b(), live.b_to_a()),
        Direction::SocketIsUpstream => (live.b_to_a(), live.a_to_b()),
    }));
    let flush = |conn: &mut ConnectionGuard| match direction {
        Direction::SocketIsDownstream => conn.record_bytes(counters.a_to_b(), counters.b_to_a()),
        Direction::SocketIsUpstream => conn.record_bytes(counters.b_to_a(), counters.a_to_b()),
    };
    tokio::pin!(copy);
    tokio::pin!(forced);
    // The first report is due one period from now. `interval`'s immediate first tick is not
    // immediate: its deadline is rounded up to the timer's next millisecond, so awaiting it held
    // every new connection's first bytes for up to a millisecond (most of the mesh's per-connection
    // latency under connection churn).
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + REPORT_INTERVAL,
        REPORT_INTERVAL,
    );
    let result = loop {
        tokio::select! {
            result = &mut copy => break result,
            _ = tick.tick() => flush(conn),
            () = &mut forced => break Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "closed by ztunnel: drain deadline reached",
            )),
        }
    };
    flush(conn);
    result
}
