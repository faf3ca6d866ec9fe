//! `ambitctl ztunnel-config`: a node's ztunnel state from its `/config_dump`, as istioctl shows it.
//!
//! The dump is read from each lab node's ztunnel (its admin port is on the loopback of the node's
//! network namespace) or, with `--admin`, from any URL (a port-forwarded cluster ztunnel). The
//! tables have `istioctl ztunnel-config`'s columns:
//!
//! - workloads: `NAMESPACE POD NAME ADDRESS NODE WAYPOINT PROTOCOL`
//! - services: `NAMESPACE SERVICE NAME SERVICE VIP WAYPOINT ENDPOINTS`
//! - policies: `NAMESPACE POLICY NAME ACTION SCOPE`
//! - certificates: `CERTIFICATE NAME TYPE STATUS VALID CERT SERIAL NUMBER NOT AFTER NOT BEFORE`
//! - connections: `WORKLOAD DIRECTION LOCAL REMOTE REMOTE TARGET PROTOCOL`, then Ambit's
//!   `PEER IDENTITY SENT RECEIVED` (bytes the workload sent and received on the connection).
//!
//! Workloads, services and policies are the same on every ztunnel (the mesh's state), so with
//! several nodes their rows are shown once; certificates and connections belong to one node, and
//! get a leading `NODE` column when several nodes are shown.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};

/// `ambitctl ztunnel-config` arguments.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// workloads, services, policies, certificates, connections or all.
    what: String,
    /// The lab node whose ztunnel to ask (default: every node).
    #[arg(long)]
    node: Option<String>,
    /// Output format: `short` (table) or `json`.
    #[arg(short = 'o', long = "output", default_value = "short")]
    output: String,
    /// Read this admin endpoint instead of the lab's (e.g. `http://127.0.0.1:15000` after
    /// `kubectl port-forward ds/ztunnel 15000`); `/config_dump` is added when no path is given.
    #[arg(long)]
    admin: Option<String>,
}

/// What went wrong, naming the argument, node or address at fault.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    /// The first argument names no table.
    #[error(
        "unknown table {0:?}: choose workloads, services, policies, certificates, connections or all"
    )]
    UnknownTable(String),
    /// `-o` is neither `short` nor `json`.
    #[error("-o {0:?}: choose short or json")]
    UnknownOutput(String),
    /// `--node` names no lab node.
    #[error("--node {node}: no such node in the lab (nodes: {known})")]
    UnknownNode {
        /// The name given.
        node: String,
        /// The lab's nodes.
        known: String,
    },
    /// `--admin` is not an `http://host:port[/path]` URL.
    #[error("--admin {0:?}: expected http://host:port[/path]")]
    BadUrl(String),
    /// The admin endpoint could not be reached or did not answer 200.
    #[error("{origin}: {reason}")]
    Fetch {
        /// Where the dump was read from.
        origin: String,
        /// Why it failed.
        reason: String,
    },
    /// The answer is not a JSON config dump.
    #[error("{origin}: the config dump is not JSON: {reason}")]
    NotJson {
        /// Where the dump was read from.
        origin: String,
        /// The parse error.
        reason: String,
    },
}

/// The tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Table {
    Workloads,
    Services,
    Policies,
    Certificates,
    Connections,
}

impl Table {
    const ALL: [Table; 5] = [
        Table::Workloads,
        Table::Services,
        Table::Policies,
        Table::Certificates,
        Table::Connections,
    ];

    /// The dump key the table reads.
    fn key(self) -> &'static str {
        match self {
            Table::Workloads => "workloads",
            Table::Services => "services",
            Table::Policies => "policies",
            Table::Certificates => "certificates",
            Table::Connections => "workloadState",
        }
    }
}

fn tables(what: &str) -> Result<Vec<Table>, ConfigError> {
    Ok(match what {
        "workloads" | "workload" => vec![Table::Workloads],
        "services" | "service" => vec![Table::Services],
        "policies" | "policy" => vec![Table::Policies],
        "certificates" | "certificate" | "secret" => vec![Table::Certificates],
        "connections" | "connection" => vec![Table::Connections],
        "all" => Table::ALL.to_vec(),
        other => return Err(ConfigError::UnknownTable(other.to_string())),
    })
}

