//! `ambit-echo`: the workload of the demo, the lab and the end-to-end tests.
//!
//! - `serve`: raw TCP on one port (a JSON line describing who answered and the peer it saw, then
//!   an echo of every byte) and HTTP/1.1 + HTTP/2 cleartext on another (a JSON body naming the
//!   pod, namespace, node, version, peer, method, path, host, protocol and request headers, with
//!   httpbin-style controls: see [`httpbin`]). The HTTP port also serves gRPC (h2c, dispatched on
//!   `content-type: application/grpc*`): health checks and an echo service, see [`grpc`].
//! - `call`: N HTTP requests to a URL, then a JSON summary of status codes and answering pods.
//! - `tcp`: one TCP connection: prints the greeting line, sends a message, prints the echo.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tonic::codegen::Service;

#[derive(Parser)]
#[command(
    name = "ambit-echo",
    about = "Echo workload: TCP and HTTP servers, and a client"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve TCP echo and HTTP.
    Serve {
        /// Raw TCP echo port (0 = off).
        #[arg(long, default_value_t = 9000)]
        tcp_port: u16,
        /// HTTP/1.1 and h2c port (0 = off).
        #[arg(long, default_value_t = 8080)]
        http_port: u16,
        /// Sink port for throughput tests: reads to EOF, answers with the byte count (0 = off).
        #[arg(long, default_value_t = 9001)]
        sink_port: u16,
        /// Pod name to report.
        #[arg(long, env = "POD_NAME", default_value = "")]
        pod: String,
        /// Namespace to report.
        #[arg(long, env = "POD_NAMESPACE", default_value = "")]
        namespace: String,
        /// Node to report.
        #[arg(long, env = "NODE_NAME", default_value = "")]
        node: String,
        /// Version label to report.
        #[arg(long, env = "VERSION", default_value = "v1")]
        version: String,
        /// HTTP status every request gets unless it asks for another (200-599).
        #[arg(long, env = "ECHO_STATUS", default_value = "200", value_parser = |v: &str| httpbin::parse_status("ECHO_STATUS", v))]
        status: u16,
        /// Milliseconds to wait before every answer (HTTP and gRPC).
        #[arg(long, env = "ECHO_DELAY_MS", default_value = "0", value_parser = |v: &str| httpbin::parse_delay("ECHO_DELAY_MS", v))]
        delay_ms: Duration,
        /// Fraction of requests (0.0-1.0, random) answered with the fail status (gRPC: UNAVAILABLE).
        #[arg(long, env = "ECHO_FAIL_FRACTION", default_value = "0", value_parser = |v: &str| httpbin::parse_fraction("ECHO_FAIL_FRACTION", v))]
        fail_fraction: f64,
        /// The HTTP status of those failed requests.
        #[arg(long, env = "ECHO_FAIL_STATUS", default_value = "503", value_parser = |v: &str| httpbin::parse_status("ECHO_FAIL_STATUS", v))]
        fail_status: u16,
    },
    /// Make HTTP requests and summarise the answers.
    Call {
        /// `http://host:port/path`.
        url: String,
        /// Number of requests.
        #[arg(long, short = 'n', default_value_t = 1)]
        count: u32,
        /// Per-request timeout in milliseconds.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Generate load and print JSON figures (for benchmarks).
    Load {
        /// `host:port` (throughput: the sink port; rr/connect: the TCP echo port).
        addr: String,
        /// throughput, rr or connect.
        #[arg(long)]
        mode: String,
        /// How long to run.
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        /// Parallel connections (rr, connect).
        #[arg(long, default_value_t = 1)]
        connections: usize,
    },
    /// One TCP exchange.
    Tcp {
        /// `host:port`.
        addr: String,
        /// What to send after the greeting.
        #[arg(long, default_value = "ping")]
        send: String,
        /// Timeout in milliseconds.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
}

/// Who this server is, as every answer reports it.
#[derive(Clone, Debug)]
struct Identity {
    pod: String,
    namespace: String,
    node: String,
    version: String,
}

impl Identity {
    fn json(&self, peer: SocketAddr) -> Value {
        json!({"pod": self.pod, "namespace": self.namespace, "node": self.node, "version": self.version, "peer": peer.to_string()})
    }
}

mod grpc;
mod httpbin;
mod load;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve {
                tcp_port,
                http_port,
                sink_port,
                pod,
                namespace,
                node,
                version,
                status,
                delay_ms,
                fail_fraction,
                fail_status,
            } => {
                let id = Identity {
                    pod,
                    namespace,
                    node,
                    version,
                };
                let controls = httpbin::Controls {
                    status,
                    delay: delay_ms,
                    fail_fraction,
                    fail_status,
                };
                serve(tcp_port, http_port, sink_port, id, controls).await
            }
            Command::Load {
                addr,
                mode,
                seconds,
                connections,
            } => {
                load::run(
                    &addr,
                    &mode,
                    Duration::from_secs(seconds),
                    connections.max(1),
                )
                .await
            }
            Command::Call {
                url,
                count,
                timeout_ms,
            } => call(&url, count, Duration::from_millis(timeout_ms)).await,
            Command::Tcp {
                addr,
                send,
                timeout_ms,
            } => tcp(&addr, &send, Duration::from_millis(timeout_ms)).await,
        }
    })
}

