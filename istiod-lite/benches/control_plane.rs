//! The control plane at cluster scale, in one process over loopback:
//! - translation time, memory and bytes on the wire per workload with 10,000 and 100,000 pods
//!   (one service per ten pods);
//! - time for 1,000 delta-xDS clients subscribing at once to all hold everything (each type's set
//!   is encoded and gzipped once per generation and shared), with the CPU spent by the server's
//!   runtime and by the in-process clients' (decompression and decoding), at 10,000 pods;
//! - time from one policy change until those 1,000 clients all hold it (p50/p99);
//! - resources and bytes pushed to a client that reconnects holding everything (should be zero).
//!
//! `cargo bench -p istiod-lite --bench control_plane` runs the full sizes; without `--bench` it
//! runs 2,000 pods and 50 clients as a smoke test.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ambit_core::metrics::Registry;
use ambit_mesh::objects::{
    AuthorizationPolicy, Namespace, ObjectMeta, Pod, PodSpec, PodStatus, Service, ServicePort,
    ServiceSpec,
};
use ambit_mesh::translate::{Cluster, MeshSettings, translate};
use ambit_proto::discovery::DeltaDiscoveryRequest;
use ambit_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ambit_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use istiod_lite::auth::TokenFileAuthenticator;
use istiod_lite::store::Store;
use istiod_lite::xds::XdsServer;
use prost::Message;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::TcpListenerStream;

fn meta(ns: &str, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: name.into(),
        namespace: ns.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..ObjectMeta::default()
    }
}