/// One ztunnel's dump.
#[derive(Debug)]
struct NodeDump {
    node: String,
    dump: Value,
}

/// Runs `ambitctl ztunnel-config`.
pub(crate) fn run(args: Args) -> anyhow::Result<i32> {
    let tables = tables(&args.what)?;
    let json = match args.output.as_str() {
        "short" => false,
        "json" => true,
        other => return Err(ConfigError::UnknownOutput(other.to_string()).into()),
    };
    let dumps = match &args.admin {
        Some(url) => vec![NodeDump {
            node: url.clone(),
            dump: fetch_url(url)?,
        }],
        None => lab_dumps(args.node.as_deref())?,
    };
    if json {
        println!("{:#}", json_output(&tables, &dumps));
    } else {
        print!("{}", render_all(&tables, &dumps, SystemTime::now()));
    }
    Ok(0)
}

const NO_ANSWER: &str =
    "no answer (is the lab up and the ztunnel running? see `ambitctl lab status`)";

/// Every lab node's dump (or only `node`'s).
fn lab_dumps(node: Option<&str>) -> anyhow::Result<Vec<NodeDump>> {
    let nodes = crate::lab::nodes()?;
    let chosen: Vec<&(String, String)> = match node {
        None => nodes.iter().collect(),
        Some(name) => {
            let found: Vec<_> = nodes.iter().filter(|(n, _)| n == name).collect();
            if found.is_empty() {
                return Err(ConfigError::UnknownNode {
                    node: name.to_string(),
                    known: nodes
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                }
                .into());
            }
            found
        }
    };
    let admin = SocketAddr::from(([127, 0, 0, 1], 15000));
    let mut dumps = Vec::new();
    for (name, netns) in chosen {
        let source = format!("node {name}'s ztunnel (127.0.0.1:15000 in netns {netns})");
        let unreachable = || ConfigError::Fetch {
            origin: source.clone(),
            reason: NO_ANSWER.into(),
        };
        let (status, body) =
            crate::lab::get_in_netns(netns, admin, "/config_dump").ok_or_else(unreachable)?;
        dumps.push(NodeDump {
            node: name.clone(),
            dump: parse(&source, status, &body)?,
        });
    }
    Ok(dumps)
}

fn parse(source: &str, status: u16, body: &str) -> Result<Value, ConfigError> {
    if status != 200 {
        return Err(ConfigError::Fetch {
            origin: source.to_string(),
            reason: format!("HTTP {status}: {}", body.trim()),
        });
    }
    serde_json::from_str(body).map_err(|e| ConfigError::NotJson {
        origin: source.to_string(),
        reason: e.to_string(),
    })
}

/// `http://host:port[/path]` → (address, path).
fn parse_url(url: &str) -> Result<(String, String), ConfigError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ConfigError::BadUrl(url.to_string()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty() || !authority.contains(':') {
        return Err(ConfigError::BadUrl(url.to_string()));
    }
    let path = if path.is_empty() || path == "/" {
        "/config_dump"
    } else {
        path
    };
    Ok((authority.to_string(), path.to_string()))
}

fn fetch_url(url: &str) -> Result<Value, ConfigError> {
    let (authority, path) = parse_url(url)?;
    let fail = |reason: String| ConfigError::Fetch {
        origin: url.to_string(),
        reason,
    };
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| fail(e.to_string()))?
        .next()
        .ok_or_else(|| fail("the host resolves to no address".into()))?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| fail(format!("connecting to {addr}: {e}")))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| fail(e.to_string()))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| fail(e.to_string()))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| fail(e.to_string()))?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    parse(url, status, body)
}

/// `-o json`: the tables' sections of the dump; with several nodes, by node.
fn json_output(tables: &[Table], dumps: &[NodeDump]) -> Value {
    let section = |dump: &Value| -> Value {
        if tables.len() == 1 {
            dump[tables[0].key()].clone()
        } else {
            dump.clone()
        }
    };
    match dumps {
        [one] => section(&one.dump),
        several => Value::Object(
            several
                .iter()
                .map(|d| (d.node.clone(), section(&d.dump)))
                .collect::<Map<String, Value>>(),
        ),
    }
}

