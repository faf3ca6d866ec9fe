//! `ambitctl lab dashboard`: a live node-level dashboard page served on localhost.
//!
//! One self-contained page (no outside resources: the charts are drawn as SVG by the page's own
//! script) whose panels are those of Ambit's Grafana dashboards (`charts/dashboards/`, built into
//! the binary), with Grafana's variables set to "all". The page asks for Prometheus range
//! queries at `/api/v1/...` on the same origin; the server passes those to the lab's Prometheus
//! in the fabric namespace, so the host needs no route into the lab.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};

use super::prometheus;

/// `ambitctl lab dashboard` arguments.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// The local address to serve the page on.
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: String,
}

/// The page.
const PAGE: &str = include_str!("dashboard.html");
/// The Grafana dashboards the page's panels come from, with the heading each group gets.
const DASHBOARDS: [(&str, &str); 2] = [
    (
        "ztunnel by node",
        include_str!("../../../charts/dashboards/ambit-ztunnel-nodes.json"),
    ),
    (
        "waypoints",
        include_str!("../../../charts/dashboards/ambit-waypoints.json"),
    ),
];
/// What the page's queries use for Grafana's variables: every node, waypoint and service, and a
/// rate window of a minute (many scrapes at the lab's two-second interval).
const VARIABLES: [(&str, &str); 4] = [
    ("$__rate_interval", "1m"),
    ("$node", ".*"),
    ("$waypoint", ".*"),
    ("$service", ".*"),
];
/// The largest request head read.
const MAX_HEAD: usize = 16 * 1024;

/// A dashboard definition the page cannot use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum PanelError {
    /// Not JSON.
    #[error("dashboard {group:?}: not JSON: {detail}")]
    Json {
        /// The group.
        group: String,
        /// serde_json's message.
        detail: String,
    },
    /// A panel without a usable query.
    #[error("dashboard {group:?}: panel {panel:?}: {what}")]
    Panel {
        /// The group.
        group: String,
        /// The panel's title.
        panel: String,
        /// What is wrong.
        what: String,
    },
}

/// The page's panels: one entry per non-row panel of the Grafana dashboards, with its group,
/// id (`<group index>-<panel id>`), title, description, unit and queries (`expr`, `legend`),
/// variables substituted.
pub(crate) fn panels() -> Result<Vec<Value>, PanelError> {
    let mut out = Vec::new();
    for (index, (group, text)) in DASHBOARDS.iter().enumerate() {
        let dashboard: Value = serde_json::from_str(text).map_err(|e| PanelError::Json {
            group: group.to_string(),
            detail: e.to_string(),
        })?;
        for panel in dashboard["panels"].as_array().into_iter().flatten() {
            if panel["type"] == "row" {
                continue;
            }
            let title = panel["title"].as_str().unwrap_or_default();
            let bad = |what: &str| PanelError::Panel {
                group: group.to_string(),
                panel: title.to_string(),
                what: what.to_string(),
            };
            let queries: Vec<Value> = panel["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    let expr = t["expr"]
                        .as_str()
                        .ok_or_else(|| bad("a target has no expr"))?;
                    let expr = substitute(expr);
                    if expr.contains('$') {
                        return Err(bad(&format!("unknown variable in {expr:?}")));
                    }
                    Ok(json!({"expr": expr, "legend": t["legendFormat"].as_str().unwrap_or("")}))
                })
                .collect::<Result<_, _>>()?;
            if queries.is_empty() {
                return Err(bad("no targets"));
            }
            out.push(json!({
                "group": group,
                "id": format!("{index}-{}", panel["id"]),
                "title": title,
                "description": panel["description"].as_str().unwrap_or(""),
                "unit": panel["fieldConfig"]["defaults"]["unit"].as_str().unwrap_or("short"),
                "queries": queries,
            }));
        }
    }
    Ok(out)
}

/// `expr` with Grafana's variables replaced by [`VARIABLES`].
fn substitute(expr: &str) -> String {
    VARIABLES
        .iter()
        .fold(expr.to_string(), |e, (name, value)| e.replace(name, value))
}

