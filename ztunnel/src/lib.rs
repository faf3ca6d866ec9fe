//! ztunnel: Ambit's per-node L4 agent.
//!
//! Its scope is deliberately narrow: it captures pod traffic, carries it over HBONE, enforces L4
//! authorization, fetches per-pod certificates and counts connections. It never terminates user
//! HTTP and has no plugin hooks; HTTP belongs to the waypoint.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod config;
pub mod inpod;
pub mod localconfig;
pub mod mesh;
pub mod proxy;
pub mod socket;
pub mod xds;