/// Every requested table, separated by blank lines.
fn render_all(tables: &[Table], dumps: &[NodeDump], now: SystemTime) -> String {
    let mut out = String::new();
    for (i, table) in tables.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let (rows, padding) = match table {
            Table::Workloads => (workloads(dumps), 1),
            Table::Services => (services(dumps), 1),
            Table::Policies => (policies(dumps), 1),
            Table::Certificates => (certificates(dumps, now), 5),
            Table::Connections => (connections(dumps), 1),
        };
        out.push_str(&render(&rows, padding));
    }
    out
}

/// Aligned columns: each but the last padded to its widest cell plus `padding` spaces (as Go's
/// tabwriter does for istioctl).
fn render(rows: &[Vec<String>], padding: usize) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}", width = widths[c] + padding);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn items(v: &Value) -> Vec<&Value> {
    match v {
        Value::Array(list) => list.iter().collect(),
        // Older upstream dumps key workloads and services by address.
        Value::Object(map) => map.values().collect(),
        _ => Vec::new(),
    }
}

/// Rows seen on several ztunnels once, by `key`, in the order of the first dump that has them.
fn merged<'a>(
    dumps: &'a [NodeDump],
    section: &str,
    key: impl Fn(&Value) -> String,
) -> Vec<&'a Value> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for d in dumps {
        for item in items(&d.dump[section]) {
            if seen.insert(key(item)) {
                out.push(item);
            }
        }
    }
    out
}

/// The name of the waypoint a `{"destination": "ns/hostname" | "network/ip"}` reference points
/// to: the service's name when the dump has it, `None` without a waypoint.
fn waypoint_name(waypoint: &Value, services: &[&Value]) -> String {
    let Some(destination) = waypoint["destination"].as_str() else {
        return "None".to_string();
    };
    let (left, right) = destination.split_once('/').unwrap_or(("", destination));
    services
        .iter()
        .find(|s| {
            (s["namespace"] == left && s["hostname"] == right)
                || items(&s["vips"])
                    .iter()
                    .any(|v| v.as_str() == Some(destination))
        })
        .map(|s| text(&s["name"]))
        .unwrap_or_else(|| destination.to_string())
}

fn all_services(dumps: &[NodeDump]) -> Vec<&Value> {
    merged(dumps, "services", |s| {
        format!("{}/{}", text(&s["namespace"]), text(&s["hostname"]))
    })
}

fn workloads(dumps: &[NodeDump]) -> Vec<Vec<String>> {
    let services = all_services(dumps);
    let mut list = merged(dumps, "workloads", |w| text(&w["uid"]));
    list.sort_by_key(|w| (text(&w["namespace"]), text(&w["name"]), text(&w["node"])));
    let mut rows = vec![header(&[
        "NAMESPACE",
        "POD NAME",
        "ADDRESS",
        "NODE",
        "WAYPOINT",
        "PROTOCOL",
    ])];
    for w in list {
        rows.push(vec![
            text(&w["namespace"]),
            text(&w["name"]),
            text(&w["workloadIps"][0]),
            text(&w["node"]),
            waypoint_name(&w["waypoint"], &services),
            text(&w["protocol"]),
        ]);
    }
    rows
}

fn services(dumps: &[NodeDump]) -> Vec<Vec<String>> {
    let mut list = all_services(dumps);
    let all = list.clone();
    list.sort_by_key(|s| {
        (
            text(&s["namespace"]),
            text(&s["name"]),
            text(&s["hostname"]),
        )
    });
    let mut rows = vec![header(&[
        "NAMESPACE",
        "SERVICE NAME",
        "SERVICE VIP",
        "WAYPOINT",
        "ENDPOINTS",
    ])];
    for s in list {
        let vip = s["vips"][0]
            .as_str()
            .map(|v| v.split_once('/').map_or(v, |(_, ip)| ip).to_string())
            .unwrap_or_default();
        let endpoints = items(&s["endpoints"]);
        let healthy = endpoints
            .iter()
            .filter(|e| e["status"] == "Healthy")
            .count();
        rows.push(vec![
            text(&s["namespace"]),
            text(&s["name"]),
            vip,
            waypoint_name(&s["waypoint"], &all),
            format!("{healthy}/{}", endpoints.len()),
        ]);
    }
    rows
}