/// Runs `ambitctl lab dashboard`: serves the page until interrupted.
pub(crate) fn run(args: Args) -> anyhow::Result<i32> {
    let state = super::load_state()?;
    let fabric = format!("{}fabric", super::prefix());
    if !state.pids.contains_key(prometheus::KEY) {
        anyhow::bail!(
            "this lab runs no Prometheus, so there is nothing to chart: install it (apt-get install prometheus), then `ambitctl lab down` and `ambitctl lab up` again"
        );
    }
    let panels = serde_json::to_string(&panels()?)?;
    let listener = TcpListener::bind(&args.listen)
        .with_context(|| format!("listening on {} (--listen)", args.listen))?;
    println!(
        "Ambit lab dashboard on http://{}/ (Prometheus {} in netns {fabric}, its API at http://{}/api/v1/); Ctrl-C stops it",
        listener.local_addr()?,
        prometheus::LISTEN,
        listener.local_addr()?,
    );
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let fabric = fabric.clone();
        let panels = panels.clone();
        std::thread::spawn(move || {
            let _ = serve(stream, &fabric, &panels);
        });
    }
    Ok(0)
}

/// A response: status, content type, body.
type Reply = (u16, &'static str, Vec<u8>);

/// Answers one request on `stream` and closes it.
fn serve(mut stream: TcpStream, fabric: &str, panels: &str) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let head = read_head(&mut stream)?;
    let (status, content_type, body) = match request_target(&head) {
        Some(("GET", target)) => route(target, panels, |path| {
            super::http::get(fabric, prometheus::LISTEN, path)
        }),
        Some(_) => (405, "text/plain", b"only GET\n".to_vec()),
        None => (400, "text/plain", b"bad request\n".to_vec()),
    };
    write!(
        stream,
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    )?;
    stream.write_all(&body)?;
    stream.flush()
}

fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// The method and target of a request head.
fn request_target(head: &str) -> Option<(&str, &str)> {
    let mut parts = head.lines().next()?.split_whitespace();
    let method = parts.next()?;
    let target = parts.next()?;
    parts
        .next()?
        .starts_with("HTTP/")
        .then_some((method, target))
}

