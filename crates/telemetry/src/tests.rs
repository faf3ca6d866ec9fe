//! What a scrape and the access log show for connections and requests.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use ambit_core::metrics::Registry;
use http::{HeaderMap, Method, Uri};

use crate::*;

/// Collects what the `access` target logs. One process-wide subscriber writes into one buffer
/// (thread-scoped subscribers lose events to tracing's process-wide callsite interest cache when
/// tests run in parallel); the tests that read it run one at a time ([`serial`]) and clear it first.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn capture() -> (Self, ()) {
        static LOGS: std::sync::OnceLock<Logs> = std::sync::OnceLock::new();
        let logs = LOGS
            .get_or_init(|| {
                let logs = Logs::default();
                let writer = logs.clone();
                let subscriber = tracing_subscriber::fmt()
                    .with_ansi(false)
                    .with_writer(move || writer.clone())
                    .finish();
                let _ = tracing::subscriber::set_global_default(subscriber);
                logs
            })
            .clone();
        logs.0.lock().unwrap_or_else(|p| p.into_inner()).clear();
        (logs, ())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

/// The log-capturing tests install thread-scoped subscribers, and tracing caches each callsite's
/// interest process-wide: run this module's tests one at a time so that no test's events are
/// filtered by another's subscriber (or the lack of one).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn labels(reporter: Reporter) -> Arc<TrafficLabels> {
    Arc::new(TrafficLabels::new(
        reporter,
        WorkloadLabels {
            name: "client-7d9f".into(),
            workload: "client".into(),
            namespace: "demo".into(),
            canonical_service: "client".into(),
            canonical_revision: "v1".into(),
            principal: "spiffe://cluster.local/ns/demo/sa/client".into(),
            cluster: "Kubernetes".into(),
            ..Default::default()
        },
        WorkloadLabels::default(),
        ServiceLabels {
            hostname: "echo.demo.svc.cluster.local".into(),
            namespace: "demo".into(),
            name: "echo".into(),
        },
        true,
    ))
}

/// The lines of `name` series (not HELP/TYPE).
fn series(registry: &Registry, name: &str) -> Vec<String> {
    registry
        .render()
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .map(str::to_string)
        .collect()
}

#[derive(Debug, thiserror::Error)]
#[error("denied by DENY policy demo/deny-all")]
struct Denied;

impl ResponseFlag for Denied {
    fn response_flag(&self) -> ResponseFlags {
        ResponseFlags::DENY
    }
}