fn policies(dumps: &[NodeDump]) -> Vec<Vec<String>> {
    let mut list = merged(dumps, "policies", |p| {
        format!("{}/{}", text(&p["namespace"]), text(&p["name"]))
    });
    list.sort_by_key(|p| (text(&p["namespace"]), text(&p["name"])));
    let mut rows = vec![header(&["NAMESPACE", "POLICY NAME", "ACTION", "SCOPE"])];
    for p in list {
        rows.push(vec![
            text(&p["namespace"]),
            text(&p["name"]),
            text(&p["action"]),
            text(&p["scope"]),
        ]);
    }
    rows
}

fn header(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// With several nodes, a leading NODE column.
fn per_node(dumps: &[NodeDump], names: &[&str]) -> (bool, Vec<String>) {
    let several = dumps.len() > 1;
    let mut head = Vec::new();
    if several {
        head.push("NODE".to_string());
    }
    head.extend(header(names));
    (several, head)
}

fn certificates(dumps: &[NodeDump], now: SystemTime) -> Vec<Vec<String>> {
    let (several, head) = per_node(
        dumps,
        &[
            "CERTIFICATE NAME",
            "TYPE",
            "STATUS",
            "VALID CERT",
            "SERIAL NUMBER",
            "NOT AFTER",
            "NOT BEFORE",
        ],
    );
    let mut rows = vec![head];
    for d in dumps {
        for c in items(&d.dump["certificates"]) {
            let identity = text(&c["identity"]);
            let state = text(&c["state"]);
            let state = if state.starts_with("Unavailable") {
                "Unavailable".to_string()
            } else {
                state
            };
            let mut entries: Vec<(&str, &Value)> = Vec::new();
            for (i, cert) in items(&c["certChain"]).into_iter().enumerate() {
                entries.push((if i == 0 { "Leaf" } else { "Intermediate" }, cert));
            }
            for cert in items(&c["rootCerts"]) {
                entries.push(("Root", cert));
            }
            let mut push = |cells: Vec<String>| {
                let mut row = Vec::new();
                if several {
                    row.push(d.node.clone());
                }
                row.extend(cells);
                rows.push(row);
            };
            if entries.is_empty() {
                push(vec![
                    identity.clone(),
                    "NA".into(),
                    state.clone(),
                    "false".into(),
                    "NA".into(),
                    "NA".into(),
                    "NA".into(),
                ]);
            }
            for (kind, cert) in entries {
                let from = text(&cert["validFrom"]);
                let to = text(&cert["expirationTime"]);
                push(vec![
                    identity.clone(),
                    kind.to_string(),
                    state.clone(),
                    valid_at(&from, &to, now).to_string(),
                    decimal_to_hex(&text(&cert["serialNumber"])).unwrap_or_else(|| "NA".into()),
                    or_na(to),
                    or_na(from),
                ]);
            }
        }
    }
    rows
}

fn or_na(s: String) -> String {
    if s.is_empty() { "NA".to_string() } else { s }
}

/// True when `now` is within [`from`, `to`] (RFC 3339).
fn valid_at(from: &str, to: &str, now: SystemTime) -> bool {
    match (humantime::parse_rfc3339(from), humantime::parse_rfc3339(to)) {
        (Ok(from), Ok(to)) => from <= now && now <= to,
        _ => false,
    }
}

/// A decimal serial number in lower-case hex, as istioctl prints it.
fn decimal_to_hex(decimal: &str) -> Option<String> {
    if decimal.is_empty() || !decimal.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Big-endian base-256 digits, multiplied by ten and added to per decimal digit.
    let mut bytes: Vec<u8> = vec![0];
    for digit in decimal.bytes().map(|b| b - b'0') {
        let mut carry = u16::from(digit);
        for byte in bytes.iter_mut().rev() {
            let v = u16::from(*byte) * 10 + carry;
            *byte = (v & 0xff) as u8;
            carry = v >> 8;
        }
        while carry > 0 {
            bytes.insert(0, (carry & 0xff) as u8);
            carry >>= 8;
        }
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let trimmed = hex.trim_start_matches('0');
    Some(if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed.into()
    })
}

fn connections(dumps: &[NodeDump]) -> Vec<Vec<String>> {
    let (several, head) = per_node(
        dumps,
        &[
            "WORKLOAD",
            "DIRECTION",
            "LOCAL",
            "REMOTE",
            "REMOTE TARGET",
            "PROTOCOL",
            "PEER IDENTITY",
            "SENT",
            "RECEIVED",
        ],
    );
    let mut rows = vec![head];
    for d in dumps {
        let mut pods: Vec<&Value> = items(&d.dump["workloadState"]);
        pods.sort_by_key(|p| (text(&p["info"]["namespace"]), text(&p["info"]["name"])));
        for pod in pods {
            let name = format!(
                "{}.{}",
                text(&pod["info"]["name"]),
                text(&pod["info"]["namespace"])
            );
            for (direction, key) in [("Inbound", "inbound"), ("Outbound", "outbound")] {
                for c in items(&pod["connections"][key]) {
                    // The workload's own view: outbound it is the client, inbound the server.
                    let (local, remote, sent, received) = if key == "inbound" {
                        (
                            &c["actualDst"],
                            &c["src"],
                            &c["bytesSent"],
                            &c["bytesReceived"],
                        )
                    } else {
                        (
                            &c["src"],
                            &c["actualDst"],
                            &c["bytesReceived"],
                            &c["bytesSent"],
                        )
                    };
                    let mut row = Vec::new();
                    if several {
                        row.push(d.node.clone());
                    }
                    row.extend([
                        name.clone(),
                        direction.to_string(),
                        text(local),
                        text(remote),
                        text(&c["originalDst"]),
                        text(&c["protocol"]),
                        text(&c["peerIdentity"]),
                        text(sent),
                        text(received),
                    ]);
                    rows.push(row);
                }
            }
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A dump shaped like ztunnel's: two demo pods, the waypoint's service, a policy, one
    /// identity's certificate and one open connection each way.
    fn dump(node: &str, outbound_bytes: u64) -> NodeDump {
        NodeDump {
            node: node.into(),
            dump: json!({
                "workloads": [
                    {"uid": "Kubernetes//Pod/demo/echo-v1", "name": "echo-v1", "namespace": "demo",
                     "workloadIps": ["10.10.1.3"], "node": "node-2", "protocol": "HBONE",
                     "waypoint": {"destination": "demo/waypoint.demo.svc.cluster.local", "hboneMtlsPort": 15008}},
                    {"uid": "Kubernetes//Pod/demo/client", "name": "client", "namespace": "demo",
                     "workloadIps": ["10.10.0.2"], "node": "node-1", "protocol": "HBONE"},
                    {"uid": "Kubernetes//Pod/legacy/client", "name": "client", "namespace": "legacy",
                     "workloadIps": ["10.10.0.9"], "node": "node-1", "protocol": "TCP"},
                ],
                "services": [
                    {"name": "echo", "namespace": "demo", "hostname": "echo.demo.svc.cluster.local",
                     "vips": ["/10.96.0.10"], "ports": {"80": 8080},
                     "endpoints": {"a": {"status": "Healthy"}, "b": {"status": "Unhealthy"}},
                     "waypoint": {"destination": "demo/waypoint.demo.svc.cluster.local", "hboneMtlsPort": 15008}},
                    {"name": "waypoint", "namespace": "demo", "hostname": "waypoint.demo.svc.cluster.local",
                     "vips": ["/10.96.0.20"], "ports": {"15008": 15008}, "endpoints": {"w": {"status": "Healthy"}}},
                ],
                "policies": [
                    {"name": "echo-allow", "namespace": "demo", "action": "Allow", "scope": "WorkloadSelector", "rules": [], "dryRun": false},
                ],
                "certificates": [
                    {"identity": "spiffe://cluster.local/ns/demo/sa/client", "state": "Available",
                     "certChain": [{"pem": "", "serialNumber": "255", "validFrom": "2026-12-01T00:00:00Z", "expirationTime": "2026-12-02T00:00:00Z"}],
                     "rootCerts": [{"pem": "", "serialNumber": "4096", "validFrom": "2026-01-01T00:00:00Z", "expirationTime": "2036-01-01T00:00:00Z"}]},
                    {"identity": "spiffe://cluster.local/ns/demo/sa/echo", "state": "Unavailable: CA refused", "certChain": [], "rootCerts": []},
                ],
                "workloadState": {
                    "Kubernetes//Pod/demo/client": {
                        "state": "Up",
                        "info": {"name": "client", "namespace": "demo", "trustDomain": "cluster.local", "serviceAccount": "client"},
                        "connections": {
                            "inbound": [],
                            "outbound": [{"src": "10.10.0.2:40000", "originalDst": "10.96.0.10:80", "actualDst": "10.10.1.5:15008",
                                          "protocol": "HBONE", "peerIdentity": "spiffe://cluster.local/ns/demo/sa/waypoint",
                                          "bytesSent": 300, "bytesReceived": outbound_bytes}],
                        },
                    },
                    "Kubernetes//Pod/demo/echo-v1": {
                        "state": "Up",
                        "info": {"name": "echo-v1", "namespace": "demo", "trustDomain": "cluster.local", "serviceAccount": "echo"},
                        "connections": {
                            "inbound": [{"src": "10.10.1.5:50000", "originalDst": "echo.demo.svc.cluster.local", "actualDst": "10.10.1.3:8080",
                                         "protocol": "HBONE", "peerIdentity": "spiffe://cluster.local/ns/demo/sa/waypoint",
                                         "bytesSent": 7, "bytesReceived": 9}],
                            "outbound": [],
                        },
                    },
                },
            }),
        }
    }

    fn now() -> SystemTime {
        humantime::parse_rfc3339("2026-12-01T12:00:00Z").unwrap()
    }

    #[test]
    fn workloads_have_istioctls_columns_and_name_the_waypoint() {
        let out = render_all(&[Table::Workloads], &[dump("node-1", 5)], now());
        assert_eq!(
            out,
            "\
NAMESPACE POD NAME ADDRESS   NODE   WAYPOINT PROTOCOL
demo      client   10.10.0.2 node-1 None     HBONE
demo      echo-v1  10.10.1.3 node-2 waypoint HBONE
legacy    client   10.10.0.9 node-1 None     TCP
"
        );
    }

    #[test]
    fn several_nodes_show_mesh_state_once() {
        let out = render_all(
            &[Table::Workloads, Table::Policies],
            &[dump("node-1", 5), dump("node-2", 5)],
            now(),
        );
        assert_eq!(out.matches("echo-v1").count(), 1, "{out}");
        assert_eq!(out.matches("echo-allow").count(), 1, "{out}");
        assert!(!out.contains("NODE   NAMESPACE"), "{out}");
    }

    #[test]
    fn services_show_vip_waypoint_and_healthy_endpoints() {
        let out = render_all(&[Table::Services], &[dump("node-1", 5)], now());
        assert_eq!(
            out,
            "\
NAMESPACE SERVICE NAME SERVICE VIP WAYPOINT ENDPOINTS
demo      echo         10.96.0.10  waypoint 1/2
demo      waypoint     10.96.0.20  None     1/1
"
        );
    }

    #[test]
    fn policies_show_action_and_scope() {
        let out = render_all(&[Table::Policies], &[dump("node-1", 5)], now());
        assert_eq!(
            out,
            "\
NAMESPACE POLICY NAME ACTION SCOPE
demo      echo-allow  Allow  WorkloadSelector
"
        );
    }

    #[test]
    fn certificates_show_leaf_and_root_with_validity_and_hex_serials() {
        let out = render_all(&[Table::Certificates], &[dump("node-1", 5)], now());
        let lines: Vec<Vec<&str>> = out
            .lines()
            .map(|l| {
                l.split("     ")
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .collect()
            })
            .collect();
        assert_eq!(
            lines[0],
            [
                "CERTIFICATE NAME",
                "TYPE",
                "STATUS",
                "VALID CERT",
                "SERIAL NUMBER",
                "NOT AFTER",
                "NOT BEFORE"
            ]
        );
        assert_eq!(
            lines[1],
            [
                "spiffe://cluster.local/ns/demo/sa/client",
                "Leaf",
                "Available",
                "true",
                "ff",
                "2026-12-02T00:00:00Z",
                "2026-12-01T00:00:00Z"
            ]
        );
        assert_eq!(lines[2][1..5], ["Root", "Available", "true", "1000"]);
        assert_eq!(
            lines[3],
            [
                "spiffe://cluster.local/ns/demo/sa/echo",
                "NA",
                "Unavailable",
                "false",
                "NA",
                "NA",
                "NA"
            ]
        );
    }

    #[test]
    fn connections_show_each_direction_from_the_workloads_side_with_a_node_column() {
        let out = render_all(
            &[Table::Connections],
            &[dump("node-1", 5), dump("node-2", 6)],
            now(),
        );
        let lines: Vec<Vec<&str>> = out
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            lines[0],
            [
                "NODE",
                "WORKLOAD",
                "DIRECTION",
                "LOCAL",
                "REMOTE",
                "REMOTE",
                "TARGET",
                "PROTOCOL",
                "PEER",
                "IDENTITY",
                "SENT",
                "RECEIVED"
            ]
        );
        assert_eq!(
            lines[1],
            [
                "node-1",
                "client.demo",
                "Outbound",
                "10.10.0.2:40000",
                "10.10.1.5:15008",
                "10.96.0.10:80",
                "HBONE",
                "spiffe://cluster.local/ns/demo/sa/waypoint",
                "5",
                "300"
            ]
        );
        assert_eq!(
            lines[2],
            [
                "node-1",
                "echo-v1.demo",
                "Inbound",
                "10.10.1.3:8080",
                "10.10.1.5:50000",
                "echo.demo.svc.cluster.local",
                "HBONE",
                "spiffe://cluster.local/ns/demo/sa/waypoint",
                "7",
                "9"
            ]
        );
        assert_eq!(lines[3][0], "node-2");
        assert_eq!(lines.len(), 5);
        // One node: no NODE column.
        let one = render_all(&[Table::Connections], &[dump("node-1", 5)], now());
        assert!(one.starts_with("WORKLOAD "), "{one}");
    }

    #[test]
    fn json_output_is_the_section_or_the_dump_by_node() {
        let one = json_output(&[Table::Policies], &[dump("node-1", 5)]);
        assert_eq!(one[0]["name"], "echo-allow");
        let two = json_output(&[Table::Workloads], &[dump("node-1", 5), dump("node-2", 5)]);
        assert_eq!(two["node-2"][0]["name"], "echo-v1");
        let all = json_output(&Table::ALL, &[dump("node-1", 5)]);
        assert!(all["workloadState"].is_object());
    }

    #[test]
    fn arguments_are_checked_naming_the_value() {
        assert_eq!(tables("all").unwrap().len(), 5);
        let err = tables("pods").unwrap_err().to_string();
        assert!(
            err.contains("\"pods\"") && err.contains("workloads"),
            "{err}"
        );
        assert_eq!(
            parse_url("http://127.0.0.1:15000").unwrap(),
            ("127.0.0.1:15000".to_string(), "/config_dump".to_string())
        );
        assert_eq!(
            parse_url("http://localhost:15000/config_dump").unwrap().1,
            "/config_dump"
        );
        assert!(parse_url("127.0.0.1:15000").is_err());
        assert!(parse_url("http:///config_dump").is_err());
    }

    #[test]
    fn serial_numbers_convert_to_hex() {
        assert_eq!(decimal_to_hex("0").as_deref(), Some("0"));
        assert_eq!(decimal_to_hex("255").as_deref(), Some("ff"));
        assert_eq!(
            decimal_to_hex("588850990443535479077311695632745359443207891470").as_deref(),
            Some("6724fddbdb30b41f0e1e68d169311a0faca3aa0e")
        );
        assert_eq!(decimal_to_hex("12a"), None);
    }
}
