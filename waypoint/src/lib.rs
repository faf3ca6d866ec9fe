//! waypoint: Ambit's L7 proxy for the services, namespaces and pods bound to it with
//! `istio.io/use-waypoint`.
#![forbid(unsafe_code)]
