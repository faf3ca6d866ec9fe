//! waypoint: Ambit's L7 proxy for the services, namespaces and pods bound to it with
//! `istio.io/use-waypoint`.
//!
//! HBONE comes in on 15008; the CONNECT authority says what the client dialed. A Service VIP
//! selects that Service's port, protocol and routes ([`routes`]); a pod IP is forwarded to that
//! pod under policy only. Requests are authorized, routed, filtered ([`filters`]) and sent over
//! HBONE to the chosen pod with the waypoint's own identity ([`upstream`]).
#![forbid(unsafe_code)]

pub mod filters;
pub mod routes;
pub mod upstream;
