//! Plumbing every Ambit binary shares.
//!
//! - [`drain`]: one drain primitive for every long-lived task: graceful until a deadline, then
//!   forced.
//! - [`config`]: typed configuration from environment variables that reports every bad value by
//!   name, and records the effective configuration for logging at start.
//! - [`metrics`]: a Prometheus registry handed down explicitly, never installed globally.
//! - [`readiness`]: named pending tasks behind `/healthz/ready`.
//! - [`logging`]: structured logs with a filter that can change at runtime.
//! - [`http`]: a small HTTP/1.1 server for admin, metrics and readiness endpoints.
//! - [`endpoints`]: the metrics, readiness and `/logging` handlers every proxy serves.
//! - [`process`]: `istio_build` and the process metrics (CPU, memory, file descriptors).
//! - [`runtime`]: the control runtime beside the data path's, endpoint binding, the shutdown
//!   signal.
#![forbid(unsafe_code)]

pub mod config;
pub mod drain;
pub mod endpoints;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod process;
pub mod readiness;
pub mod runtime;