async fn serve(
    tcp_port: u16,
    http_port: u16,
    sink_port: u16,
    id: Identity,
    controls: httpbin::Controls,
) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    if sink_port != 0 {
        let listener = TcpListener::bind(("0.0.0.0", sink_port)).await?;
        tasks.spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buffer = vec![0u8; 256 * 1024];
                    let mut total: u64 = 0;
                    while let Ok(n) = stream.read(&mut buffer).await {
                        if n == 0 {
                            break;
                        }
                        total += n as u64;
                    }
                    let _ = stream.write_all(&total.to_be_bytes()).await;
                });
            }
        });
    }
    if tcp_port != 0 {
        let listener = TcpListener::bind(("0.0.0.0", tcp_port)).await?;
        let id = id.clone();
        tasks.spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                tokio::spawn(tcp_echo(stream, peer, id.clone()));
            }
        });
    }
    if http_port != 0 {
        let listener = TcpListener::bind(("0.0.0.0", http_port)).await?;
        let routes = grpc::routes(id.clone(), controls.clone());
        tasks.spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                let id = id.clone();
                let controls = controls.clone();
                let routes = routes.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |mut req| {
                        let id = id.clone();
                        let controls = controls.clone();
                        let mut routes = routes.clone();
                        async move {
                            if grpc::is_grpc(&req) {
                                req.extensions_mut().insert(grpc::Peer(peer));
                                std::future::poll_fn(|cx| {
                                    Service::<http::Request<Incoming>>::poll_ready(&mut routes, cx)
                                })
                                .await?;
                                routes.call(req).await
                            } else {
                                let response = httpbin::answer(&id, &controls, peer, req).await;
                                Ok(response.map(tonic::body::Body::new))
                            }
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    }
    eprintln!("ambit-echo: serving tcp={tcp_port} http={http_port} sink={sink_port}");
    while tasks.join_next().await.is_some() {}
    Ok(())
}

async fn tcp_echo(mut stream: TcpStream, peer: SocketAddr, id: Identity) {
    let greeting = format!("{}\n", id.json(peer));
    if stream.write_all(greeting.as_bytes()).await.is_err() {
        return;
    }
    let (mut r, mut w) = stream.split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

fn target(url: &str) -> anyhow::Result<(String, String, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("only http:// URLs are supported: {url}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((addr, authority.to_string(), path.to_string()))
}

async fn one_request(addr: &str, host: &str, path: &str) -> anyhow::Result<(u16, Value)> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = http::Request::builder()
        .uri(path)
        .header(http::header::HOST, host)
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

async fn call(url: &str, count: u32, timeout: Duration) -> anyhow::Result<()> {
    let (addr, host, path) = target(url)?;
    let mut codes: BTreeMap<String, u32> = BTreeMap::new();
    let mut pods: BTreeMap<String, u32> = BTreeMap::new();
    let mut errors: Vec<String> = Vec::new();
    for _ in 0..count {
        match tokio::time::timeout(timeout, one_request(&addr, &host, &path)).await {
            Ok(Ok((status, body))) => {
                *codes.entry(status.to_string()).or_default() += 1;
                if let Some(pod) = body.get("pod").and_then(Value::as_str) {
                    *pods.entry(pod.to_string()).or_default() += 1;
                }
            }
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(_) => errors.push(format!("no answer within {timeout:?}")),
        }
    }
    println!(
        "{}",
        json!({"url": url, "count": count, "codes": codes, "pods": pods, "errors": errors})
    );
    if errors.is_empty() {
        Ok(())
    } else {
        std::process::exit(1)
    }
}

async fn tcp(addr: &str, send: &str, timeout: Duration) -> anyhow::Result<()> {
    let exchange = async {
        let stream = TcpStream::connect(addr).await?;
        let mut reader = BufReader::new(stream);
        let mut greeting = String::new();
        if reader.read_line(&mut greeting).await? == 0 {
            anyhow::bail!(
                "{addr} closed the connection before answering (refused by policy, or nothing listening)"
            );
        }
        let mut stream = reader.into_inner();
        stream.write_all(send.as_bytes()).await?;
        stream.shutdown().await?;
        let mut echoed = String::new();
        stream.read_to_string(&mut echoed).await?;
        anyhow::Ok((greeting, echoed))
    };
    let (greeting, echoed) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {addr} within {timeout:?}"))??;
    print!("{greeting}");
    println!("{echoed}");
    Ok(())
}
