//! `ambit-echo`: the workload of the demo, the lab and the end-to-end tests.
//!
//! - `serve`: raw TCP on one port (a JSON line describing who answered and the peer it saw, then
//!   an echo of every byte) and HTTP/1.1 + HTTP/2 cleartext on another (a JSON body naming the
//!   pod, namespace, node, version, peer and request headers).
//! - `call`: N HTTP requests to a URL, then a JSON summary of status codes and answering pods.
//! - `tcp`: one TCP connection: prints the greeting line, sends a message, prints the echo.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

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

#[derive(Clone)]
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
            } => {
                let id = Identity {
                    pod,
                    namespace,
                    node,
                    version,
                };
                serve(tcp_port, http_port, sink_port, id).await
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

async fn serve(tcp_port: u16, http_port: u16, sink_port: u16, id: Identity) -> anyhow::Result<()> {
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
        tasks.spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                let id = id.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let id = id.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(&id, peer, req)) }
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

fn answer(
    id: &Identity,
    peer: SocketAddr,
    req: http::Request<hyper::body::Incoming>,
) -> http::Response<Full<Bytes>> {
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).to_string(),
            )
        })
        .collect();
    let mut body = id.json(peer);
    body["method"] = json!(req.method().as_str());
    body["path"] = json!(req.uri().path());
    body["protocol"] = json!(format!("{:?}", req.version()));
    body["headers"] = json!(headers);
    let mut response = http::Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
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
