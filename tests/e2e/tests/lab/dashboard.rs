//! The lab test's checks of the lab's Prometheus and `ambitctl lab dashboard` (called from the
//! demo test in `lab.rs`):
//!
//! - `lab up` started a real Prometheus scraping istiod-lite, every ztunnel and the waypoint
//!   with Kubernetes-style labels;
//! - after traffic, every query of Istio's ztunnel dashboard (but cAdvisor's container panels and
//!   DNS, Ambit has no DNS proxy) and of the mesh, service and workload dashboards' panels that
//!   ztunnel or a waypoint can feed returns data ([`ISTIO_QUERIES`]; the rest are listed in
//!   [`NOT_FEEDABLE`] with the reason);
//! - every panel of the dashboard page's queries returns data through the page's own proxy, and
//!   in headless Chromium every panel reaches `data-state="data"`; a screenshot is kept.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ambit_e2e::binary;
use serde_json::Value;

/// The panels of Istio's dashboards (`istio/istio` `manifests/addons/dashboards`, the queries as
/// the dashboards write them, Grafana variables left in) that ztunnel or a waypoint can feed:
/// (dashboard, panel, ref id, PromQL).
const ISTIO_QUERIES: &[(&str, &str, &str, &str)] = &[
    (
        r#"ztunnel"#,
        r#"Ztunnel Versions"#,
        r#""#,
        r#"sum by (tag) (istio_build{component="ztunnel"})"#,
    ),
    (
        r#"ztunnel"#,
        r#"Connections"#,
        r#""#,
        r#"sum by (pod) (rate(istio_tcp_connections_opened_total{pod=~"ztunnel-.*"}[$__rate_interval]))"#,
    ),
    (
        r#"ztunnel"#,
        r#"Connections"#,
        r#""#,
        r#"-sum by (pod) (rate(istio_tcp_connections_closed_total{pod=~"ztunnel-.*"}[$__rate_interval]))"#,
    ),
    (
        r#"ztunnel"#,
        r#"Bytes Transmitted"#,
        r#""#,
        r#"sum by (pod) (rate(istio_tcp_sent_bytes_total{pod=~"ztunnel-.*"}[$__rate_interval]))"#,
    ),
    (
        r#"ztunnel"#,
        r#"Bytes Transmitted"#,
        r#""#,
        r#"sum by (pod) (rate(istio_tcp_received_bytes_total{pod=~"ztunnel-.*"}[$__rate_interval]))"#,
    ),
    (
        r#"ztunnel"#,
        r#"XDS Connections"#,
        r#""#,
        r#"sum by (pod) (rate(istio_xds_connection_terminations_total{pod=~"ztunnel-.*"}[$__rate_interval]))"#,
    ),
    (
        r#"ztunnel"#,
        r#"XDS Pushes"#,
        r#""#,
        r#"sum by (url) (irate(istio_xds_message_total{pod=~"ztunnel-.*"}[$__rate_interval]))"#,
    ),
    (
        r#"ztunnel"#,
        r#"Workload Manager"#,
        r#""#,
        r#"sum by (pod) (workload_manager_active_proxy_count{pod=~"ztunnel-.*"})"#,
    ),
    (
        r#"ztunnel"#,
        r#"Workload Manager"#,
        r#""#,
        r#"sum by (pod) (workload_manager_pending_proxy_count{pod=~"ztunnel-.*"})"#,
    ),
    (
        r#"ztunnel"#,
        r#"Resource Usage"#,
        r#""#,
        r#"sum by (pod) (istio_tcp_connections_opened_total{app="ztunnel"}) - sum by (pod) (istio_tcp_connections_closed_total{app="ztunnel"})"#,
    ),
    (
        r#"ztunnel"#,
        r#"Resource Usage"#,
        r#""#,
        r#"sum by (pod) (process_open_fds{app="ztunnel"})"#,
    ),
    (
        r#"ztunnel"#,
        r#"Resource Usage"#,
        r#""#,
        r#"sum by (pod) (istio_tcp_sockets_open{app="ztunnel"})"#,
    ),
    (
        r#"mesh"#,
        r#"Traffic Volume"#,
        r#""#,
        r#"round(sum (rate(istio_requests_total{reporter=~"source|waypoint"}[$__rate_interval])), 0.01)"#,
    ),
    (
        r#"mesh"#,
        r#"Success Rate"#,
        r#""#,
        r#"sum (rate(istio_requests_total{reporter=~"source|waypoint",response_code!~"5.."}[$__rate_interval])) / sum (rate(istio_requests_total{reporter=~"source|waypoint"}[$__rate_interval]))"#,
    ),
    (
        r#"mesh"#,
        r#"4xxs"#,
        r#""#,
        r#"round(sum (rate(istio_requests_total{reporter=~"source|waypoint",response_code=~"4.."}[$__rate_interval])), 0.01)or vector(0)"#,
    ),
    (
        r#"mesh"#,
        r#"5xxs"#,
        r#""#,
        r#"round(sum (rate(istio_requests_total{reporter=~"source|waypoint",response_code=~"5.."}[$__rate_interval])), 0.01)or vector(0)"#,
    ),
    (
        r#"mesh"#,
        r#"HTTP/gRPC Workloads"#,
        r#"requests"#,
        r#"label_join(sum by (destination_workload,destination_workload_namespace,destination_service) (rate(istio_requests_total{reporter=~"source|waypoint"}[$__rate_interval])), "destination_workload_var", ".", "destination_workload", "destination_workload_namespace")"#,
    ),
    (
        r#"mesh"#,
        r#"HTTP/gRPC Workloads"#,
        r#"p50"#,
        r#"label_join(histogram_quantile(0.5, sum by (le,destination_workload,destination_workload_namespace) (rate(istio_request_duration_milliseconds_bucket{reporter=~"source|waypoint"}[$__rate_interval]))), "destination_workload_var", ".", "destination_workload", "destination_workload_namespace")"#,
    ),
    (
        r#"mesh"#,
        r#"HTTP/gRPC Workloads"#,
        r#"p90"#,
        r#"label_join(histogram_quantile(0.9, sum by (le,destination_workload,destination_workload_namespace) (rate(istio_request_duration_milliseconds_bucket{reporter=~"source|waypoint"}[$__rate_interval]))), "destination_workload_var", ".", "destination_workload", "destination_workload_namespace")"#,
    ),
    (
        r#"mesh"#,
        r#"HTTP/gRPC Workloads"#,
        r#"p99"#,
        r#"label_join(histogram_quantile(0.99, sum by (le,destination_workload,destination_workload_namespace) (rate(istio_request_duration_milliseconds_bucket{reporter=~"source|waypoint"}[$__rate_interval]))), "destination_workload_var", ".", "destination_workload", "destination_workload_namespace")"#,
    ),
    (
        r#"mesh"#,
        r#"HTTP/gRPC Workloads"#,
        r#"success"#,
        r#"label_join(sum by (destination_workload,destination_workload_namespace) (rate(istio_requests_total{reporter=~"source|waypoint",response_code!~"5.."}[$__rate_interval]))/sum by (destination_workload,destination_workload_namespace) (rate(istio_requests_total{reporter=~"source|waypoint"}[$__rate_interval])), "destination_workload_var", ".", "destination_workload", "destination_workload_namespace")"#,
    ),
    (
        r#"mesh"#,
        r#"TCP Workloads"#,
        r#"recv"#,
        r#"label_join(sum by (destination_workload,destination_workload_namespace,destination_service) (rate(istio_tcp_received_bytes_total{reporter=~"source|waypoint"}[$__rate_interval])), "destination_workload_var", ".", "destination_workload", "destination_workload_namespace")"#,
    ),
    (
        r#"mesh"#,
        r#"TCP Workloads"#,
        r#"sent"#,
        r#"label_join(sum by (destination_workload,destination_workload_namespace,destination_service) (rate(istio_tcp_sent_bytes_total{reporter=~"source|waypoint"}[$__rate_interval])), "destination_workload_var", ".", "destination_workload", "destination_workload_namespace")"#,
    ),
    (
        r#"mesh"#,
        r#"Istio Component Versions"#,
        r#""#,
        r#"sum by (component,tag) (istio_build)"#,
    ),
    (
        r#"service"#,
        r#"Client Request Volume"#,
        r#"A"#,
        r#"round(sum(irate(istio_requests_total{reporter=~"$qrep",destination_service="$service"}[$__rate_interval])), 0.001)"#,
    ),
    (
        r#"service"#,
        r#"Client Success Rate (non-5xx responses)"#,
        r#"A"#,
        r#"sum(irate(istio_requests_total{reporter=~"$qrep",destination_service="$service",response_code!~"5.*"}[$__rate_interval])) / (sum(irate(istio_requests_total{reporter=~"$qrep",destination_service="$service"}[$__rate_interval])) or on () vector(1))"#,
    ),
    (
        r#"service"#,
        r#"Client Request Duration"#,
        r#"A"#,
        r#"(histogram_quantile(0.50, sum(irate(istio_request_duration_milliseconds_bucket{reporter=~"$qrep",destination_service="$service"}[$__rate_interval])) by (le)) / 1000) or histogram_quantile(0.50, sum(irate(istio_request_duration_seconds_bucket{reporter=~"$qrep",destination_service="$service"}[$__rate_interval])) by (le))"#,
    ),
    (
        r#"service"#,
        r#"Client Request Duration"#,
        r#"B"#,
        r#"(histogram_quantile(0.90, sum(irate(istio_request_duration_milliseconds_bucket{reporter=~"$qrep",destination_service="$service"}[$__rate_interval])) by (le)) / 1000) or histogram_quantile(0.90, sum(irate(istio_request_duration_seconds_bucket{reporter=~"$qrep",destination_service="$service"}[$__rate_interval])) by (le))"#,
    ),
    (
        r#"service"#,
        r#"Client Request Duration"#,
        r#"C"#,
        r#"(histogram_quantile(0.99, sum(irate(istio_request_duration_milliseconds_bucket{reporter=~"$qrep",destination_service="$service"}[$__rate_interval])) by (le)) / 1000) or histogram_quantile(0.99, sum(irate(istio_request_duration_seconds_bucket{reporter=~"$qrep",destination_service="$service"}[$__rate_interval])) by (le))"#,
    ),
    (
        r#"service"#,
        r#"TCP Received Bytes"#,
        r#"A"#,
        r#"sum(irate(istio_tcp_received_bytes_total{reporter=~"$qrep", destination_service="$service"}[$__rate_interval]))"#,
    ),
    (
        r#"service"#,
        r#"TCP Sent Bytes"#,
        r#"A"#,
        r#"sum(irate(istio_tcp_sent_bytes_total{reporter=~"$qrep", destination_service="$service"}[$__rate_interval]))"#,
    ),
    (
        r#"service"#,
        r#"Incoming Requests By Source And Response Code"#,
        r#"A"#,
        r#"round(sum(irate(istio_requests_total{connection_security_policy="mutual_tls",destination_service="$service",reporter=~"$qrep",source_workload=~"$srcwl",source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, response_code), 0.001)"#,
    ),
    (
        r#"service"#,
        r#"Incoming Success Rate (non-5xx responses) By Source"#,
        r#"A"#,
        r#"sum(irate(istio_requests_total{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_service="$service",response_code!~"5.*", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace) / sum(irate(istio_requests_total{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_service="$service", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace)"#,
    ),
    (
        r#"service"#,
        r#"Incoming Request Duration By Source"#,
        r#"A"#,
        r#"(histogram_quantile(0.50, sum(irate(istio_request_duration_milliseconds_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_service="$service", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le)) / 1000) or histogram_quantile(0.50, sum(irate(istio_request_duration_seconds_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_service="$service", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le))"#,
    ),
    (
        r#"service"#,
        r#"Incoming Request Duration By Source"#,
        r#"B"#,
        r#"(histogram_quantile(0.90, sum(irate(istio_request_duration_milliseconds_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_service="$service", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le)) / 1000) or histogram_quantile(0.90, sum(irate(istio_request_duration_seconds_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_service="$service", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le))"#,
    ),
    (
        r#"service"#,
        r#"Incoming Request Duration By Source"#,
        r#"C"#,
        r#"(histogram_quantile(0.95, sum(irate(istio_request_duration_milliseconds_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_service="$service", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le)) / 1000) or histogram_quantile(0.95, sum(irate(istio_request_duration_seconds_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_service="$service", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le))"#,
    ),
    (
        r#"service"#,
        r#"Incoming Request Duration By Source"#,
        r#"D"#,
        r#"(histogram_quantile(0.99, sum(irate(istio_request_duration_milliseconds_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_service="$service", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le)) / 1000) or histogram_quantile(0.99, sum(irate(istio_request_duration_seconds_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_service="$service", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le))"#,
    ),
    (
        r#"service"#,
        r#"Incoming Request Size By Source"#,
        r#"A"#,
        r#"histogram_quantile(0.50, sum(irate(istio_request_bytes_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_service="$service", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le))"#,
    ),
    (
        r#"service"#,
        r#"Incoming Request Size By Source"#,
        r#"B"#,
        r#"histogram_quantile(0.90, sum(irate(istio_request_bytes_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_service="$service", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le))"#,
    ),
    (
        r#"service"#,
        r#"Incoming Request Size By Source"#,
        r#"C"#,
        r#"histogram_quantile(0.95, sum(irate(istio_request_bytes_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_service="$service", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le))"#,
    ),
    (
        r#"service"#,
        r#"Incoming Request Size By Source"#,
        r#"D"#,
        r#"histogram_quantile(0.99, sum(irate(istio_request_bytes_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_service="$service", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le))"#,
    ),
    (
        r#"service"#,
        r#"Response Size By Source"#,
        r#"A"#,
        r#"histogram_quantile(0.50, sum(irate(istio_response_bytes_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_service="$service", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le))"#,
    ),
    (
        r#"service"#,
        r#"Response Size By Source"#,
        r#"B"#,
        r#"histogram_quantile(0.90, sum(irate(istio_response_bytes_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_service="$service", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le))"#,
    ),
    (
        r#"service"#,
        r#"Response Size By Source"#,
        r#"C"#,
        r#"histogram_quantile(0.95, sum(irate(istio_response_bytes_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_service="$service", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le))"#,
    ),
    (
        r#"service"#,
        r#"Response Size By Source"#,
        r#"D"#,
        r#"histogram_quantile(0.99, sum(irate(istio_response_bytes_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_service="$service", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le))"#,
    ),
    (
        r#"service"#,
        r#"Bytes Received from Incoming TCP Connection"#,
        r#"A"#,
        r#"round(sum(irate(istio_tcp_received_bytes_total{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_service="$service", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace), 0.001)"#,
    ),
    (
        r#"service"#,
        r#"Bytes Sent to Incoming TCP Connection"#,
        r#"A"#,
        r#"round(sum(irate(istio_tcp_sent_bytes_total{connection_security_policy="mutual_tls", reporter=~"$qrep", destination_service="$service", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace), 0.001)"#,
    ),
    (
        r#"service"#,
        r#"Bytes Received from Incoming TCP Connection"#,
        r#"A"#,
        r#"round(sum(irate(istio_tcp_received_bytes_total{reporter="destination", connection_security_policy="mutual_tls", destination_service="$service", destination_workload=~"$dstwl", destination_workload_namespace=~"$dstns"}[$__rate_interval])) by (destination_workload, destination_workload_namespace), 0.001)"#,
    ),
    (
        r#"service"#,
        r#"Bytes Sent to Incoming TCP Connection"#,
        r#"A"#,
        r#"round(sum(irate(istio_tcp_sent_bytes_total{connection_security_policy="mutual_tls", reporter="destination", destination_service="$service", destination_workload=~"$dstwl", destination_workload_namespace=~"$dstns"}[$__rate_interval])) by (destination_workload, destination_workload_namespace), 0.001)"#,
    ),
    (
        r#"workload"#,
        r#"Incoming Request Volume"#,
        r#"A"#,
        r#"round(sum(irate(istio_requests_total{reporter=~"$qrep",destination_workload_namespace=~"$namespace",destination_workload=~"$workload"}[$__rate_interval])), 0.001)"#,
    ),
    (
        r#"workload"#,
        r#"Incoming Success Rate (non-5xx responses)"#,
        r#"A"#,
        r#"sum(irate(istio_requests_total{reporter=~"$qrep",destination_workload_namespace=~"$namespace",destination_workload=~"$workload",response_code!~"5.*"}[$__rate_interval])) / sum(irate(istio_requests_total{reporter=~"$qrep",destination_workload_namespace=~"$namespace",destination_workload=~"$workload"}[$__rate_interval]))"#,
    ),
    (
        r#"workload"#,
        r#"Request Duration"#,
        r#"A"#,
        r#"(histogram_quantile(0.50, sum(irate(istio_request_duration_milliseconds_bucket{reporter=~"$qrep",destination_workload=~"$workload", destination_workload_namespace=~"$namespace"}[$__rate_interval])) by (le)) / 1000) or histogram_quantile(0.50, sum(irate(istio_request_duration_seconds_bucket{reporter=~"$qrep",destination_workload=~"$workload", destination_workload_namespace=~"$namespace"}[$__rate_interval])) by (le))"#,
    ),
    (
        r#"workload"#,
        r#"Request Duration"#,
        r#"B"#,
        r#"(histogram_quantile(0.90, sum(irate(istio_request_duration_milliseconds_bucket{reporter=~"$qrep",destination_workload=~"$workload", destination_workload_namespace=~"$namespace"}[$__rate_interval])) by (le)) / 1000) or histogram_quantile(0.90, sum(irate(istio_request_duration_seconds_bucket{reporter=~"$qrep",destination_workload=~"$workload", destination_workload_namespace=~"$namespace"}[$__rate_interval])) by (le))"#,
    ),
    (
        r#"workload"#,
        r#"Request Duration"#,
        r#"C"#,
        r#"(histogram_quantile(0.99, sum(irate(istio_request_duration_milliseconds_bucket{reporter=~"$qrep",destination_workload=~"$workload", destination_workload_namespace=~"$namespace"}[$__rate_interval])) by (le)) / 1000) or histogram_quantile(0.99, sum(irate(istio_request_duration_seconds_bucket{reporter=~"$qrep",destination_workload=~"$workload", destination_workload_namespace=~"$namespace"}[$__rate_interval])) by (le))"#,
    ),
    (
        r#"workload"#,
        r#"TCP Server Traffic"#,
        r#"A"#,
        r#"sum(irate(istio_tcp_sent_bytes_total{reporter=~"$qrep", destination_workload_namespace=~"$namespace", destination_workload=~"$workload"}[$__rate_interval])) + sum(irate(istio_tcp_received_bytes_total{reporter=~"$qrep", destination_workload_namespace=~"$namespace", destination_workload=~"$workload"}[$__rate_interval]))"#,
    ),
    (
        r#"workload"#,
        r#"TCP Client Traffic"#,
        r#"A"#,
        r#"sum(irate(istio_tcp_sent_bytes_total{reporter=~"$qrep", source_workload_namespace=~"$namespace", source_workload=~"$workload"}[$__rate_interval])) + sum(irate(istio_tcp_received_bytes_total{reporter=~"$qrep", source_workload_namespace=~"$namespace", source_workload=~"$workload"}[$__rate_interval]))"#,
    ),
    (
        r#"workload"#,
        r#"Incoming Requests By Source And Response Code"#,
        r#"A"#,
        r#"round(sum(irate(istio_requests_total{connection_security_policy="mutual_tls", destination_workload_namespace=~"$namespace", destination_workload=~"$workload", reporter=~"$qrep", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, response_code), 0.001)"#,
    ),
    (
        r#"workload"#,
        r#"Incoming Success Rate (non-5xx responses) By Source"#,
        r#"A"#,
        r#"sum(irate(istio_requests_total{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_workload_namespace=~"$namespace", destination_workload=~"$workload",response_code!~"5.*", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace) / sum(irate(istio_requests_total{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_workload_namespace=~"$namespace", destination_workload=~"$workload", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace)"#,
    ),
    (
        r#"workload"#,
        r#"Incoming Request Duration By Source"#,
        r#"A"#,
        r#"(histogram_quantile(0.50, sum(irate(istio_request_duration_milliseconds_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_workload=~"$workload", destination_workload_namespace=~"$namespace", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le)) / 1000) or histogram_quantile(0.50, sum(irate(istio_request_duration_seconds_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_workload=~"$workload", destination_workload_namespace=~"$namespace", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le))"#,
    ),
    (
        r#"workload"#,
        r#"Incoming Request Duration By Source"#,
        r#"B"#,
        r#"(histogram_quantile(0.90, sum(irate(istio_request_duration_milliseconds_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_workload=~"$workload", destination_workload_namespace=~"$namespace", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le)) / 1000) or histogram_quantile(0.90, sum(irate(istio_request_duration_seconds_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_workload=~"$workload", destination_workload_namespace=~"$namespace", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le))"#,
    ),
    (
        r#"workload"#,
        r#"Incoming Request Duration By Source"#,
        r#"C"#,
        r#"(histogram_quantile(0.95, sum(irate(istio_request_duration_milliseconds_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_workload=~"$workload", destination_workload_namespace=~"$namespace", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le)) / 1000) or histogram_quantile(0.95, sum(irate(istio_request_duration_seconds_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_workload=~"$workload", destination_workload_namespace=~"$namespace", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le))"#,
    ),
    (
        r#"workload"#,
        r#"Incoming Request Duration By Source"#,
        r#"D"#,
        r#"(histogram_quantile(0.99, sum(irate(istio_request_duration_milliseconds_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_workload=~"$workload", destination_workload_namespace=~"$namespace", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le)) / 1000) or histogram_quantile(0.99, sum(irate(istio_request_duration_seconds_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_workload=~"$workload", destination_workload_namespace=~"$namespace", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le))"#,
    ),
    (
        r#"workload"#,
        r#"Incoming Request Size By Source"#,
        r#"A"#,
        r#"histogram_quantile(0.50, sum(irate(istio_request_bytes_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_workload=~"$workload", destination_workload_namespace=~"$namespace", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le))"#,
    ),
    (
        r#"workload"#,
        r#"Incoming Request Size By Source"#,
        r#"B"#,
        r#"histogram_quantile(0.90, sum(irate(istio_request_bytes_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_workload=~"$workload", destination_workload_namespace=~"$namespace", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le))"#,
    ),
    (
        r#"workload"#,
        r#"Incoming Request Size By Source"#,
        r#"C"#,
        r#"histogram_quantile(0.95, sum(irate(istio_request_bytes_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_workload=~"$workload", destination_workload_namespace=~"$namespace", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le))"#,
    ),
    (
        r#"workload"#,
        r#"Incoming Request Size By Source"#,
        r#"D"#,
        r#"histogram_quantile(0.99, sum(irate(istio_request_bytes_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_workload=~"$workload", destination_workload_namespace=~"$namespace", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le))"#,
    ),
    (
        r#"workload"#,
        r#"Response Size By Source"#,
        r#"A"#,
        r#"histogram_quantile(0.50, sum(irate(istio_response_bytes_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_workload=~"$workload", destination_workload_namespace=~"$namespace", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le))"#,
    ),
    (
        r#"workload"#,
        r#"Response Size By Source"#,
        r#"B"#,
        r#"histogram_quantile(0.90, sum(irate(istio_response_bytes_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_workload=~"$workload", destination_workload_namespace=~"$namespace", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le))"#,
    ),
    (
        r#"workload"#,
        r#"Response Size By Source"#,
        r#"C"#,
        r#"histogram_quantile(0.95, sum(irate(istio_response_bytes_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_workload=~"$workload", destination_workload_namespace=~"$namespace", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le))"#,
    ),
    (
        r#"workload"#,
        r#"Response Size By Source"#,
        r#"D"#,
        r#"histogram_quantile(0.99, sum(irate(istio_response_bytes_bucket{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_workload=~"$workload", destination_workload_namespace=~"$namespace", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace, le))"#,
    ),
    (
        r#"workload"#,
        r#"Bytes Received from Incoming TCP Connection"#,
        r#"A"#,
        r#"round(sum(irate(istio_tcp_received_bytes_total{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_workload_namespace=~"$namespace", destination_workload=~"$workload", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace), 0.001)"#,
    ),
    (
        r#"workload"#,
        r#"Bytes Sent to Incoming TCP Connection"#,
        r#"A"#,
        r#"round(sum(irate(istio_tcp_sent_bytes_total{connection_security_policy="mutual_tls", reporter=~"$qrep", destination_workload_namespace=~"$namespace", destination_workload=~"$workload", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace), 0.001)"#,
    ),
    (
        r#"workload"#,
        r#"Bytes Sent on Outgoing TCP Connection"#,
        r#"A"#,
        r#"round(sum(irate(istio_tcp_received_bytes_total{connection_security_policy="mutual_tls", reporter="source", source_workload_namespace=~"$namespace", source_workload=~"$workload", destination_service=~"$dstsvc"}[$__rate_interval])) by (destination_service), 0.001)"#,
    ),
    (
        r#"workload"#,
        r#"Bytes Received from Outgoing TCP Connection"#,
        r#"A"#,
        r#"round(sum(irate(istio_tcp_sent_bytes_total{reporter="source", connection_security_policy="mutual_tls", source_workload_namespace=~"$namespace", source_workload=~"$workload", destination_service=~"$dstsvc"}[$__rate_interval])) by (destination_service), 0.001)"#,
    ),
];

