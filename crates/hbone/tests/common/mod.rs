//! Shared fixtures for the HBONE integration tests: a CA with client and server workload
//! certificates, a real HBONE server on loopback TCP, an in-memory (duplex) dialer for tests that
//! run on tokio's paused clock, and echo helpers.
#![allow(dead_code)]

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use ambit_hbone::server::{InboundRequest, Responder, serve_connection};
use ambit_hbone::{
    BoxedIo, DialError, DialFuture, Dialer, H2Config, HboneStream, Pool, PoolConfig, PoolKey,
    TlsDialer,
};
use ambit_identity::ca::CertificateAuthority;
use ambit_identity::{Identity, WorkloadCertificate, tls};
use http::HeaderMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub(crate) const TRUST_DOMAIN: &str = "cluster.local";
/// Upper bound for any single wait in a test.
pub(crate) const WAIT: Duration = Duration::from_secs(60);

pub(crate) fn client_identity() -> Identity {
    Identity::new(TRUST_DOMAIN, "client-ns", "client-sa").unwrap()
}

pub(crate) fn server_identity() -> Identity {
    Identity::new(TRUST_DOMAIN, "server-ns", "server-sa").unwrap()
}

/// One CA and a certificate for each side, as istiod would issue them.
pub(crate) struct Certs {
    pub(crate) ca: CertificateAuthority,
    pub(crate) client: Arc<WorkloadCertificate>,
    pub(crate) server: Arc<WorkloadCertificate>,
}

impl Certs {
    pub(crate) fn new() -> Self {
        let ca =
            CertificateAuthority::generate_root(TRUST_DOMAIN, Duration::from_secs(86_400)).unwrap();
        let ttl = Duration::from_secs(3600);
        let client = Arc::new(ca.issue(&client_identity(), ttl).unwrap());
        let server = Arc::new(ca.issue(&server_identity(), ttl).unwrap());
        Self { ca, client, server }
    }

    pub(crate) fn dialer(&self) -> Arc<dyn Dialer> {
        Arc::new(TlsDialer::with_certificate(Arc::clone(&self.client)))
    }
}

/// The type-erased handler the fixtures share.
pub(crate) type TestHandler = Arc<
    dyn Fn(InboundRequest, Responder) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync,
>;

pub(crate) fn handler<H, F>(handler: H) -> TestHandler
where
    H: Fn(InboundRequest, Responder) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    Arc::new(move |request, responder| Box::pin(handler(request, responder)))
}

/// Accepts the tunnel and sends every byte back, half-closing after the client did.
pub(crate) fn echo_handler() -> TestHandler {
    handler(|_request, responder| async move {
        let Ok(stream) = responder.accept(HeaderMap::new()) else {
            return;
        };
        let (mut read, mut write) = tokio::io::split(stream);
        if tokio::io::copy(&mut read, &mut write).await.is_ok() {
            let _ = write.shutdown().await;
        }
    })
}

/// Counts of connections the server side saw, and any errors `serve_connection` returned.
#[derive(Clone, Default)]
pub(crate) struct ServerLog {
    pub(crate) accepted: Arc<AtomicUsize>,
    pub(crate) closed: Arc<AtomicUsize>,
    pub(crate) errors: Arc<Mutex<Vec<String>>>,
}

impl ServerLog {
    pub(crate) fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }

    pub(crate) fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }

    /// Waits (bounded) until `count` connections have ended on the server side.
    pub(crate) async fn wait_closed(&self, count: usize) {
        tokio::time::timeout(WAIT, async {
            while self.closed() < count {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("server connections closed: {} of {count}", self.closed()));
    }

    /// Runs one server connection: TLS accept, then HBONE until the client leaves or shutdown.
    async fn serve<IO>(
        &self,
        io: IO,
        tls_config: Arc<rustls::ServerConfig>,
        addresses: (SocketAddr, SocketAddr),
        handler: TestHandler,
        mut shutdown: watch::Receiver<u64>,
    ) where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        self.accepted.fetch_add(1, Ordering::SeqCst);
        let result = match tls::accept(tls_config, io).await {
            Ok((tls_stream, peer)) => {
                let handler = move |request, responder| handler(request, responder);
                // Shut down when the generation moves past the one this connection started in.
                let started_in = *shutdown.borrow_and_update();
                let shutdown = async move {
                    let _ = shutdown
                        .wait_for(|generation| *generation > started_in)
                        .await;
                };
                let (local, remote) = addresses;
                let config = H2Config::default();
                serve_connection(tls_stream, peer, local, remote, &config, handler, shutdown)
                    .await
                    .map_err(|error| error.to_string())
            }
            Err(error) => Err(format!("TLS accept: {error}")),
        };
        if let Err(error) = result {
            self.errors.lock().unwrap().push(error);
        }
        self.closed.fetch_add(1, Ordering::SeqCst);
    }
}

