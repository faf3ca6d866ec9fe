//! ztunnel's test support: the workload-API builders the state index's tests use (one copy, in
//! `crates/state/tests/support`), plus network-namespace and TLS-server helpers.
#![allow(dead_code, unreachable_pub)]

pub mod netns;
pub mod tls_server;

#[path = "../../../crates/state/tests/support/mod.rs"]
mod builders;

// Not every test binary uses the builders (as with dead_code above).
#[allow(unused_imports)]
pub use builders::*;
