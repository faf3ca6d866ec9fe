//! HBONE against plain loopback TCP, measured in the same run: single-stream throughput,
//! request/response latency on a warm stream, and new streams per second on a warm pool.
//! Prints a Markdown table. `cargo bench -p ambit-hbone --bench hbone` runs the full sizes;
//! without `--bench` (as under `cargo test --all-targets`) it runs tiny sizes as a smoke test.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_hbone::server::{InboundRequest, Responder, serve_connection};
use ambit_hbone::{ConnectRequest, H2Config, Pool, PoolConfig, PoolKey, TlsDialer};
use ambit_identity::ca::CertificateAuthority;
use ambit_identity::{Identity, tls};
use http::HeaderMap;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How much traffic each benchmark sends.
struct Sizes {
    throughput_bytes: u64,
    round_trips: usize,
    new_streams: usize,
}

const FULL: Sizes = Sizes {
    throughput_bytes: 1 << 30,
    round_trips: 10_000,
    new_streams: 5_000,
};
const SMOKE: Sizes = Sizes {
    throughput_bytes: 4 << 20,
    round_trips: 200,
    new_streams: 100,
};
const CHUNK: usize = 256 * 1024;
const MESSAGE: usize = 64;
const CHURN_WORKERS: usize = 16;
/// Bound on each whole benchmark, so a hang cannot stall CI.
const LIMIT: Duration = Duration::from_secs(600);

fn main() {
    let full = std::env::args().any(|arg| arg == "--bench");
    let sizes = if full { FULL } else { SMOKE };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime for the benchmark");
    runtime.block_on(run(&sizes));
}

/// What the server side does with a connection, picked by `:authority` (HBONE) or port (TCP).
#[derive(Clone, Copy)]
enum App {
    /// Reads to EOF, then answers with the byte count (8 bytes, big endian).
    Sink,
    /// Sends every byte back.
    Echo,
}

async fn serve_app<S: AsyncRead + AsyncWrite + Unpin>(app: App, stream: S) {
    let (mut read, mut write) = tokio::io::split(stream);
    match app {
        App::Sink => {
            let Ok(count) = tokio::io::copy(&mut read, &mut tokio::io::sink()).await else {
                return;
            };
            let _ = write.write_all(&count.to_be_bytes()).await;
        }
        App::Echo => {
            let _ = tokio::io::copy(&mut read, &mut write).await;
        }
    }
    let _ = write.shutdown().await;
}

/// The two ways of reaching the apps.
struct Paths {
    pool: Pool,
    hbone_key: PoolKey,
    sink_tcp: SocketAddr,
    echo_tcp: SocketAddr,
}

impl Paths {
    async fn hbone(&self, app: App) -> ambit_hbone::HboneStream {
        let authority = match app {
            App::Sink => "sink.bench:1",
            App::Echo => "echo.bench:1",
        };
        self.pool
            .connect(self.hbone_key.clone(), ConnectRequest::new(authority))
            .await
            .expect("HBONE CONNECT to the benchmark server")
    }

    async fn tcp(&self, app: App) -> TcpStream {
        let addr = match app {
            App::Sink => self.sink_tcp,
            App::Echo => self.echo_tcp,
        };
        let stream = TcpStream::connect(addr)
            .await
            .expect("TCP connect to the benchmark app");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        stream
    }
}

async fn tcp_app(app: App) -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(serve_app(app, stream));
        }
    });
    addr
}

async fn hbone_server(certs: &CertificateAuthority, server_id: &Identity) -> SocketAddr {
    let server_cert = certs
        .issue(server_id, Duration::from_secs(3600))
        .expect("server certificate");
    let tls_config = tls::server_config(&server_cert).expect("server TLS config");
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((tcp, remote)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            let tls_config = Arc::clone(&tls_config);
            tokio::spawn(async move {
                let Ok((stream, peer)) = tls::accept(tls_config, tcp).await else {
                    return;
                };
                let handler = |request: InboundRequest, responder: Responder| async move {
                    let app = if request.authority.starts_with("sink") {
                        App::Sink
                    } else {
                        App::Echo
                    };
                    if let Ok(stream) = responder.accept(HeaderMap::new()) {
                        serve_app(app, stream).await;
                    }
                };
                let config = H2Config::default();
                let never = std::future::pending::<()>();
                let _ = serve_connection(stream, peer, addr, remote, &config, handler, never).await;
            });
        }
    });
    addr
}

async fn setup() -> Paths {
    let trust_domain = "cluster.local";
    let ca = CertificateAuthority::generate_root(trust_domain, Duration::from_secs(86_400))
        .expect("benchmark CA");
    let client_id = Identity::new(trust_domain, "bench", "client").expect("identity");
    let server_id = Identity::new(trust_domain, "bench", "server").expect("identity");
    let client_cert = ca
        .issue(&client_id, Duration::from_secs(3600))
        .expect("client certificate");
    let hbone_addr = hbone_server(&ca, &server_id).await;
    let dialer = TlsDialer::with_certificate(Arc::new(client_cert));
    Paths {
        pool: Pool::new(PoolConfig::default(), Arc::new(dialer)),
        hbone_key: PoolKey {
            src_id: client_id,
            dst_ids: vec![server_id],
            dst: hbone_addr,
            src: IpAddr::V4(Ipv4Addr::LOCALHOST),
        },
        sink_tcp: tcp_app(App::Sink).await,
        echo_tcp: tcp_app(App::Echo).await,
    }
}