fn cluster(pods: usize, policy: bool) -> Cluster {
    let mut c = Cluster::default();
    for n in 0..50 {
        let name = format!("ns-{n}");
        c.namespaces.insert(
            name.clone(),
            Namespace {
                metadata: meta(&name, &name, &[("istio.io/dataplane-mode", "ambient")]),
            },
        );
    }
    for s in 0..pods / 10 {
        let ns = format!("ns-{}", s % 50);
        let app = format!("svc-{s}");
        c.services.insert(
            (ns.clone(), app.clone()),
            Service {
                metadata: meta(&ns, &app, &[]),
                spec: ServiceSpec {
                    selector: [("app".to_string(), app.clone())].into_iter().collect(),
                    cluster_ip: format!("10.96.{}.{}", s / 250, s % 250 + 1),
                    ports: vec![ServicePort {
                        name: "http".into(),
                        port: 80,
                        target_port: Some(serde_json::json!(8080)),
                        ..ServicePort::default()
                    }],
                    ..ServiceSpec::default()
                },
            },
        );
    }
    for i in 0..pods {
        let s = i / 10;
        let ns = format!("ns-{}", s % 50);
        let app = format!("svc-{s}");
        let name = format!("{app}-7d9f8c6b5-{i:05x}");
        c.pods.insert(
            (ns.clone(), name.clone()),
            Pod {
                metadata: meta(&ns, &name, &[("app", &app), ("version", "v1")]),
                spec: PodSpec {
                    node_name: format!("node-{}", i % 100),
                    service_account_name: app.clone(),
                    ..PodSpec::default()
                },
                status: PodStatus {
                    pod_ip: format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256),
                    ..PodStatus::default()
                },
            },
        );
    }
    if policy {
        let p: AuthorizationPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "allow-ns0", "namespace": "ns-0"},
            "spec": {"rules": [{"from": [{"source": {"namespaces": ["ns-0"]}}]}]}
        }))
        .expect("literal policy");
        c.policies.insert(("ns-0".into(), "allow-ns0".into()), p);
    }
    c
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// CPU time (user + system) used so far by this process's threads named `name` (a runtime's
/// workers and blocking threads), from `/proc/self/task/*/stat` in clock ticks of 10 ms (USER_HZ
/// on Linux). Threads that ended are not counted, so runtimes are kept for the whole run.
fn cpu_time(name: &str) -> Duration {
    let mut ticks = 0;
    let tasks = std::fs::read_dir("/proc/self/task").into_iter().flatten();
    for task in tasks.flatten() {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // The command name is in parentheses (it may hold spaces); fields follow it.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if head.split_once('(').map(|(_, comm)| comm) != Some(name) {
            continue;
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
        for i in [11, 12] {
            ticks += fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Duration::from_millis(ticks * 10)
}

/// Thread names of the two runtimes: the xDS server's and the in-process clients'.
const SERVER_THREADS: &str = "xds-server";
const CLIENT_THREADS: &str = "xds-clients";

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes: &[usize] = if full { &[10_000, 100_000] } else { &[2_000] };
    let clients = if full { 1_000 } else { 50 };
    println!(
        "| pods | translation | RSS growth per workload | Workload resource, encoded | initial sync on the wire per workload, plain | with gzip |\n|---|---:|---:|---:|---:|---:|"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(CLIENT_THREADS)
        .enable_all()
        .build()
        .expect("runtime");
    // The xDS server of the push benchmark runs on its own threads, so that its CPU is told apart
    // from the clients' (both share the machine's two cores).
    let server_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(SERVER_THREADS)
        .enable_all()
        .build()
        .expect("server runtime");
    for &pods in sizes {
        let before = rss_kib();
        let c = cluster(pods, false);
        let start = Instant::now();
        let resources = translate(&c, &MeshSettings::default());
        let took = start.elapsed();
        let store = Store::new();
        store.replace(c, &resources);
        let grown = rss_kib().saturating_sub(before);
        let workload_bytes: usize = resources
            .addresses
            .values()
            .filter(|a| {
                matches!(
                    a.r#type,
                    Some(ambit_proto::workload::address::Type::Workload(_))
                )
            })
            .map(|a| a.encoded_len())
            .sum();
        let (plain, gzip) = runtime.block_on(async {
            (
                initial_sync_wire_bytes(&store, false).await,
                initial_sync_wire_bytes(&store, true).await,
            )
        });
        println!(
            "| {pods} | {:.0} ms | {} B | {} B | {} B | {} B |",
            took.as_secs_f64() * 1e3,
            grown * 1024 / pods as u64,
            workload_bytes / pods,
            plain / pods as u64,
            gzip / pods as u64
        );
    }
    runtime.block_on(push_latency(
        if full { 10_000 } else { 2_000 },
        clients,
        server_runtime.handle(),
    ));
}

/// Counts the bytes a server writes to one accepted connection: what goes on the wire (before
/// TLS, which adds about 22 bytes per 16 KiB record).
struct Counted {
    inner: tokio::net::TcpStream,
    sent: Arc<AtomicU64>,
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &result {
            self.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &result {
            self.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Counted {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

/// Bytes the server writes for one client's initial sync of both types, over a fresh
/// connection, with or without the client accepting gzip.
async fn initial_sync_wire_bytes(store: &Store, gzip: bool) -> u64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = dir.path().join("tokens.json");
    std::fs::write(&tokens, r#"{"tokens": [{"token": "t", "node": "node-1"}]}"#).expect("tokens");
    let server = XdsServer {
        store: store.clone(),
        auth: TokenFileAuthenticator::new(tokens).into(),
        metrics: Registry::new(),
        debounce: Duration::from_millis(100),
        shutdown: Default::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let incoming = TcpListenerStream::new(listener).map(move |accepted| {
        accepted.map(|inner| Counted {
            inner,
            sent: counter.clone(),
        })
    });
    let serving = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(istiod_lite::xds::service(server))
            .serve_with_incoming(incoming),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
    if gzip {
        client = client.accept_compressed(tonic::codec::CompressionEncoding::Gzip);
    }
    let requests = [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL].map(|t| DeltaDiscoveryRequest {
        type_url: t.into(),
        ..Default::default()
    });
    let mut request =
        tonic::Request::new(tokio_stream::iter(requests).chain(tokio_stream::pending()));
    request
        .metadata_mut()
        .insert("authorization", "Bearer t".parse().expect("header"));
    let mut stream = client
        .delta_aggregated_resources(request)
        .await
        .expect("stream")
        .into_inner();
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .expect("initial response in time")
            .expect("initial response");
    }
    let bytes = sent.load(Ordering::Relaxed);
    // Graceful shutdown would wait for the client's connection: stop the server outright.
    serving.abort();
    bytes
}

async fn push_latency(pods: usize, clients: usize, server_runtime: &tokio::runtime::Handle) {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = dir.path().join("tokens.json");
    std::fs::write(&tokens, r#"{"tokens": [{"token": "t", "node": "node-1"}]}"#).expect("tokens");
    let store = Store::new();
    let c = cluster(pods, false);
    let resources = translate(&c, &MeshSettings::default());
    store.replace(c, &resources);
    let server = XdsServer {
        store: store.clone(),
        auth: TokenFileAuthenticator::new(tokens).into(),
        metrics: Registry::new(),
        debounce: Duration::from_millis(100),
        shutdown: Default::default(),
    };
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    server_runtime.spawn(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let _ = bound_tx.send(listener.local_addr().expect("addr"));
        tonic::transport::Server::builder()
            .add_service(istiod_lite::xds::service(server).max_decoding_message_size(64 << 20))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
    });
    let addr = bound_rx.await.expect("server bound");
    // Clients share 10 HTTP/2 connections, as many proxies would share a node's uplink.
    let mut channels = Vec::new();
    for _ in 0..10 {
        channels.push(
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .expect("uri")
                .connect()
                .await
                .expect("connect"),
        );
    }
    let (held_tx, mut held_rx) = tokio::sync::mpsc::channel::<Instant>(clients);
    let start_sync = Instant::now();
    let start_cpu = (cpu_time(SERVER_THREADS), cpu_time(CLIENT_THREADS));
    let start_rss = rss_kib();
    let (synced_tx, mut synced_rx) = tokio::sync::mpsc::channel::<()>(clients);
    for i in 0..clients {
        let mut client =
            AggregatedDiscoveryServiceClient::new(channels[i % channels.len()].clone())
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
                .max_decoding_message_size(64 << 20);
        let held_tx = held_tx.clone();
        let synced_tx = synced_tx.clone();
        tokio::spawn(async move {
            let requests = vec![
                DeltaDiscoveryRequest {
                    type_url: ADDRESS_TYPE_URL.into(),
                    ..Default::default()
                },
                DeltaDiscoveryRequest {
                    type_url: AUTHORIZATION_TYPE_URL.into(),
                    ..Default::default()
                },
            ];
            let mut request =
                tonic::Request::new(tokio_stream::iter(requests).chain(tokio_stream::pending()));
            request
                .metadata_mut()
                .insert("authorization", "Bearer t".parse().expect("header"));
            let Ok(response) = client.delta_aggregated_resources(request).await else {
                return;
            };
            let mut stream = response.into_inner();
            let mut initial = 0;
            while let Ok(Some(message)) = stream.message().await {
                if initial < 2 {
                    initial += 1;
                    if initial == 2 {
                        let _ = synced_tx.send(()).await;
                    }
                    continue;
                }
                if message.type_url == AUTHORIZATION_TYPE_URL
                    && message.resources.iter().any(|r| r.name == "ns-0/allow-ns0")
                {
                    let _ = held_tx.send(Instant::now()).await;
                    return;
                }
            }
        });
    }
    for _ in 0..clients {
        synced_rx.recv().await.expect("client synced");
    }
    let sync_time = start_sync.elapsed();
    let sync_cpu = (
        cpu_time(SERVER_THREADS).saturating_sub(start_cpu.0),
        cpu_time(CLIENT_THREADS).saturating_sub(start_cpu.1),
    );
    let sessions_rss = rss_kib().saturating_sub(start_rss);
    let changed = Instant::now();
    let c = cluster(pods, true);
    let resources = translate(&c, &MeshSettings::default());
    store.replace(c, &resources);
    let mut latencies = Vec::new();
    for _ in 0..clients {
        if let Ok(Some(at)) = tokio::time::timeout(Duration::from_secs(60), held_rx.recv()).await {
            latencies.push(at.duration_since(changed));
        }
    }
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1e3)
            .unwrap_or(f64::NAN)
    };
    println!(
        "\n{clients} clients at {pods} pods: initial sync of all {:.0} ms (CPU: server {:.2} s, clients {:.2} s; RSS growth, mostly the clients' buffers, {} MiB); a policy change held by {}/{clients} clients: p50 {:.0} ms, p99 {:.0} ms (includes the 100 ms debounce)",
        sync_time.as_secs_f64() * 1e3,
        sync_cpu.0.as_secs_f64(),
        sync_cpu.1.as_secs_f64(),
        sessions_rss / 1024,
        latencies.len(),
        pct(0.5),
        pct(0.99)
    );

    // A client that reconnects holding everything receives nothing.
    let mut client = AggregatedDiscoveryServiceClient::new(channels[0].clone())
        .max_decoding_message_size(64 << 20);
    let held = |t: &str| {
        store.snapshot().types[t]
            .iter()
            .map(|(n, e)| (n.clone(), e.version.clone()))
            .collect()
    };
    let requests = vec![
        DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE_URL.into(),
            initial_resource_versions: held(ADDRESS_TYPE_URL),
            ..Default::default()
        },
        DeltaDiscoveryRequest {
            type_url: AUTHORIZATION_TYPE_URL.into(),
            initial_resource_versions: held(AUTHORIZATION_TYPE_URL),
            ..Default::default()
        },
    ];
    let mut request = tonic::Request::new(tokio_stream::iter(requests));
    request
        .metadata_mut()
        .insert("authorization", "Bearer t".parse().expect("header"));
    let mut stream = client
        .delta_aggregated_resources(request)
        .await
        .expect("stream")
        .into_inner();
    let (mut resources_pushed, mut bytes) = (0usize, 0usize);
    for _ in 0..2 {
        if let Ok(Ok(Some(m))) =
            tokio::time::timeout(Duration::from_secs(10), stream.message()).await
        {
            resources_pushed += m.resources.len();
            bytes += m.resources.iter().map(|r| r.encoded_len()).sum::<usize>();
        }
    }
    println!("reconnect holding everything: {resources_pushed} resources, {bytes} bytes pushed");
}
