//! istiod-lite: signs every pod's certificate, reads the cluster's objects, translates them into
//! workload-API resources and pushes deltas to every ztunnel over delta xDS.

pub mod auth;
pub mod ca;
pub mod kube_ca;
pub mod source;
pub mod store;
pub mod waypoint_controller;
pub mod xds;