/// A real HBONE server on a loopback port: TLS with the server certificate, then
/// `serve_connection` per TCP connection.
pub(crate) struct TestServer {
    pub(crate) addr: SocketAddr,
    pub(crate) log: ServerLog,
    shutdown: watch::Sender<u64>,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl TestServer {
    pub(crate) async fn start(certs: &Certs, handler: TestHandler) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tls_config = tls::server_config(&certs.server).unwrap();
        let log = ServerLog::default();
        let (shutdown, shutdown_rx) = watch::channel(0);
        let accept_log = log.clone();
        let accept_loop = tokio::spawn(async move {
            loop {
                let Ok((tcp, remote)) = listener.accept().await else {
                    return;
                };
                tcp.set_nodelay(true).unwrap();
                let log = accept_log.clone();
                let (tls_config, handler) = (Arc::clone(&tls_config), Arc::clone(&handler));
                let shutdown = shutdown_rx.clone();
                tokio::spawn(async move {
                    log.serve(tcp, tls_config, (addr, remote), handler, shutdown)
                        .await;
                });
            }
        });
        Self {
            addr,
            log,
            shutdown,
            accept_loop,
        }
    }

    /// Starts a graceful shutdown (GOAWAY) of every connection; new ones are still accepted.
    pub(crate) fn shutdown_connections(&self) {
        self.shutdown.send_modify(|generation| *generation += 1);
    }

    pub(crate) fn key(&self) -> PoolKey {
        pool_key(self.addr)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

pub(crate) fn pool_key(dst: SocketAddr) -> PoolKey {
    PoolKey {
        src_id: client_identity(),
        dst_ids: vec![server_identity()],
        dst,
        src: IpAddr::V4(Ipv4Addr::LOCALHOST),
    }
}

pub(crate) fn pool(certs: &Certs, config: PoolConfig) -> Pool {
    Pool::new(config, certs.dialer())
}

/// Dials over in-memory pipes, running a real TLS + HBONE server task per connection; for tests on
/// the paused clock, where real sockets could trip real-time timeouts.
pub(crate) struct DuplexDialer {
    pub(crate) client_cert: Arc<WorkloadCertificate>,
    pub(crate) server_tls: Arc<rustls::ServerConfig>,
    pub(crate) handler: TestHandler,
    pub(crate) log: ServerLog,
    /// Set to make every connection this dialer made go silent, like a peer whose node vanished.
    pub(crate) blackhole: Arc<AtomicBool>,
}

impl DuplexDialer {
    pub(crate) fn new(certs: &Certs, handler: TestHandler) -> Arc<Self> {
        Arc::new(Self {
            client_cert: Arc::clone(&certs.client),
            server_tls: tls::server_config(&certs.server).unwrap(),
            handler,
            log: ServerLog::default(),
            blackhole: Arc::default(),
        })
    }
}

impl Dialer for DuplexDialer {
    fn dial(&self, key: &PoolKey) -> DialFuture<'_> {
        let key = key.clone();
        Box::pin(async move {
            let (client_io, server_io) = tokio::io::duplex(256 * 1024);
            let log = self.log.clone();
            let (server_tls, handler) = (Arc::clone(&self.server_tls), Arc::clone(&self.handler));
            let remote = SocketAddr::new(key.src, 40_000);
            let (_never_stop, shutdown) = watch::channel(0);
            tokio::spawn(async move {
                let _keep_open = _never_stop;
                log.serve(server_io, server_tls, (key.dst, remote), handler, shutdown)
                    .await;
            });
            let config = tls::client_config(&self.client_cert, &key.dst_ids).unwrap();
            let client_io = Blackholable {
                inner: client_io,
                blackhole: Arc::clone(&self.blackhole),
            };
            let (tls_stream, peer) = tls::connect(config, client_io)
                .await
                .map_err(|error| DialError::Tls(Box::new(error)))?;
            Ok((Box::new(tls_stream) as BoxedIo, peer))
        })
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), different per seed.
pub(crate) fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        bytes.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

/// FNV-1a, to compare large payloads without keeping both copies around.
pub(crate) fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Sends `data`, half-closes, and returns everything the peer sent until EOF. Reads while
/// writing, so payloads larger than the flow-control windows cannot deadlock.
pub(crate) async fn send_and_receive(stream: HboneStream, data: &[u8]) -> Vec<u8> {
    let (mut read, mut write) = tokio::io::split(stream);
    let writer = async {
        write.write_all(data).await.unwrap();
        write.shutdown().await.unwrap();
    };
    let reader = async {
        let mut received = Vec::new();
        read.read_to_end(&mut received).await.unwrap();
        received
    };
    let ((), received) = tokio::time::timeout(WAIT, async { tokio::join!(writer, reader) })
        .await
        .expect("echo round trip finished in time");
    received
}

/// Half-closes `stream` and returns everything the peer sends until EOF (for a stream whose
/// writes are done).
pub(crate) async fn finish_and_receive(stream: &mut HboneStream) -> Vec<u8> {
    stream.shutdown().await.unwrap();
    let mut received = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut received))
        .await
        .expect("the peer ended in time")
        .unwrap();
    received
}

/// A loopback port with nothing listening on it.
pub(crate) async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    listener.local_addr().unwrap()
}

/// A transport that, once `blackhole` is set, drops everything written and never delivers
/// anything more: the network path to the peer silently died.
struct Blackholable<T> {
    inner: T,
    blackhole: Arc<AtomicBool>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Blackholable<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.blackhole.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Blackholable<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.blackhole.load(Ordering::SeqCst) {
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