/// Panel queries in Istio's ztunnel, mesh, service and workload dashboards
/// (`../shared/anchors/dashboards/queries.tsv`: 15 + 12 + 76 + 71).
const ISTIO_DASHBOARD_QUERIES: usize = 174;

/// What Ambit cannot feed in those dashboards: the panels, how many queries, and why. With
/// [`ISTIO_QUERIES`] they account for every query of the four dashboards.
const NOT_FEEDABLE: &[(&str, usize, &str)] = &[
    (
        "ztunnel: Memory Usage, CPU Usage",
        2,
        "container_* series come from cAdvisor (the kubelet), not from ztunnel",
    ),
    (
        "ztunnel: DNS Request",
        1,
        "istio_dns_requests_total needs ztunnel's DNS proxy, which Ambit does not have",
    ),
    (
        "service: Server Request *, Incoming * By Destination/Service Workload",
        19,
        "requests reported at the destination (reporter=\"destination\") come from sidecars; in ambient the waypoint reports them as reporter=\"waypoint\"",
    ),
    (
        "workload: Outgoing * By Destination",
        15,
        "requests reported at the source (reporter=\"source\") come from sidecars",
    ),
    (
        "service, workload: the non-mTLS variants",
        63,
        "plaintext traffic is never reported by a source ztunnel or a waypoint: everything they carry is mutual TLS",
    ),
];

