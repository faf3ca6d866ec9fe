//! How the pool gets a transport for a new connection: the [`Dialer`] trait (ztunnel implements it
//! to open the socket inside a pod's network namespace) and [`TlsDialer`], the plain
//! TCP + mutual-TLS default.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use ambit_identity::tls::{TlsError, VerifiedPeer};
use ambit_identity::{Identity, WorkloadCertificate};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::pool::PoolKey;

/// Any bidirectional byte stream; lets a dialer return TLS over TCP, over a pipe, or over another
/// HBONE stream (double HBONE) behind one type.
pub trait AsyncReadWrite: AsyncRead + AsyncWrite {}

impl<T: AsyncRead + AsyncWrite + ?Sized> AsyncReadWrite for T {}

/// The transport a [`Dialer`] hands to the pool: already encrypted and authenticated.
pub type BoxedIo = Box<dyn AsyncReadWrite + Send + Unpin>;

/// A boxed error from code outside this crate (certificate sources, custom dialers).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The future a [`Dialer`] returns.
pub type DialFuture<'a> =
    Pin<Box<dyn Future<Output = Result<(BoxedIo, VerifiedPeer), DialError>> + Send + 'a>>;

/// Makes the transport for a new pooled connection. ztunnel implements this to create the socket
/// inside a pod's network namespace with a mark, and to present the source pod's certificate.
pub trait Dialer: Send + Sync + 'static {
    /// Connects to `key.dst`, completes mutual TLS presenting a certificate for `key.src_id`, and
    /// verifies that the server is one of `key.dst_ids`.
    fn dial(&self, key: &PoolKey) -> DialFuture<'_>;
}

/// Why a [`Dialer`] could not produce a connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// The TCP connection could not be made.
    #[error(
        "TCP connect failed: {0} (is the peer's ztunnel listening, or is a NetworkPolicy \
         blocking port 15008?)"
    )]
    Connect(#[source] std::io::Error),
    /// No certificate to present for the source identity.
    #[error("no certificate available for source identity {identity}: {source}")]
    Certificate {
        /// The identity the connection would have presented.
        identity: Identity,
        /// What the certificate source reported.
        #[source]
        source: BoxError,
    },
    /// The TLS client configuration could not be built from the certificate.
    #[error("building the TLS client config for {identity} failed: {source}")]
    TlsConfig {
        /// The source identity.
        identity: Identity,
        /// The identity crate's error (boxed: it is large and rare).
        #[source]
        source: Box<TlsError>,
    },
    /// The TLS handshake failed (wrong peer identity, untrusted chain, expired certificate...).
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] Box<TlsError>),
    /// A custom dialer's own failure.
    #[error("{0}")]
    Other(#[source] BoxError),
}

type CertificateFuture =
    Pin<Box<dyn Future<Output = Result<Arc<WorkloadCertificate>, BoxError>> + Send>>;
type CertificateLookup = dyn Fn(&Identity) -> CertificateFuture + Send + Sync;
type TcpFuture = Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>>;
type TcpConnector = dyn Fn(&PoolKey) -> TcpFuture + Send + Sync;

/// The default dialer: TCP to `key.dst`, then mutual TLS presenting the certificate for
/// `key.src_id` and accepting only a server whose identity is in `key.dst_ids`.
pub struct TlsDialer {
    certificate_for: Box<CertificateLookup>,
    tcp_connect: Option<Box<TcpConnector>>,
}

impl std::fmt::Debug for TlsDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsDialer").finish_non_exhaustive()
    }
}

impl TlsDialer {
    /// A dialer that asks `certificate_for` for the source identity's certificate on each dial.
    pub fn new<F, Fut, E>(certificate_for: F) -> Self
    where
        F: Fn(Identity) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Arc<WorkloadCertificate>, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        Self {
            certificate_for: Box::new(move |identity: &Identity| {
                let lookup = certificate_for(identity.clone());
                Box::pin(async move { lookup.await.map_err(Into::into) })
            }),
            tcp_connect: None,
        }
    }

    /// Opens the TCP connection with `connect` instead of a plain `TcpStream::connect(key.dst)`;
    /// ztunnel uses this to create the socket inside the source pod's network namespace, with its
    /// packet mark, and to bound the connect time.
    pub fn with_tcp_connector<F, Fut>(mut self, connect: F) -> Self
    where
        F: Fn(&PoolKey) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::io::Result<TcpStream>> + Send + 'static,
    {
        self.tcp_connect = Some(Box::new(move |key: &PoolKey| Box::pin(connect(key))));
        self
    }

    /// A dialer whose certificates come from `store` (fetched and rotated there).
    pub fn from_store(store: ambit_identity::store::CertStore) -> Self {
        Self::new(move |identity: Identity| {
            let store = store.clone();
            async move { store.get(&identity).await }
        })
    }

    /// A dialer that always presents `certificate`, whatever the key's source identity; for tests
    /// and single-identity clients.
    pub fn with_certificate(certificate: Arc<WorkloadCertificate>) -> Self {
        Self::new(move |_identity: Identity| {
            let certificate = Arc::clone(&certificate);
            async move { Ok::<_, BoxError>(certificate) }
        })
    }

    async fn dial_tls(&self, key: &PoolKey) -> Result<(BoxedIo, VerifiedPeer), DialError> {
        let certificate = (self.certificate_for)(&key.src_id)
            .await
            .map_err(|source| DialError::Certificate {
                identity: key.src_id.clone(),
                source,
            })?;
        let config =
            ambit_identity::tls::client_config(&certificate, &key.dst_ids).map_err(|source| {
                DialError::TlsConfig {
                    identity: key.src_id.clone(),
                    source: Box::new(source),
                }
            })?;
        let tcp = match &self.tcp_connect {
            Some(connect) => connect(key).await,
            None => TcpStream::connect(key.dst).await,
        }
        .map_err(DialError::Connect)?;
        // HBONE multiplexes interactive traffic; Nagle would add latency to small writes.
        tcp.set_nodelay(true).map_err(DialError::Connect)?;
        let (tls, peer) = ambit_identity::tls::connect(config, buffered(tcp))
            .await
            .map_err(|error| DialError::Tls(Box::new(error)))?;
        let mut tls = tls;
        tls.get_mut().1.set_buffer_limit(Some(TLS_WRITE_BUFFER));
        Ok((Box::new(tls), peer))
    }
}

/// Bytes read from the socket at once under TLS. rustls asks its transport for at most 4 KiB more
/// than it holds (one record is 16 KiB), so without a buffer below it a bulk stream costs a
/// `recv` per few KiB; with it, one per 64 KiB, and rustls's reads are served from memory.
pub const TLS_READ_BUFFER: usize = 64 * 1024;

/// Encrypted bytes rustls may hold before the socket takes them (rustls's default is 64 KiB).
/// HTTP/2 hands TLS up to a whole DATA frame at once; a larger limit lets a bulk stream go out in
/// fewer, larger `writev`s.
pub const TLS_WRITE_BUFFER: usize = 256 * 1024;

/// `io` with a [`TLS_READ_BUFFER`] read buffer, to put under TLS; writes pass straight through
/// (vectored included).
pub fn buffered<T: AsyncRead>(io: T) -> tokio::io::BufReader<T> {
    tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, io)
}

impl Dialer for TlsDialer {
    fn dial(&self, key: &PoolKey) -> DialFuture<'_> {
        let key = key.clone();
        Box::pin(async move { self.dial_tls(&key).await })
    }
}