#[test]
fn a_connection_dropped_without_a_result_is_counted_closed_with_its_bytes() {
    let _serial = serial();
    let registry = Registry::new();
    describe_tcp(&registry);
    let (logs, _guard) = Logs::capture();
    {
        let mut conn = ConnectionGuard::open(
            &registry,
            labels(Reporter::Source),
            addr("10.0.0.1:40000"),
            addr("10.96.0.10:80"),
        );
        conn.set_upstream(addr("10.0.2.5:15008"));
        conn.record_bytes(5, 0);
        conn.record_bytes(12, 30);
        conn.record_bytes(12, 30); // an unchanged report adds nothing
        assert_eq!(conn.bytes(), (12, 30));
        let opened = series(&registry, "istio_tcp_connections_opened_total");
        assert_eq!(opened.len(), 1, "{opened:?}");
        assert!(series(&registry, "istio_tcp_connections_closed_total").is_empty());
        assert_eq!(
            series(&registry, "istio_tcp_sockets_open"),
            ["istio_tcp_sockets_open{reporter=\"source\"} 1"]
        );
    }
    assert_eq!(
        series(&registry, "istio_tcp_sockets_open"),
        ["istio_tcp_sockets_open{reporter=\"source\"} 0"]
    );
    let opened = series(&registry, "istio_tcp_connections_opened_total");
    let closed = series(&registry, "istio_tcp_connections_closed_total");
    assert_eq!(closed.len(), 1);
    for line in opened.iter().chain(&closed) {
        for label in [
            "reporter=\"source\"",
            "source_workload=\"client\"",
            "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"",
            "source_app=\"client\"",
            "source_version=\"v1\"",
            "destination_service=\"echo.demo.svc.cluster.local\"",
            "destination_workload=\"unknown\"",
            "destination_principal=\"unknown\"",
            "request_protocol=\"tcp\"",
            "response_flags=\"-\"",
            "connection_security_policy=\"mutual_tls\"",
            "source_region=\"unknown\"",
        ] {
            assert!(line.contains(label), "{label} missing in {line}");
        }
        assert!(line.ends_with("} 1"), "{line}");
    }
    assert!(series(&registry, "istio_tcp_connections_failed_total").is_empty());
    let received = series(&registry, "istio_tcp_received_bytes_total");
    let sent = series(&registry, "istio_tcp_sent_bytes_total");
    assert!(
        received.len() == 1 && received[0].ends_with("} 12"),
        "{received:?}"
    );
    assert!(sent.len() == 1 && sent[0].ends_with("} 30"), "{sent:?}");

    let log = logs.text();
    for field in [
        "connection complete",
        "direction=\"outbound\"",
        "src.addr=10.0.0.1:40000",
        "src.workload=demo/client-7d9f",
        "src.identity=spiffe://cluster.local/ns/demo/sa/client",
        "dst.addr=10.96.0.10:80",
        "dst.upstream=10.0.2.5:15008",
        "dst.service=echo.demo.svc.cluster.local",
        "dst.workload=-",
        "bytes_received=12",
        "bytes_sent=30",
        "duration_ms=",
    ] {
        assert!(log.contains(field), "{field} missing in {log}");
    }
}

#[test]
fn a_failed_connection_carries_the_errors_flag_into_metrics_and_log() {
    let _serial = serial();
    let registry = Registry::new();
    let (logs, _guard) = Logs::capture();
    let mut conn = ConnectionGuard::open(
        &registry,
        labels(Reporter::Destination),
        addr("10.0.0.1:40000"),
        addr("10.0.2.5:8080"),
    );
    conn.fail(&Denied);
    conn.fail_with(ResponseFlags::CONNECT, "later failure is ignored");
    assert!(conn.failed());
    drop(conn);
    let closed = series(&registry, "istio_tcp_connections_closed_total");
    assert_eq!(closed.len(), 1);
    assert!(closed[0].contains("response_flags=\"DENY\""), "{closed:?}");
    assert!(closed[0].contains("reporter=\"destination\""), "{closed:?}");
    let failed = series(&registry, "istio_tcp_connections_failed_total");
    assert!(failed.len() == 1 && failed[0].contains("response_flags=\"DENY\""));
    assert!(failed[0].ends_with("} 1"));
    // Opened is counted without flags.
    let opened = series(&registry, "istio_tcp_connections_opened_total");
    assert!(opened[0].contains("response_flags=\"-\""));
    let log = logs.text();
    assert!(log.contains("WARN"), "{log}");
    assert!(log.contains("connection failed"), "{log}");
    assert!(log.contains("direction=\"inbound\""), "{log}");
    assert!(log.contains("response_flags=\"DENY\""), "{log}");
    assert!(
        log.contains("error=\"denied by DENY policy demo/deny-all\""),
        "{log}"
    );
    assert!(!log.contains("later failure"), "{log}");
}