/// The demo's traffic, as it would be seen on every panel: calls through the waypoint (some
/// answered 503 by the echo server when asked), a connection to echo's TCP port (the waypoint
/// carries it at L4 and names the service to the destination's ztunnel, which reports it under
/// `echo` as the service dashboard's incoming-TCP panels ask), and a plain TCP call the L4 policy
/// refuses.
fn traffic() {
    let url = "http://echo.demo.svc.cluster.local/";
    let _ = super::echo_call("demo/client", url, 40);
    let _ = super::curl(
        "demo/client",
        "http://echo.demo.svc.cluster.local/status/503",
    );
    let echo_bin = ambit_e2e::binary("ambit-echo");
    let _ = super::ambitctl(&[
        "lab",
        "exec",
        "demo/client",
        "--",
        &echo_bin.to_string_lossy(),
        "tcp",
        "echo.demo.svc.cluster.local:9000",
        "--send",
        "dashboard",
    ]);
    let echo_1 = super::pod_ip("demo/echo-1");
    let _ = super::curl("legacy/client", &format!("http://{echo_1}:8080/"));
}

/// An instant query to the lab's Prometheus, from inside the fabric namespace.
fn query(fabric: &str, expr: &str) -> Result<Vec<Value>, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", fabric, "curl", "-s", "-m", "5", "-G"])
        .arg("--data-urlencode")
        .arg(format!("query={expr}"))
        .arg("http://127.0.0.1:9090/api/v1/query")
        .output()
        .map_err(|e| e.to_string())?;
    let body: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stdout)))?;
    if body["status"] != "success" {
        return Err(format!("{expr}: {body}"));
    }
    Ok(body["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// A label of the first series `expr` returns, sending traffic until there is one (bounded).
fn first_label(fabric: &str, expr: &str, label: &str) -> String {
    for _ in 0..5 {
        if let Some(value) = query(fabric, expr).ok().and_then(|r| {
            r.first()
                .and_then(|s| s["metric"][label].as_str().map(str::to_string))
        }) {
            return value;
        }
        traffic();
        std::thread::sleep(Duration::from_secs(3));
    }
    let seen = query(
        fabric,
        "count by (app, reporter, destination_service, source_workload) (istio_requests_total or istio_tcp_sent_bytes_total)",
    );
    panic!("no {label} from {expr}; the series there are: {seen:?}");
}

/// What the demo's echo traffic is reported under: the waypoint reports requests under the
/// backend service its route chose (`echo-v1`/`echo-v2`, as Istio's waypoints do) and that
/// service's workload; ztunnel reports TCP under the service the client addressed (`echo`).
struct Echo {
    request_service: String,
    workload: String,
    client: String,
}

/// `promql` with the dashboards' variables set as a user would set them to look at the demo's
/// echo traffic: the reporter the waypoint uses for request metrics, ztunnel's for TCP ones.
fn substitute(promql: &str, echo: &Echo) -> String {
    let tcp = promql.contains("istio_tcp_");
    let (qrep, service) = if tcp {
        ("source|destination", "echo.demo.svc.cluster.local")
    } else {
        ("waypoint", echo.request_service.as_str())
    };
    let workload = if promql.contains("source_workload=~\"$workload\"") {
        &echo.client
    } else {
        &echo.workload
    };
    [
        ("$__rate_interval", "1m"),
        ("$service", service),
        ("$qrep", qrep),
        ("$workload", workload),
        ("$namespace", "demo"),
        ("$srcwl", ".*"),
        ("$srcns", ".*"),
        ("$dstsvc", ".*"),
        ("$dstwl", ".*"),
        ("$dstns", ".*"),
    ]
    .iter()
    .fold(promql.to_string(), |q, (var, value)| q.replace(var, value))
}

/// Runs every query (after fresh traffic, in bounded rounds) until each returns data; panics
/// naming those that never did.
fn all_return_data(fabric: &str, what: &str, queries: &[(String, String)]) {
    let mut missing: Vec<String> = Vec::new();
    for round in 0..8 {
        if round % 2 == 0 {
            traffic();
        }
        std::thread::sleep(Duration::from_secs(3));
        missing = queries
            .iter()
            .filter(|(_, expr)| query(fabric, expr).map_or(true, |r| r.is_empty()))
            .map(|(name, expr)| format!("{name}: {expr}"))
            .collect();
        if missing.is_empty() {
            return;
        }
    }
    panic!(
        "{what}: {} of {} queries never returned data:\n{}",
        missing.len(),
        queries.len(),
        missing.join("\n")
    );
}

/// `GET path` from the dashboard server; (status, body).
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    Some((status, body.to_string()))
}

/// `ambitctl lab dashboard`, stopped when dropped.
struct Dashboard(Child);

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_dashboard() -> (Dashboard, SocketAddr) {
    let addr = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port");
    let child = Command::new(binary("ambitctl"))
        .args(["lab", "dashboard", "--listen", &addr.to_string()])
        .env("AMBIT_LAB_PREFIX", "ambit-lt-")
        .env("AMBIT_LAB_DIR", "/run/ambit-lab-test")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ambitctl lab dashboard starts");
    let dashboard = Dashboard(child);
    for _ in 0..50 {
        if get(addr, "/").is_some_and(|(s, _)| s == 200) {
            return (dashboard, addr);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("ambitctl lab dashboard never answered on {addr}");
}

/// Headless Chromium with a fresh profile, offline-safe flags and `extra` arguments.
fn chromium(profile: &std::path::Path, extra: &[String]) -> std::process::Output {
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("chromium runs (apt-get install chromium)")
}

/// The `data-state` of every panel in a dumped DOM, by `data-panel` id.
fn panel_states(dom: &str) -> Vec<(String, String)> {
    dom.split("<section ")
        .skip(1)
        .filter_map(|tag| {
            let tag = tag.split('>').next()?;
            let attr = |name: &str| {
                let start = tag.find(&format!("{name}=\""))? + name.len() + 2;
                Some(tag[start..].split('"').next()?.to_string())
            };
            Some((attr("data-panel")?, attr("data-state")?))
        })
        .collect()
}

fn artifacts_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("AMBIT_ARTIFACTS") {
        return PathBuf::from(dir);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            binary("ambitctl")
                .parent()
                .and_then(|p| p.parent())
                .map(PathBuf::from)
                .expect("target dir")
        });
    target.join("artifacts")
}

/// Checks the lab's Prometheus and `ambitctl lab dashboard` against the running demo lab.
pub(crate) fn check(status: &serde_json::Value) {
    // Prometheus runs, in the fabric, and scrapes every component with Kubernetes' labels.
    let prometheus = &status["prometheus"];
    assert_eq!(
        (&prometheus["running"], &prometheus["address"]),
        (&Value::Bool(true), &Value::from("127.0.0.1:9090")),
        "lab up starts Prometheus: {status}"
    );
    let fabric = prometheus["netns"].as_str().expect("netns").to_string();
    let (code, text, _) = super::ambitctl(&["lab", "status"]);
    assert!(
        code == 0
            && text.contains(&format!(
                "prometheus   127.0.0.1:9090 in netns {fabric}  running"
            )),
        "{text}"
    );
    super::eventually("Prometheus scrapes every component", || {
        let up = query(&fabric, "up == 1")?;
        let targets: Vec<String> = up
            .iter()
            .map(|s| {
                let m = &s["metric"];
                format!(
                    "{} {} {} {}",
                    m["app"].as_str().unwrap_or("-"),
                    m["namespace"].as_str().unwrap_or("-"),
                    m["pod"].as_str().unwrap_or("-"),
                    m["node"].as_str().unwrap_or("-")
                )
            })
            .collect();
        for want in [
            "istiod istio-system istiod-lite -",
            "ztunnel istio-system ztunnel-node-1 node-1",
            "ztunnel istio-system ztunnel-node-2 node-2",
            "waypoint demo waypoint-waypoint",
        ] {
            if !targets.iter().any(|t| t.starts_with(want)) {
                return Err(format!("{want} is not up: {targets:?}"));
            }
        }
        Ok(())
    });

    // Istio's own dashboards show data for everything ztunnel and the waypoint report.
    traffic();
    std::thread::sleep(Duration::from_secs(3));
    let by_waypoint = "istio_requests_total{reporter=\"waypoint\",destination_service=~\"echo.*\",response_code=\"200\"}";
    let echo = Echo {
        request_service: first_label(&fabric, by_waypoint, "destination_service"),
        workload: first_label(&fabric, by_waypoint, "destination_workload"),
        client: first_label(
            &fabric,
            "istio_tcp_sent_bytes_total{reporter=\"source\",destination_service=\"echo.demo.svc.cluster.local\"}",
            "source_workload",
        ),
    };
    let istio: Vec<(String, String)> = ISTIO_QUERIES
        .iter()
        .map(|(dashboard, panel, ref_id, promql)| {
            (
                format!("{dashboard} / {panel} {ref_id}"),
                substitute(promql, &echo),
            )
        })
        .collect();
    assert!(istio.iter().all(|(_, q)| !q.contains('$')), "{istio:?}");
    let not_fed: usize = NOT_FEEDABLE.iter().map(|(_, count, _)| count).sum();
    assert_eq!(
        ISTIO_QUERIES.len() + not_fed,
        ISTIO_DASHBOARD_QUERIES,
        "every query of Istio's four dashboards is either checked or listed as not feedable"
    );
    for (panels, count, why) in NOT_FEEDABLE {
        eprintln!("not fed by Ambit: {panels} ({count} queries): {why}");
    }
    all_return_data(&fabric, "Istio's dashboards", &istio);

    // The dashboard page: its panels' queries through its own proxy, then in a real browser.
    let (_dashboard, addr) = start_dashboard();
    let (code, panels) = get(addr, "/panels.json").expect("panels.json");
    assert_eq!(code, 200, "{panels}");
    let panels: Vec<Value> = serde_json::from_str(&panels).expect("panels are JSON");
    let ours: Vec<(String, String)> = panels
        .iter()
        .flat_map(|p| {
            p["queries"].as_array().into_iter().flatten().map(move |q| {
                (
                    format!("{} / {}", p["group"], p["title"]),
                    q["expr"].as_str().unwrap_or_default().to_string(),
                )
            })
        })
        .collect();
    all_return_data(&fabric, "Ambit's Grafana dashboards", &ours);
    let (code, proxied) = get(addr, "/api/v1/query?query=istio_build").expect("proxied query");
    assert!(
        code == 200 && proxied.contains("\"component\":\"ztunnel\""),
        "{proxied}"
    );

    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{addr}/");
    let mut states = Vec::new();
    for _ in 0..3 {
        traffic();
        std::thread::sleep(Duration::from_secs(3));
        let out = chromium(
            profile.path(),
            &[
                "--virtual-time-budget=15000".into(),
                "--dump-dom".into(),
                url.clone(),
            ],
        );
        states = panel_states(&String::from_utf8_lossy(&out.stdout));
        if states.len() == panels.len() && states.iter().all(|(_, s)| s == "data") {
            break;
        }
    }
    assert_eq!(
        states.len(),
        panels.len(),
        "every panel is on the page: {states:?}"
    );
    let not_data: Vec<_> = states.iter().filter(|(_, s)| s != "data").collect();
    assert!(
        not_data.is_empty(),
        "panels without data in Chromium: {not_data:?}"
    );

    let artifacts = artifacts_dir();
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("lab-dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let out = chromium(
        profile.path(),
        &[
            "--virtual-time-budget=15000".into(),
            "--window-size=1400,2500".into(),
            format!("--screenshot={}", shot.display()),
            url,
        ],
    );
    let png = std::fs::read(&shot).unwrap_or_else(|e| {
        panic!(
            "no screenshot at {}: {e}; chromium said: {}",
            shot.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(png.starts_with(b"\x89PNG"), "{} is a PNG", shot.display());
    println!("lab dashboard screenshot: {}", shot.display());
}