/// Sends `total` bytes and waits for the sink's count; returns MB/s (10^6 bytes per second).
async fn throughput<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, total: u64) -> f64 {
    let chunk = vec![0x5a_u8; CHUNK];
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let len = (total - sent).min(CHUNK as u64) as usize;
        stream.write_all(&chunk[..len]).await.expect("write");
        sent += len as u64;
    }
    stream.shutdown().await.expect("shutdown");
    let mut count = [0u8; 8];
    stream
        .read_exact(&mut count)
        .await
        .expect("sink's byte count");
    assert_eq!(u64::from_be_bytes(count), total, "sink received every byte");
    total as f64 / started.elapsed().as_secs_f64() / 1e6
}

/// Round trips of one small message on a warm stream; returns (p50, p99).
async fn latency<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    count: usize,
) -> (Duration, Duration) {
    let message = [0x42_u8; MESSAGE];
    let mut reply = [0u8; MESSAGE];
    // Warm up: the first exchanges include lazy allocations on both sides.
    for _ in 0..10 {
        stream.write_all(&message).await.expect("write");
        stream.read_exact(&mut reply).await.expect("read");
    }
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        stream.write_all(&message).await.expect("write");
        stream.read_exact(&mut reply).await.expect("read");
        samples.push(started.elapsed());
    }
    samples.sort();
    (percentile(&samples, 50), percentile(&samples, 99))
}

fn percentile(sorted: &[Duration], percent: usize) -> Duration {
    let index = (sorted.len() * percent / 100).min(sorted.len().saturating_sub(1));
    sorted.get(index).copied().unwrap_or_default()
}

/// Opens `count` short streams (one byte each way) from `CHURN_WORKERS` workers; returns
/// streams per second.
async fn churn<S, F, Fut>(count: usize, open: F) -> f64
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = S> + Send,
{
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..CHURN_WORKERS {
        let open = open.clone();
        let share = count / CHURN_WORKERS + usize::from(worker < count % CHURN_WORKERS);
        workers.spawn(async move {
            for _ in 0..share {
                let mut stream = open().await;
                stream.write_all(b"x").await.expect("write");
                stream.shutdown().await.expect("shutdown");
                let mut reply = Vec::with_capacity(1);
                stream.read_to_end(&mut reply).await.expect("read");
                assert_eq!(reply, b"x");
            }
        });
    }
    while let Some(result) = workers.join_next().await {
        result.expect("churn worker");
    }
    count as f64 / started.elapsed().as_secs_f64()
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {LIMIT:?}"))
}

async fn run(sizes: &Sizes) {
    let paths = Arc::new(setup().await);

    let hbone_mbps = bounded("HBONE throughput", async {
        throughput(paths.hbone(App::Sink).await, sizes.throughput_bytes).await
    })
    .await;
    let tcp_mbps = bounded("TCP throughput", async {
        throughput(paths.tcp(App::Sink).await, sizes.throughput_bytes).await
    })
    .await;

    let (hbone_p50, hbone_p99) = bounded("HBONE latency", async {
        latency(paths.hbone(App::Echo).await, sizes.round_trips).await
    })
    .await;
    let (tcp_p50, tcp_p99) = bounded("TCP latency", async {
        latency(paths.tcp(App::Echo).await, sizes.round_trips).await
    })
    .await;

    let hbone_paths = Arc::clone(&paths);
    let hbone_rate = bounded(
        "HBONE churn",
        churn(sizes.new_streams, move || {
            let paths = Arc::clone(&hbone_paths);
            async move { paths.hbone(App::Echo).await }
        }),
    )
    .await;
    let tcp_paths = Arc::clone(&paths);
    let tcp_rate = bounded(
        "TCP churn",
        churn(sizes.new_streams, move || {
            let paths = Arc::clone(&tcp_paths);
            async move { paths.tcp(App::Echo).await }
        }),
    )
    .await;

    let mib = sizes.throughput_bytes >> 20;
    println!();
    println!("| benchmark | HBONE (mTLS + HTTP/2) | plain TCP | HBONE / TCP |");
    println!("|---|---:|---:|---:|");
    println!(
        "| single-stream throughput, {mib} MiB | {hbone_mbps:.0} MB/s | {tcp_mbps:.0} MB/s | {:.2} |",
        hbone_mbps / tcp_mbps
    );
    for (name, hbone, tcp) in [("p50", hbone_p50, tcp_p50), ("p99", hbone_p99, tcp_p99)] {
        println!(
            "| {MESSAGE} B round trip {name}, {} on a warm stream | {:.1} µs | {:.1} µs | {:.2} |",
            sizes.round_trips,
            micros(hbone),
            micros(tcp),
            micros(hbone) / micros(tcp)
        );
    }
    println!(
        "| new streams/s ({} short, {CHURN_WORKERS} at a time; TCP: new connections) | {hbone_rate:.0} | {tcp_rate:.0} | {:.2} |",
        sizes.new_streams,
        hbone_rate / tcp_rate
    );
    let stats = paths.pool.stats();
    println!(
        "\nHBONE pool after the run: {} connection(s) dialed, {} open stream(s).",
        stats.connections_opened, stats.open_streams
    );
}
