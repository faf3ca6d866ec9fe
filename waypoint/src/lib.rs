//! waypoint: Ambit's L7 proxy for the services, namespaces and pods bound to it with
//! `istio.io/use-waypoint`.
//!
//! HBONE comes in on 15008 ([`hbone`]); the CONNECT authority says what the client dialed. A
//! Service VIP selects that Service's port, protocol and routes ([`routes`]); a pod IP is
//! forwarded to that pod under policy only. Undeclared ports are sniffed ([`sniff`]). Requests
//! are authorized, routed, filtered ([`filters`]) and sent over HBONE to the chosen pod with the
//! waypoint's own identity ([`upstream`]), all in [`proxy`]; [`telemetry`] counts them with
//! Istio's metrics and access logs, and [`tracing`] exports a span per request over OTLP.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod config;
pub mod filters;
pub mod hbone;
pub mod proxy;
pub mod retry;
pub mod routes;
pub mod sniff;
pub mod telemetry;
pub mod tracing;
pub mod traffic;
pub mod upstream;
pub mod worker;
