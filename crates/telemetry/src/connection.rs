//! Accounting for one TCP connection: a guard that counts the connection opened when created,
//! its bytes while it runs, and closed (and failed) with one access-log line when dropped.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use ambit_core::metrics::Registry;
use metrics::{Counter, Gauge};

use crate::flags::{ResponseFlag, ResponseFlags};
use crate::labels::TrafficLabels;
use crate::live::{ByteSource, LiveConnections, LiveEntry};

/// One connection's accounting. Create it once the connection's ends are known (that counts
/// `istio_tcp_connections_opened_total`); report bytes with [`record_bytes`](Self::record_bytes)
/// as they move; set a failure with [`fail`](Self::fail). Dropping it, however the connection
/// ended (completed, failed, or the task was cancelled), counts
/// `istio_tcp_connections_closed_total` with the failure's flags, and
/// `istio_tcp_connections_failed_total` when it failed, and writes the access-log event.
pub struct ConnectionGuard {
    registry: Registry,
    labels: Arc<TrafficLabels>,
    src: SocketAddr,
    dst: SocketAddr,
    upstream: Option<SocketAddr>,
    received: Counter,
    sent: Counter,
    /// `istio_tcp_sockets_open{reporter}`: up while the connection's client socket is held.
    sockets_open: Gauge,
    bytes_received: u64,
    bytes_sent: u64,
    start: Instant,
    failure: Option<(ResponseFlags, String)>,
    /// The connection's row in the live-connections table, when tracked.
    live: Option<(LiveConnections, Arc<LiveEntry>)>,
}

impl fmt::Debug for ConnectionGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionGuard")
            .field("reporter", &self.labels.reporter())
            .field("src", &self.src)
            .field("dst", &self.dst)
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

impl ConnectionGuard {
    /// Counts a connection from `src` to `dst` (what the client dialled) as opened.
    pub fn open(
        registry: &Registry,
        labels: Arc<TrafficLabels>,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Self {
        let series = labels.tcp_open_series(registry);
        series.opened.increment(1);
        series.sockets_open.increment(1.0);
        ConnectionGuard {
            sockets_open: series.sockets_open.clone(),
            received: series.received.clone(),
            sent: series.sent.clone(),
            registry: registry.clone(),
            labels,
            src,
            dst,
            upstream: None,
            bytes_received: 0,
            bytes_sent: 0,
            start: Instant::now(),
            failure: None,
            live: None,
        }
    }

    /// Lists the connection in `table` (on behalf of `owner`: the pod uid for ztunnel) until
    /// the guard is dropped. Tracking twice keeps the first table.
    pub fn track(&mut self, table: &LiveConnections, owner: Arc<str>) {
        if self.live.is_some() {
            return;
        }
        let entry = table.register(owner, self.labels.clone(), self.src, self.dst);
        if let Some(upstream) = self.upstream {
            entry.set_upstream(upstream);
        }
        entry.record_bytes(self.bytes_received, self.bytes_sent);
        self.live = Some((table.clone(), entry));
    }

    /// Hands the live-connections table a reader of the copy loop's own counters (received
    /// from the client, sent to it), so the table shows bytes between the guard's reports.
    pub fn watch_bytes(&self, source: ByteSource) {
        if let Some((_, entry)) = &self.live {
            entry.watch_bytes(source);
        }
    }

    /// Where the bytes actually go (the HBONE next hop or the direct upstream), for the log.
    pub fn set_upstream(&mut self, upstream: SocketAddr) {
        self.upstream = Some(upstream);
        if let Some((_, entry)) = &self.live {
            entry.set_upstream(upstream);
        }
    }

    /// Reports the bytes moved so far: `received` from the client (request direction), `sent`
    /// to it (response direction). The counters grow by the increase since the last report.
    pub fn record_bytes(&mut self, received: u64, sent: u64) {
        if received > self.bytes_received {
            self.received.increment(received - self.bytes_received);
            self.bytes_received = received;
        }
        if sent > self.bytes_sent {
            self.sent.increment(sent - self.bytes_sent);
            self.bytes_sent = sent;
        }
        if let Some((_, entry)) = &self.live {
            entry.record_bytes(self.bytes_received, self.bytes_sent);
        }
    }

    /// Bytes reported so far: (received from the client, sent to it).
    pub fn bytes(&self) -> (u64, u64) {
        (self.bytes_received, self.bytes_sent)
    }

    /// The connection's labels.
    pub fn labels(&self) -> &TrafficLabels {
        &self.labels
    }

    /// Ends the connection as failed with `error`; its flags come from the error. The first
    /// failure set is kept.
    pub fn fail<E: ResponseFlag + fmt::Display + ?Sized>(&mut self, error: &E) {
        self.fail_with(error.response_flag(), error);
    }

    /// [`fail`](Self::fail) with explicit flags.
    pub fn fail_with(&mut self, flags: ResponseFlags, error: impl fmt::Display) {
        if self.failure.is_none() {
            self.failure = Some((flags, error.to_string()));
        }
    }

    /// True once a failure was set.
    pub fn failed(&self) -> bool {
        self.failure.is_some()
    }
}

/// An address for the access log, empty when there is none (formatted into the line, not into a
/// string of its own).
struct OptionalAddr(Option<SocketAddr>);

impl fmt::Display for OptionalAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(addr) => fmt::Display::fmt(&addr, f),
            None => Ok(()),
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if let Some((table, entry)) = self.live.take() {
            table.remove(&entry);
        }
        self.sockets_open.decrement(1.0);
        let flags = self
            .failure
            .as_ref()
            .map_or(ResponseFlags::NONE, |(f, _)| *f);
        let ended = self
            .labels
            .tcp_end_series(&self.registry, flags, self.failure.is_some());
        ended.closed.increment(1);
        if let Some(failed) = ended.failed {
            failed.increment(1);
        }
        let l = &self.labels;
        let direction = l.direction();
        let upstream = OptionalAddr(self.upstream);
        let duration_ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        // One field list for both outcomes, so the two log lines cannot drift apart.
        macro_rules! access {
            ($level:ident, $message:literal $(, $extra:ident = $value:expr)*) => {
                tracing::$level!(
                    target: "access",
                    direction,
                    src.addr = %self.src,
                    src.workload = %l.source_log_name(),
                    src.identity = %l.source().principal,
                    dst.addr = %self.dst,
                    dst.upstream = %upstream,
                    dst.service = %l.service().hostname,
                    dst.workload = %l.destination_log_name(),
                    dst.identity = %l.destination().principal,
                    bytes_received = self.bytes_received,
                    bytes_sent = self.bytes_sent,
                    duration_ms,
                    $($extra = $value,)*
                    $message
                )
            };
        }
        match &self.failure {
            None => access!(info, "connection complete"),
            Some((flags, error)) => access!(
                warn,
                "connection failed",
                response_flags = flags.as_label().as_ref(),
                error = error.as_str()
            ),
        }
    }
}
