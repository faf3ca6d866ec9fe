//! Kubernetes plumbing shared by istiod-lite and cni-agent.
//!
//! - [`cache`]: API objects of several kinds as JSON, kept current by watchers, for controllers.
//! - [`client`]: one way to build a [`kube::Client`] (in-cluster service account, a kubeconfig,
//!   or a plain URL for tests).
//! - [`watch`]: kube-rs watchers over the kinds Ambit reads, merged into one stream of
//!   [`watch::Update`]s carrying typed [`ambit_mesh::Object`]s (or the errors naming the object and
//!   field that could not be accepted).

pub mod cache;
pub mod client;
pub mod watch;
