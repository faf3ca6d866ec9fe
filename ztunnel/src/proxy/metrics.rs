//! Connection accounting: the upstream Istio TCP metrics with their full label set, and one
//! structured access-log line per connection when it ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_core::metrics::{LabelSet, Registry, label_value};
use ambit_hbone::HboneStream;
use ambit_hbone::copy::ByteCounters;
use ambit_identity::Identity;
use metrics::Label;

use crate::state::{Service, Workload};

/// Which side of the connection reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reporter {
    /// The client's ztunnel (outbound).
    Source,
    /// The server's ztunnel (inbound).
    Destination,
}

impl Reporter {
    fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// Why a connection failed, as Istio's `response_flags` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseFlags {
    /// No failure.
    None,
    /// Refused by authorization policy.
    Deny,
    /// The upstream connection or tunnel could not be made.
    Connect,
    /// TLS failed (bad identity, untrusted chain, expired certificate).
    TlsFailure,
    /// No certificate for our side.
    IdentityError,
}

impl ResponseFlags {
    fn as_str(self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::Deny => "DENY",
            ResponseFlags::Connect => "CONNECT",
            ResponseFlags::TlsFailure => "TLS_FAILURE",
            ResponseFlags::IdentityError => "IDENTITY_ERROR",
        }
    }
}

/// Everything the metrics and access log say about one connection's endpoints.
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
}

struct TrafficLabels<'a> {
    reporter: Reporter,
    info: &'a ConnectionInfo,
    flags: ResponseFlags,
}

fn workload_labels(
    prefix: &'static str,
    w: Option<&Workload>,
    id: Option<&Identity>,
    out: &mut Vec<Label>,
) {
    let text = |f: fn(&Workload) -> &str| label_value(w.map(f).unwrap_or(""));
    let names: [(&str, String); 8] = [
        ("workload", text(|w| &w.workload_name)),
        ("canonical_service", text(|w| &w.canonical_name)),
        ("canonical_revision", text(|w| &w.canonical_revision)),
        ("workload_namespace", text(|w| &w.namespace)),
        (
            "principal",
            label_value(&id.map(Identity::to_string).unwrap_or_default()),
        ),
        ("app", text(|w| &w.canonical_name)),
        ("version", text(|w| &w.canonical_revision)),
        ("cluster", text(|w| &w.cluster_id)),
    ];
    for (name, value) in names {
        out.push(Label::new(format!("{prefix}_{name}"), value));
    }
}

fn locality_labels(prefix: &'static str, w: Option<&Workload>, out: &mut Vec<Label>) {
    let locality = w.and_then(|w| w.locality.as_deref());
    out.push(Label::new(
        format!("{prefix}_region"),
        label_value(locality.map(|l| &*l.region).unwrap_or("")),
    ));
    out.push(Label::new(
        format!("{prefix}_zone"),
        label_value(locality.map(|l| &*l.zone).unwrap_or("")),
    ));
}

impl LabelSet for TrafficLabels<'_> {
    fn to_labels(&self) -> Vec<Label> {
        let info = self.info;
        let mut out = Vec::with_capacity(26);
        out.push(Label::new("reporter", self.reporter.as_str()));
        workload_labels(
            "source",
            info.source.as_deref(),
            info.source_identity.as_ref(),
            &mut out,
        );
        let service = info.service.as_deref();
        out.push(Label::new(
            "destination_service",
            label_value(service.map(|s| &*s.hostname).unwrap_or("")),
        ));
        out.push(Label::new(
            "destination_service_namespace",
            label_value(service.map(|s| &*s.namespace).unwrap_or("")),
        ));
        out.push(Label::new(
            "destination_service_name",
            label_value(service.map(|s| &*s.name).unwrap_or("")),
        ));
        workload_labels(
            "destination",
            info.destination.as_deref(),
            info.destination_identity.as_ref(),
            &mut out,
        );
        out.push(Label::new("request_protocol", "tcp"));
        out.push(Label::new("response_flags", self.flags.as_str()));
        out.push(Label::new(
            "connection_security_policy",
            if info.mtls { "mutual_tls" } else { "unknown" },
        ));
        locality_labels("source", info.source.as_deref(), &mut out);
        locality_labels("destination", info.destination.as_deref(), &mut out);
        out
    }
}