/// What to answer to `GET target`: the page, its panels, or Prometheus's read API through
/// `prometheus` (a GET of the same path and query there; `None` when it did not answer).
fn route(
    target: &str,
    panels: &str,
    prometheus: impl FnOnce(&str) -> Option<(u16, String)>,
) -> Reply {
    let path = target.split('?').next().unwrap_or(target);
    match path {
        "/" | "/index.html" => (200, "text/html; charset=utf-8", PAGE.as_bytes().to_vec()),
        "/panels.json" => (200, "application/json", panels.as_bytes().to_vec()),
        p if p.starts_with("/api/v1/") && !p.starts_with("/api/v1/admin") => {
            match prometheus(target) {
                Some((status, body)) => (status, "application/json", body.into_bytes()),
                None => (
                    502,
                    "application/json",
                    json!({
                        "status": "error",
                        "error": format!("the lab's Prometheus ({} in the fabric namespace) did not answer; is the lab up (`ambitctl lab status`)?", prometheus::LISTEN),
                    })
                    .to_string()
                    .into_bytes(),
                ),
            }
        }
        _ => (
            404,
            "text/plain",
            b"not found: the dashboard is at /, Prometheus's API at /api/v1/\n".to_vec(),
        ),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        422 => "Unprocessable Entity",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric the Grafana dashboards may read: what ztunnel and the waypoint export
    /// (the lab test runs every panel's query against their real series).
    const EXPORTED: &[&str] = &[
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_received_bytes_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_sockets_open",
        "workload_manager_active_proxy_count",
        "workload_manager_pending_proxy_count",
        "ambit_certificate_expiry_seconds",
        "ambit_certificates",
        "istio_xds_message_total",
        "istio_xds_connection_terminations_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "istio_build",
        "istio_requests_total",
        "istio_request_duration_milliseconds_bucket",
    ];

    /// Identifiers followed by `{` in an expression: the metrics it selects.
    fn metrics_in(expr: &str) -> Vec<String> {
        let mut out = Vec::new();
        let bytes = expr.as_bytes();
        for (i, _) in expr.match_indices('{') {
            let start = bytes[..i]
                .iter()
                .rposition(|b| !(b.is_ascii_alphanumeric() || *b == b'_'))
                .map_or(0, |p| p + 1);
            if start < i {
                out.push(expr[start..i].to_string());
            }
        }
        out
    }

    #[test]
    fn the_grafana_dashboards_are_valid_and_read_only_exported_metrics() {
        for (group, text) in DASHBOARDS {
            let dashboard: Value = serde_json::from_str(text).unwrap();
            assert!(dashboard["uid"].as_str().is_some_and(|u| !u.is_empty()));
            assert_eq!(dashboard["templating"]["list"][0]["type"], "datasource");
            let mut ids = std::collections::BTreeSet::new();
            for panel in dashboard["panels"].as_array().unwrap() {
                assert!(
                    ids.insert(panel["id"].as_u64().unwrap()),
                    "{group}: duplicate id"
                );
                if panel["type"] == "row" {
                    continue;
                }
                assert_eq!(
                    panel["datasource"]["uid"], "${datasource}",
                    "{group}: {panel}"
                );
                for target in panel["targets"].as_array().unwrap() {
                    let expr = target["expr"].as_str().unwrap();
                    let metrics = metrics_in(expr);
                    assert!(!metrics.is_empty(), "{group}: no metric in {expr}");
                    for metric in metrics {
                        assert!(
                            EXPORTED.contains(&metric.as_str()),
                            "{group}: {metric} in {expr} is not a metric ztunnel or the waypoint exports"
                        );
                    }
                    assert!(
                        expr.contains("app=\"ztunnel\"") || expr.contains("app=\"waypoint\""),
                        "{group}: {expr} selects no component"
                    );
                }
            }
        }
    }

    #[test]
    fn panels_come_from_both_dashboards_with_variables_substituted() {
        let panels = panels().unwrap();
        let titles: Vec<(&str, &str)> = panels
            .iter()
            .map(|p| (p["group"].as_str().unwrap(), p["title"].as_str().unwrap()))
            .collect();
        for wanted in [
            ("ztunnel by node", "Connections"),
            ("ztunnel by node", "Bytes by direction"),
            ("ztunnel by node", "Denied connections"),
            ("ztunnel by node", "In-pod proxies"),
            ("ztunnel by node", "Certificate expiry"),
            ("ztunnel by node", "xDS pushes"),
            ("ztunnel by node", "xDS connection"),
            ("ztunnel by node", "CPU"),
            ("ztunnel by node", "Memory"),
            ("ztunnel by node", "File descriptors"),
            ("waypoints", "Requests"),
            ("waypoints", "Errors"),
            ("waypoints", "Latency"),
        ] {
            assert!(titles.contains(&wanted), "{wanted:?} missing: {titles:?}");
        }
        let ids: std::collections::BTreeSet<&str> =
            panels.iter().map(|p| p["id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), panels.len(), "panel ids are unique");
        let connections = &panels[0];
        assert_eq!(
            connections["queries"][0]["expr"],
            "sum by (node) (rate(istio_tcp_connections_opened_total{app=\"ztunnel\", node=~\".*\"}[1m]))"
        );
        assert_eq!(connections["queries"][0]["legend"], "opened {{node}}");
        assert_eq!(connections["unit"], "cps");
    }

    #[test]
    fn requests_are_routed_to_the_page_the_panels_or_prometheus() {
        let (status, kind, body) = route("/", "[]", |_| unreachable!());
        assert_eq!((status, kind), (200, "text/html; charset=utf-8"));
        let page = String::from_utf8(body).unwrap();
        assert!(page.contains("data-state") && page.contains("panels.json"));
        // Self-contained: the only URL in the page is the SVG namespace's.
        assert_eq!(
            page.matches("http").count(),
            page.matches("http://www.w3.org/2000/svg").count(),
            "the page refers to nothing outside itself"
        );
        assert_eq!(route("/panels.json", "[1]", |_| None).2, b"[1]");

        let mut asked = String::new();
        let (status, _, body) = route("/api/v1/query_range?query=up&step=5", "", |t| {
            asked = t.to_string();
            Some((200, "{\"status\":\"success\"}".into()))
        });
        assert_eq!(asked, "/api/v1/query_range?query=up&step=5");
        assert_eq!(
            (status, body.as_slice()),
            (200, &b"{\"status\":\"success\"}"[..])
        );

        let (status, _, body) = route("/api/v1/query?query=up", "", |_| None);
        assert_eq!(status, 502);
        assert!(String::from_utf8(body).unwrap().contains("did not answer"));
        assert_eq!(
            route("/api/v1/admin/tsdb/delete_series", "", |_| unreachable!()).0,
            404
        );
        assert_eq!(route("/etc/passwd", "", |_| unreachable!()).0, 404);
    }

    #[test]
    fn request_lines_are_parsed() {
        assert_eq!(
            request_target("GET /panels.json HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(("GET", "/panels.json"))
        );
        assert_eq!(request_target("garbage\r\n\r\n"), None);
        assert_eq!(request_target(""), None);
    }
}