#[test]
fn connections_sharing_one_label_set_add_up_in_its_series() {
    let _serial = serial();
    let registry = Registry::new();
    let (_logs, _guard) = Logs::capture();
    let shared = labels(Reporter::Source);
    for (received, flags) in [
        (10, None),
        (20, Some(Denied)),
        (30, None),
        (40, Some(Denied)),
    ] {
        let mut conn = ConnectionGuard::open(
            &registry,
            shared.clone(),
            addr("10.0.0.1:40000"),
            addr("10.96.0.10:80"),
        );
        conn.record_bytes(received, 1);
        if let Some(error) = flags {
            conn.fail(&error);
        }
    }
    let value = |name: &str, flags: &str| -> Vec<String> {
        series(&registry, name)
            .into_iter()
            .filter(|l| l.contains(&format!("response_flags=\"{flags}\"")))
            .map(|l| l.rsplit(' ').next().unwrap().to_string())
            .collect()
    };
    assert_eq!(value("istio_tcp_connections_opened_total", "-"), ["4"]);
    assert_eq!(value("istio_tcp_received_bytes_total", "-"), ["100"]);
    assert_eq!(value("istio_tcp_sent_bytes_total", "-"), ["4"]);
    assert_eq!(value("istio_tcp_connections_closed_total", "-"), ["2"]);
    assert_eq!(value("istio_tcp_connections_closed_total", "DENY"), ["2"]);
    assert_eq!(value("istio_tcp_connections_failed_total", "DENY"), ["2"]);
    assert!(value("istio_tcp_connections_failed_total", "-").is_empty());
    assert_eq!(
        series(&registry, "istio_tcp_sockets_open"),
        ["istio_tcp_sockets_open{reporter=\"source\"} 0"]
    );
}

#[tokio::test]
async fn a_cancelled_connection_task_is_still_counted() {
    let registry = Registry::new();
    let task_registry = registry.clone();
    let (opened_tx, opened_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut conn = ConnectionGuard::open(
            &task_registry,
            labels(Reporter::Source),
            addr("10.0.0.1:40000"),
            addr("10.96.0.10:80"),
        );
        conn.record_bytes(3, 4);
        let _ = opened_tx.send(());
        // A copy that never ends: only cancellation stops it.
        std::future::pending::<()>().await;
        drop(conn);
    });
    opened_rx.await.unwrap();
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    let closed = series(&registry, "istio_tcp_connections_closed_total");
    assert!(
        closed.len() == 1 && closed[0].ends_with("} 1"),
        "{closed:?}"
    );
    assert!(series(&registry, "istio_tcp_received_bytes_total")[0].ends_with("} 3"));
}