/// Registers the help texts of the traffic metrics.
pub fn describe(registry: &Registry) {
    registry.describe_counter(
        "istio_tcp_connections_opened_total",
        "TCP connections opened, by source and destination workload",
    );
    registry.describe_counter(
        "istio_tcp_connections_closed_total",
        "TCP connections closed, by source and destination workload and response flags",
    );
    registry.describe_counter(
        "istio_tcp_received_bytes_total",
        "Bytes received from the client (request direction)",
    );
    registry.describe_counter(
        "istio_tcp_sent_bytes_total",
        "Bytes sent to the client (response direction)",
    );
}

/// One connection's accounting, from open to close. Byte counters are flushed live.
pub struct ConnectionRecord {
    registry: Registry,
    reporter: Reporter,
    /// What is known about the two ends; filled in as the proxy learns more.
    pub info: ConnectionInfo,
    /// Client address.
    pub src: std::net::SocketAddr,
    /// The address the client dialed.
    pub dst: std::net::SocketAddr,
    /// Where the bytes actually went (the HBONE next hop or the direct upstream).
    pub upstream: Option<std::net::SocketAddr>,
    start: Instant,
    counted_received: u64,
    counted_sent: u64,
    opened: bool,
}

impl std::fmt::Debug for ConnectionRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionRecord")
            .field("reporter", &self.reporter)
            .field("src", &self.src)
            .field("dst", &self.dst)
            .finish_non_exhaustive()
    }
}

impl ConnectionRecord {
    /// Starts accounting for a connection from `src` to `dst`.
    pub fn new(
        registry: &Registry,
        reporter: Reporter,
        src: std::net::SocketAddr,
        dst: std::net::SocketAddr,
    ) -> Self {
        Self {
            registry: registry.clone(),
            reporter,
            info: ConnectionInfo::default(),
            src,
            dst,
            upstream: None,
            start: Instant::now(),
            counted_received: 0,
            counted_sent: 0,
            opened: false,
        }
    }

    fn labels(&self, flags: ResponseFlags) -> TrafficLabels<'_> {
        TrafficLabels {
            reporter: self.reporter,
            info: &self.info,
            flags,
        }
    }

    /// Counts the connection as opened (once both ends are known).
    pub fn opened(&mut self) {
        if !self.opened {
            self.opened = true;
            self.registry
                .counter(
                    "istio_tcp_connections_opened_total",
                    &self.labels(ResponseFlags::None),
                )
                .increment(1);
        }
    }

    /// Adds the bytes moved since the last flush. `received` is client→server.
    pub fn flush_bytes(&mut self, received: u64, sent: u64) {
        let labels = self.labels(ResponseFlags::None);
        let new_received = received.saturating_sub(self.counted_received);
        let new_sent = sent.saturating_sub(self.counted_sent);
        if new_received > 0 {
            self.registry
                .counter("istio_tcp_received_bytes_total", &labels)
                .increment(new_received);
        }
        if new_sent > 0 {
            self.registry
                .counter("istio_tcp_sent_bytes_total", &labels)
                .increment(new_sent);
        }
        self.counted_received = received.max(self.counted_received);
        self.counted_sent = sent.max(self.counted_sent);
    }

    /// Ends the connection: closed counter with its flags and one access-log line.
    pub fn finish(mut self, flags: ResponseFlags, error: Option<&str>) {
        self.opened();
        self.registry
            .counter("istio_tcp_connections_closed_total", &self.labels(flags))
            .increment(1);
        self.log(flags, error, self.start.elapsed());
    }

    fn log(&self, flags: ResponseFlags, error: Option<&str>, duration: Duration) {
        let name = |w: &Option<Arc<Workload>>| {
            w.as_deref()
                .map(|w| format!("{}/{}", w.namespace, w.name))
                .unwrap_or_else(|| "-".to_string())
        };
        let id = |i: &Option<Identity>| i.as_ref().map(Identity::to_string).unwrap_or_default();
        let service = self
            .info
            .service
            .as_deref()
            .map(|s| s.hostname.to_string())
            .unwrap_or_default();
        let upstream = self.upstream.map(|u| u.to_string()).unwrap_or_default();
        let duration_ms = duration.as_millis() as u64;
        let direction = match self.reporter {
            Reporter::Source => "outbound",
            Reporter::Destination => "inbound",
        };
        // One field list for both outcomes, so the two log lines cannot drift apart.
        macro_rules! access {
            ($level:ident, $message:literal $(, $extra:ident = $value:expr)*) => {
                tracing::$level!(
                    target: "access",
                    direction,
                    src.addr = %self.src,
                    src.workload = %name(&self.info.source),
                    src.identity = %id(&self.info.source_identity),
                    dst.addr = %self.dst,
                    dst.upstream = %upstream,
                    dst.service = %service,
                    dst.workload = %name(&self.info.destination),
                    dst.identity = %id(&self.info.destination_identity),
                    bytes_received = self.counted_received,
                    bytes_sent = self.counted_sent,
                    duration_ms,
                    $($extra = $value,)*
                    $message
                )
            };
        }
        match error {
            None => access!(info, "connection complete"),
            Some(error) => access!(
                warn,
                "connection failed",
                response_flags = flags.as_str(),
                error = error
            ),
        }
    }
}

