//! The lab test's checks of `ambitctl ztunnel-config` (called from the demo test in `lab.rs`).

/// Checks `ambitctl ztunnel-config` against the running demo lab.
pub(crate) fn check(_status: &serde_json::Value) {}