fn request(
    method: Method,
    uri: &str,
    headers: &[(&'static str, &str)],
) -> (Method, Uri, HeaderMap) {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.insert(*k, v.parse().unwrap());
    }
    (method, uri.parse().unwrap(), map)
}

#[test]
fn a_request_records_istio_series_and_envoy_buckets() {
    let _serial = serial();
    let registry = Registry::new();
    describe_http(&registry);
    let (logs, _guard) = Logs::capture();
    let (method, uri, headers) = request(
        Method::POST,
        "/api/items?page=2",
        &[
            ("host", "echo.demo.svc.cluster.local"),
            ("x-request-id", "req-42"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        ],
    );
    let mut req = RequestGuard::start(
        &registry,
        labels(Reporter::Waypoint),
        addr("10.0.0.1:40000"),
        &method,
        &uri,
        &headers,
    );
    req.set_upstream(addr("10.0.2.5:8080"));
    req.add_request_bytes(700);
    req.respond(201);
    req.add_response_bytes(20);
    req.add_response_bytes(30);
    drop(req);

    let text = registry.render();
    let total = series(&registry, "istio_requests_total");
    assert_eq!(total.len(), 1, "{text}");
    for label in [
        "reporter=\"waypoint\"",
        "source_workload=\"client\"",
        "destination_service_name=\"echo\"",
        "request_protocol=\"http\"",
        "response_code=\"201\"",
        "grpc_response_status=\"unknown\"",
        "response_flags=\"-\"",
        "connection_security_policy=\"mutual_tls\"",
    ] {
        assert!(total[0].contains(label), "{label} missing in {}", total[0]);
    }
    assert!(total[0].ends_with("} 1"));
    for name in [
        "istio_request_duration_milliseconds",
        "istio_request_bytes",
        "istio_response_bytes",
    ] {
        assert!(text.contains(&format!("# TYPE {name} histogram")), "{text}");
        assert!(text.contains(&format!("# HELP {name} ")), "{text}");
    }
    let bucket = |name: &str, le: &str| {
        text.lines()
            .find(|l| {
                l.starts_with(&format!("{name}_bucket{{")) && l.contains(&format!("le=\"{le}\""))
            })
            .unwrap_or_else(|| panic!("no {name} bucket le={le} in {text}"))
            .to_string()
    };
    // Envoy's default boundaries: 0.5 1 5 10 25 50 100 250 500 1000 ... 3600000.
    assert!(bucket("istio_request_bytes", "500").ends_with(" 0"));
    assert!(bucket("istio_request_bytes", "1000").ends_with(" 1"));
    assert!(bucket("istio_response_bytes", "25").ends_with(" 0"));
    assert!(bucket("istio_response_bytes", "50").ends_with(" 1"));
    assert!(bucket("istio_request_duration_milliseconds", "3600000").ends_with(" 1"));
    assert!(bucket("istio_request_duration_milliseconds", "+Inf").ends_with(" 1"));
    assert!(bucket("istio_request_duration_milliseconds", "0.5").contains("response_code=\"201\""));
    assert!(
        text.lines()
            .any(|l| l.starts_with("istio_response_bytes_sum{") && l.ends_with(" 50")),
        "{text}"
    );

    let log = logs.text();
    for field in [
        "request complete",
        "direction=\"waypoint\"",
        "http.method=POST",
        "http.path=/api/items?page=2",
        "http.authority=echo.demo.svc.cluster.local",
        "http.status=201",
        "dst.upstream=10.0.2.5:8080",
        "request_id=req-42",
        "trace_id=4bf92f3577b34da6a3ce929d0e0e4736",
        "bytes_received=700",
        "bytes_sent=50",
        "response_flags=-",
    ] {
        assert!(log.contains(field), "{field} missing in {log}");
    }
}

#[test]
fn a_request_dropped_before_its_response_is_a_downstream_disconnect() {
    let _serial = serial();
    let registry = Registry::new();
    let (method, uri, headers) = request(Method::GET, "http://echo.demo:80/", &[]);
    drop(RequestGuard::start(
        &registry,
        labels(Reporter::Waypoint),
        addr("10.0.0.1:40000"),
        &method,
        &uri,
        &headers,
    ));
    let total = series(&registry, "istio_requests_total");
    assert!(total[0].contains("response_code=\"0\""), "{total:?}");
    assert!(total[0].contains("response_flags=\"DC\""), "{total:?}");
}

#[derive(Debug, thiserror::Error)]
#[error("service demo/echo has no healthy endpoint")]
struct NoHealthyUpstream;

impl ResponseFlag for NoHealthyUpstream {
    fn response_flag(&self) -> ResponseFlags {
        ResponseFlags::NO_HEALTHY_UPSTREAM
    }
}

#[test]
fn a_grpc_failure_reports_its_status_and_flag() {
    let _serial = serial();
    let registry = Registry::new();
    let (logs, _guard) = Logs::capture();
    let (method, uri, headers) = request(
        Method::POST,
        "/echo.Echo/Call",
        &[("content-type", "application/grpc+proto")],
    );
    let mut req = RequestGuard::start(
        &registry,
        labels(Reporter::Waypoint),
        addr("10.0.0.1:40000"),
        &method,
        &uri,
        &headers,
    );
    req.fail(&NoHealthyUpstream);
    req.respond(200);
    req.set_grpc_status(14);
    drop(req);
    let total = series(&registry, "istio_requests_total");
    for label in [
        "request_protocol=\"grpc\"",
        "response_code=\"200\"",
        "grpc_response_status=\"14\"",
        "response_flags=\"UH\"",
    ] {
        assert!(total[0].contains(label), "{label} missing in {total:?}");
    }
    let log = logs.text();
    assert!(log.contains("request failed"), "{log}");
    assert!(
        log.contains("error=service demo/echo has no healthy endpoint"),
        "{log}"
    );
}

#[test]
fn trace_ids_come_only_from_well_formed_traceparents() {
    let _serial = serial();
    assert_eq!(
        trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );
    assert_eq!(trace_id("00-xyz-00f067aa0ba902b7-01"), None);
    assert_eq!(trace_id(""), None);
}
