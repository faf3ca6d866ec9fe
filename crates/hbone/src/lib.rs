//! HBONE: TCP connections tunnelled as HTTP/2 CONNECT streams over mutually authenticated TLS
//! (Istio ambient's data-plane transport, normally on port 15008).
//!
//! - [`Pool`] is the client: it dials connections through a [`Dialer`] (default [`TlsDialer`]),
//!   keeps them per [`PoolKey`], and opens one [`HboneStream`] per tunnel.
//! - [`server::serve_connection`] is the server: it hands each CONNECT to a handler with a
//!   [`server::Responder`] that answers 200 (yielding an [`HboneStream`]) or an error status.
//! - [`copy::copy_bidirectional`] splices a tunnel to a socket, half-close included.
//!
//! TLS itself (certificates, SPIFFE verification) belongs to `ambit-identity`; this crate only
//! carries the [`VerifiedPeer`](ambit_identity::tls::VerifiedPeer) that TLS produced.
#![forbid(unsafe_code)]

mod config;
pub mod copy;
mod dialer;
mod error;
mod keepalive;
mod pool;
pub mod server;
mod stream;

pub use config::{H2Config, PoolConfig};
pub use dialer::{
    AsyncReadWrite, BoxError, BoxedIo, DialError, DialFuture, Dialer, TLS_READ_BUFFER,
    TLS_WRITE_BUFFER, TlsDialer, buffered,
};
pub use error::HboneError;
pub use pool::{ConnectRequest, Pool, PoolKey, PoolStats};
pub use stream::HboneStream;
