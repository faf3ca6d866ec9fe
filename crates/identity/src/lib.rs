//! Workload identity for Ambit: SPIFFE identities, CSRs, workload certificates, a signing CA,
//! the mutual-TLS configurations HBONE uses, and the certificate store that keeps every local
//! workload's certificate fresh.
//!
//! Identity is a proof: the only way to obtain a peer's identity from a connection is
//! [`tls::VerifiedPeer`], produced by this crate's verifiers.

#![forbid(unsafe_code)]

pub mod ca;
mod certificate;
pub mod csr;
pub mod dump;
mod identity;
pub mod store;
pub mod tls;

pub use certificate::{CertificateError, WorkloadCertificate};
pub use identity::{Identity, IdentityError};