/// Copies between the client (`downstream`) and the server side, flushing byte counts to the
/// record every few seconds so long-lived connections show up in the metrics while open.
pub async fn copy_counted<D, U>(
    downstream: D,
    upstream: U,
    record: &mut ConnectionRecord,
    forced: impl std::future::Future<Output = ()>,
) -> std::io::Result<()>
where
    D: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let counters = ByteCounters::new();
    let copy = ambit_hbone::copy::copy_bidirectional(downstream, upstream, &counters);
    counted(
        copy,
        &counters,
        Direction::SocketIsDownstream,
        record,
        forced,
    )
    .await
}

/// [`copy_counted`] for a client socket and an HBONE tunnel to the server side, handing bytes to
/// HTTP/2 without copying them.
pub async fn copy_counted_to_tunnel<D>(
    downstream: D,
    tunnel: HboneStream,
    record: &mut ConnectionRecord,
    forced: impl std::future::Future<Output = ()>,
) -> std::io::Result<()>
where
    D: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let counters = ByteCounters::new();
    let copy = ambit_hbone::copy::copy_with_tunnel(downstream, tunnel, &counters);
    counted(
        copy,
        &counters,
        Direction::SocketIsDownstream,
        record,
        forced,
    )
    .await
}

/// [`copy_counted`] for a tunnel from the client and a socket to the application, without copying
/// the bytes in user space.
pub async fn copy_counted_from_tunnel<U>(
    tunnel: HboneStream,
    upstream: U,
    record: &mut ConnectionRecord,
    forced: impl std::future::Future<Output = ()>,
) -> std::io::Result<()>
where
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let counters = ByteCounters::new();
    let copy = ambit_hbone::copy::copy_with_tunnel(upstream, tunnel, &counters);
    counted(copy, &counters, Direction::SocketIsUpstream, record, forced).await
}

/// Which side of the copy the counters' `a` is.
#[derive(Clone, Copy)]
enum Direction {
    /// `a` is the client side: `a_to_b` is bytes sent.
    SocketIsDownstream,
    /// `a` is the application side: `a_to_b` is bytes received.
    SocketIsUpstream,
}

/// Drives `copy`, flushing `counters` to `record` every few seconds and at the end, or aborts it
/// when the drain deadline (`forced`) passes.
async fn counted(
    copy: impl std::future::Future<Output = std::io::Result<()>>,
    counters: &ByteCounters,
    direction: Direction,
    record: &mut ConnectionRecord,
    forced: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let flush = |record: &mut ConnectionRecord| match direction {
        Direction::SocketIsDownstream => record.flush_bytes(counters.a_to_b(), counters.b_to_a()),
        Direction::SocketIsUpstream => record.flush_bytes(counters.b_to_a(), counters.a_to_b()),
    };
    tokio::pin!(copy);
    tokio::pin!(forced);
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.tick().await;
    let result = loop {
        tokio::select! {
            result = &mut copy => break result,
            _ = tick.tick() => flush(record),
            () = &mut forced => break Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "closed by ztunnel: drain deadline reached",
            )),
        }
    };
    flush(record);
    result
}
