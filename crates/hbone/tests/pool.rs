//! Pool behaviour seen from outside: reuse, per-connection stream limits, no dial storms, idle
//! release on the paused clock, and 1,000 concurrent tunnels.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use ambit_hbone::{ConnectRequest, HboneStream, PoolConfig};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Barrier;
use tokio::time::timeout;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_streams_echo_through_ten_connections() {
    const STREAMS: usize = 1000;
    const PAYLOAD: usize = 64 * 1024;
    let certs = Certs::new();
    let server = TestServer::start(&certs, echo_handler()).await;
    let pool = pool(&certs, PoolConfig::default());
    // Every stream waits until all are open, so all 1,000 are concurrent on the wire.
    let all_open = Arc::new(Barrier::new(STREAMS));
    let mut tasks = tokio::task::JoinSet::new();
    for seed in 0..STREAMS {
        let (pool, key, all_open) = (pool.clone(), server.key(), Arc::clone(&all_open));
        tasks.spawn(async move {
            let authority = format!("10.0.{}.{}:8080", seed / 250, seed % 250);
            let stream = pool
                .connect(key, ConnectRequest::new(authority))
                .await
                .unwrap();
            all_open.wait().await;
            let payload = pseudo_random_bytes(seed as u64, PAYLOAD);
            let echoed = send_and_receive(stream, &payload).await;
            assert_eq!(echoed.len(), PAYLOAD, "stream {seed}");
            assert_eq!(checksum(&echoed), checksum(&payload), "stream {seed}");
        });
    }
    let mut succeeded = 0;
    timeout(Duration::from_secs(240), async {
        while let Some(result) = tasks.join_next().await {
            result.unwrap();
            succeeded += 1;
        }
    })
    .await
    .expect("1,000 echo streams finished in time");
    assert_eq!(succeeded, STREAMS);
    // 1,000 streams at 100 per connection (the server allows 200).
    assert_eq!(pool.stats().connections_opened, 10);
    assert_eq!(pool.stats().open_streams, 0);
    assert!(server.log.errors().is_empty(), "{:?}", server.log.errors());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_streams_reuse_one_connection() {
    let certs = Certs::new();
    let server = TestServer::start(&certs, echo_handler()).await;
    let pool = pool(&certs, PoolConfig::default());
    for round in 0..2u8 {
        let stream = pool
            .connect(server.key(), ConnectRequest::new("127.0.0.1:80"))
            .await
            .unwrap();
        assert_eq!(pool.stats().open_streams, 1);
        assert_eq!(send_and_receive(stream, &[round; 10]).await, [round; 10]);
    }
    let stats = pool.stats();
    assert_eq!(
        (
            stats.connections_opened,
            stats.connections,
            stats.open_streams
        ),
        (1, 1, 0)
    );
    assert_eq!(server.log.accepted.load(SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_limit_opens_another_connection() {
    let certs = Certs::new();
    let server = TestServer::start(&certs, echo_handler()).await;
    let config = PoolConfig {
        max_streams_per_connection: 2,
        ..PoolConfig::default()
    };
    let pool = pool(&certs, config);
    let mut streams: Vec<HboneStream> = Vec::new();
    for _ in 0..3 {
        let stream = pool
            .connect(server.key(), ConnectRequest::new("127.0.0.1:80"))
            .await
            .unwrap();
        streams.push(stream);
    }
    let stats = pool.stats();
    assert_eq!(
        (
            stats.connections_opened,
            stats.connections,
            stats.open_streams
        ),
        (2, 2, 3)
    );
    for (index, stream) in streams.into_iter().enumerate() {
        let message = format!("stream {index}");
        assert_eq!(
            send_and_receive(stream, message.as_bytes()).await,
            message.as_bytes()
        );
    }
    assert_eq!(pool.stats().open_streams, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_connects_share_one_dial() {
    let certs = Certs::new();
    let server = TestServer::start(&certs, echo_handler()).await;
    let pool = pool(&certs, PoolConfig::default());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let (pool, key) = (pool.clone(), server.key());
        tasks.spawn(async move { pool.connect(key, ConnectRequest::new("127.0.0.1:80")).await });
    }
    let mut streams = Vec::new();
    while let Some(result) = timeout(WAIT, tasks.join_next()).await.unwrap() {
        streams.push(result.unwrap().unwrap());
    }
    assert_eq!(streams.len(), 50);
    assert_eq!(pool.stats().connections_opened, 1, "no connection storm");
    assert_eq!(pool.stats().open_streams, 50);
}

/// Opens one stream and checks it echoes.
async fn use_once(pool: &ambit_hbone::Pool, message: &[u8]) {
    let stream = pool
        .connect(
            pool_key("10.9.9.9:15008".parse().unwrap()),
            ConnectRequest::new("10.9.9.9:80"),
        )
        .await
        .unwrap();
    assert_eq!(send_and_receive(stream, message).await, message);
}

#[tokio::test(start_paused = true)]
async fn idle_connections_are_released_after_idle_release() {
    let certs = Certs::new();
    let dialer = DuplexDialer::new(&certs, echo_handler());
    let config = PoolConfig {
        idle_release: Duration::from_secs(300),
        ..PoolConfig::default()
    };
    let pool = ambit_hbone::Pool::new(config, dialer.clone());

    use_once(&pool, b"first").await;
    assert_eq!(pool.stats().connections, 1);
    // Keepalive PINGs flow meanwhile (every 10 s) and do not count as use.
    tokio::time::sleep(Duration::from_secs(299)).await;
    assert_eq!(
        pool.stats().connections,
        1,
        "still pooled just before idle_release"
    );
    assert_eq!(dialer.log.closed(), 0);

    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(pool.stats().connections, 0, "released after idle_release");
    // With the pool's handle gone h2 closes the connection, and the server sees it end cleanly.
    dialer.log.wait_closed(1).await;
    assert!(dialer.log.errors().is_empty(), "{:?}", dialer.log.errors());

    use_once(&pool, b"second").await;
    assert_eq!(pool.stats().connections_opened, 2);
}

#[tokio::test(start_paused = true)]
async fn connections_with_open_streams_are_not_released() {
    let certs = Certs::new();
    let dialer = DuplexDialer::new(&certs, echo_handler());
    let config = PoolConfig {
        idle_release: Duration::from_secs(60),
        ..PoolConfig::default()
    };
    let pool = ambit_hbone::Pool::new(config, dialer.clone());
    let mut stream = pool
        .connect(
            pool_key("10.9.9.9:15008".parse().unwrap()),
            ConnectRequest::new("10.9.9.9:80"),
        )
        .await
        .unwrap();

    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(pool.stats().connections, 1);
    stream.write_all(b"still here").await.unwrap();
    let mut echoed = [0u8; 10];
    stream.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"still here");

    // Once the stream is gone the idle clock starts.
    drop(stream);
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(pool.stats().connections, 0);
    use_once(&pool, b"fresh").await;
    assert_eq!(pool.stats().connections_opened, 2);
}

#[tokio::test(start_paused = true)]
async fn unanswered_keepalive_drops_the_connection() {
    let certs = Certs::new();
    let dialer = DuplexDialer::new(&certs, echo_handler());
    let pool = ambit_hbone::Pool::new(PoolConfig::default(), dialer.clone());
    let mut stream = pool
        .connect(
            pool_key("10.9.9.9:15008".parse().unwrap()),
            ConnectRequest::new("10.9.9.9:80"),
        )
        .await
        .unwrap();
    // Healthy connections survive many keepalive rounds.
    tokio::time::sleep(Duration::from_secs(65)).await;
    assert_eq!(pool.stats().connections, 1);

    dialer.blackhole.store(true, SeqCst);
    // PINGs go out every 10 s from the connection's start: the one at 70 s gets no PONG, and 20 s
    // later (at 90 s) the connection is dropped.
    tokio::time::sleep(Duration::from_secs(24)).await;
    assert_eq!(
        pool.stats().connections,
        1,
        "not dropped before the keepalive timeout"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        pool.stats().connections,
        0,
        "dropped after the keepalive timeout"
    );
    let mut buf = [0u8; 1];
    let error = stream.read(&mut buf).await.unwrap_err();
    assert!(!error.to_string().is_empty());

    dialer.blackhole.store(false, SeqCst);
    use_once(&pool, b"new connection").await;
    assert_eq!(pool.stats().connections_opened, 2);
}
