//! The client's first bytes sent with the CONNECT, before the server answers it
//! (`Pool::connect_with_early_data`): the server reads them only after it answered (as ztunnel's
//! inbound and upstream's do), they arrive once and in order ahead of what follows, a refusal
//! discards them without harming the connection, and the limit bounds them.

mod common;

use std::pin::Pin;
use std::task::{Context, Poll};

use ambit_hbone::server::{InboundRequest, Responder};
use ambit_hbone::{ConnectRequest, HboneError, PoolConfig};
use common::*;
use http::{HeaderMap, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::sync::watch;
use tokio::time::timeout;

/// The client socket as the pool sees it: reports how many bytes the pool has taken from it, so a
/// server can wait until the early bytes are on their way before it answers.
struct Observed {
    inner: DuplexStream,
    taken: watch::Sender<usize>,
}

impl AsyncRead for Observed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.taken.send_modify(|taken| *taken += read);
        }
        result
    }
}

/// A client connection whose first `first` bytes are already waiting to be read, and the
/// application's end of it (to send more, or to close it).
async fn client_with(first: &[u8]) -> (Observed, DuplexStream, watch::Receiver<usize>) {
    let (mut application, client) = tokio::io::duplex(256 * 1024);
    application.write_all(first).await.unwrap();
    let (taken, taken_rx) = watch::channel(0);
    let observed = Observed {
        inner: client,
        taken,
    };
    (observed, application, taken_rx)
}

/// Opens a tunnel to `server` (authority `127.0.0.1:80`) sending up to `limit` of the client's
/// first bytes with the CONNECT; bounded by the wait.
async fn connect_early<R: AsyncRead + Unpin>(
    pool: &ambit_hbone::Pool,
    server: &TestServer,
    client: &mut R,
    limit: usize,
) -> Result<(ambit_hbone::HboneStream, u64), HboneError> {
    timeout(
        WAIT,
        pool.connect_with_early_data(
            server.key(),
            ConnectRequest::new("127.0.0.1:80"),
            client,
            limit,
        ),
    )
    .await
    .expect("the tunnel opened or failed within the wait")
}

/// Waits (bounded) until the client's first bytes reached the server with its CONNECT, so a test
/// of what a server does with such bytes never depends on whether the DATA frame arrived before the
/// handler first read the tunnel. The bytes stay in the tunnel.
async fn wait_for_early_data(responder: &mut Responder) -> bytes::Bytes {
    timeout(WAIT, responder.early_data())
        .await
        .expect("the client's first bytes arrived within the wait")
        .expect("the client sent bytes before ending its side")
}

/// Waits until the client's pool took `bytes` from the client, then answers with `status`: 200
/// and an echo of everything (the early bytes first), or a refusal.
fn answer_after(bytes: usize, taken: watch::Receiver<usize>, status: StatusCode) -> TestHandler {
    handler(move |_request: InboundRequest, responder: Responder| {
        let mut taken = taken.clone();
        async move {
            timeout(WAIT, taken.wait_for(|taken| *taken >= bytes))
                .await
                .expect("the early bytes were read within the wait")
                .unwrap();
            if status != StatusCode::OK {
                return responder.refuse(status);
            }
            let stream = responder.accept(HeaderMap::new()).unwrap();
            let (mut read, mut write) = tokio::io::split(stream);
            if tokio::io::copy(&mut read, &mut write).await.is_ok() {
                let _ = write.shutdown().await;
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_bytes_arrive_once_and_ahead_of_the_rest() {
    let certs = Certs::new();
    let (mut client, _application, taken) = client_with(b"first ").await;
    let server = TestServer::start(&certs, answer_after(6, taken, StatusCode::OK)).await;
    let pool = pool(&certs, PoolConfig::default());

    let (stream, early) = connect_early(&pool, &server, &mut client, 64 * 1024)
        .await
        .unwrap();
    assert_eq!(
        early, 6,
        "the server answered only after the bytes were sent"
    );
    assert_eq!(send_and_receive(stream, b"second").await, b"first second");
    assert!(server.log.errors().is_empty(), "{:?}", server.log.errors());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_bounds_early_bytes_and_the_rest_follows_in_order() {
    let certs = Certs::new();
    let upload = pseudo_random_bytes(7, 10_000);
    let (mut client, _application, taken) = client_with(&upload).await;
    let server = TestServer::start(&certs, answer_after(1000, taken, StatusCode::OK)).await;
    let pool = pool(&certs, PoolConfig::default());

    let (mut stream, early) = connect_early(&pool, &server, &mut client, 1000)
        .await
        .unwrap();
    assert_eq!(early, 1000);
    // What the pool did not take is still the client's, for the caller to copy.
    let mut rest = vec![0; upload.len() - 1000];
    client.read_exact(&mut rest).await.unwrap();
    stream.write_all(&rest).await.unwrap();
    let echoed = finish_and_receive(&mut stream).await;
    assert_eq!(echoed.len(), upload.len());
    assert_eq!(checksum(&echoed), checksum(&upload));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_discards_early_bytes_and_the_connection_stays_usable() {
    let certs = Certs::new();
    let (mut refused_client, _application, taken) = client_with(b"never delivered").await;
    let (mut client, _second_application, second_taken) = client_with(b"hello").await;
    // Port 81 is refused once the early bytes are on their way; port 80 is echoed once the
    // second client's bytes are (so they always go with its CONNECT).
    let refuse = answer_after(15, taken, StatusCode::UNAUTHORIZED);
    let echo = answer_after(5, second_taken, StatusCode::OK);
    let server = TestServer::start(
        &certs,
        handler(move |request: InboundRequest, responder: Responder| {
            if request.authority.ends_with(":81") {
                refuse(request, responder)
            } else {
                echo(request, responder)
            }
        }),
    )
    .await;
    let pool = pool(&certs, PoolConfig::default());

    let error = pool
        .connect_with_early_data(
            server.key(),
            ConnectRequest::new("127.0.0.1:81"),
            &mut refused_client,
            64 * 1024,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(error, HboneError::Status(StatusCode::UNAUTHORIZED)),
        "{error}"
    );

    let (stream, early) = connect_early(&pool, &server, &mut client, 64 * 1024)
        .await
        .unwrap();
    assert_eq!(early, 5);
    assert_eq!(send_and_receive(stream, b"").await, b"hello");
    assert_eq!(
        pool.stats().connections_opened,
        1,
        "one connection for both"
    );
    assert!(server.log.errors().is_empty(), "{:?}", server.log.errors());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_closes_before_the_answer_is_half_closed_after_its_bytes() {
    let certs = Certs::new();
    let (mut client, application, taken) = client_with(b"short request").await;
    drop(application);
    let server = TestServer::start(&certs, answer_after(13, taken, StatusCode::OK)).await;
    let pool = pool(&certs, PoolConfig::default());

    let (mut stream, early) = connect_early(&pool, &server, &mut client, 64 * 1024)
        .await
        .unwrap();
    assert_eq!(early, 13);
    // The client's EOF is still there for the copy that follows.
    assert_eq!(client.read(&mut [0; 16]).await.unwrap(), 0);
    let echoed = finish_and_receive(&mut stream).await;
    assert_eq!(echoed, b"short request");
}

/// A client whose connection fails while the tunnel is opening.
struct Broken;

impl AsyncRead for Broken {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_read_error_before_the_answer_is_reported_as_such() {
    let certs = Certs::new();
    // The server never answers: only the client's error can end the wait.
    let server = TestServer::start(
        &certs,
        handler(|_request, responder: Responder| async move {
            std::future::pending::<()>().await;
            drop(responder);
        }),
    )
    .await;
    let pool = pool(&certs, PoolConfig::default());

    let error = timeout(
        WAIT,
        pool.connect_with_early_data(
            server.key(),
            ConnectRequest::new("127.0.0.1:80"),
            &mut Broken,
            64 * 1024,
        ),
    )
    .await
    .unwrap()
    .unwrap_err();
    match &error {
        HboneError::EarlyData { authority, source } => {
            assert_eq!(authority, "127.0.0.1:80");
            assert_eq!(source.kind(), std::io::ErrorKind::ConnectionReset);
        }
        other => panic!("unexpected error: {other}"),
    }
    assert!(error.to_string().contains("127.0.0.1:80"), "{error}");
}

/// Accepts once the client's first `bytes` arrived with the CONNECT, reads exactly those (never
/// waiting on a read), reports them, and then holds the tunnel until `go` before replying with
/// `reply` and ending its side.
fn hold_then_reply(
    bytes: usize,
    read_tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    go: watch::Receiver<bool>,
    reply: &'static [u8],
) -> TestHandler {
    handler(move |_request: InboundRequest, mut responder: Responder| {
        let read_tx = read_tx.clone();
        let mut go = go.clone();
        async move {
            wait_for_early_data(&mut responder).await;
            let mut stream = responder.accept(HeaderMap::new()).unwrap();
            let mut first = vec![0; bytes];
            stream.read_exact(&mut first).await.unwrap();
            read_tx.send(first).await.unwrap();
            go.wait_for(|go| *go).await.unwrap();
            stream.write_all(reply).await.unwrap();
            stream.shutdown().await.unwrap();
            let _ = stream.read_to_end(&mut Vec::new()).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_200_waits_for_the_first_reply_when_the_client_sent_bytes_with_the_connect() {
    let certs = Certs::new();
    let (mut client, _application, _taken) = client_with(b"GET / HTTP/1.1\r\n\r\n").await;
    let (read_tx, mut read_rx) = tokio::sync::mpsc::channel(1);
    let (go_tx, go) = watch::channel(false);
    let server =
        TestServer::start(&certs, hold_then_reply(18, read_tx, go, b"HTTP/1.1 200 OK")).await;
    let pool = pool(&certs, PoolConfig::default());

    let connect = pool.connect_with_early_data(
        server.key(),
        ConnectRequest::new("127.0.0.1:80"),
        &mut client,
        64 * 1024,
    );
    tokio::pin!(connect);
    // The handler has the request and has accepted the tunnel, but has nothing to send and is not
    // reading: the 200 is held for the reply, so the client's CONNECT stays unanswered.
    let first = tokio::select! {
        first = read_rx.recv() => first.unwrap(),
        connected = &mut connect => panic!("answered before the handler had the request: {connected:?}"),
    };
    assert_eq!(first, b"GET / HTTP/1.1\r\n\r\n");
    assert!(
        timeout(std::time::Duration::from_millis(100), &mut connect)
            .await
            .is_err(),
        "the 200 went out before the handler sent anything"
    );
    // The reply carries the 200 with it.
    go_tx.send(true).unwrap();
    let (mut stream, early) = timeout(WAIT, connect).await.unwrap().unwrap();
    assert_eq!(early, 18);
    let mut reply = Vec::new();
    timeout(WAIT, stream.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, b"HTTP/1.1 200 OK");
    stream.shutdown().await.unwrap();
    assert!(server.log.errors().is_empty(), "{:?}", server.log.errors());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waiting_for_the_200_after_its_first_bytes_gets_it_when_the_server_reads_on() {
    // The client's first 1000 bytes go with the CONNECT (its limit); the rest only after the 200.
    // The handler replies only once it has read everything, so the 200 has to go without a reply.
    let certs = Certs::new();
    let upload = pseudo_random_bytes(11, 5000);
    let (mut client, _application, _taken) = client_with(&upload).await;
    let server = TestServer::start(
        &certs,
        handler(
            |_request: InboundRequest, mut responder: Responder| async move {
                wait_for_early_data(&mut responder).await;
                let mut stream = responder.accept(HeaderMap::new()).unwrap();
                let mut all = vec![0; 5000];
                stream.read_exact(&mut all).await.unwrap();
                stream
                    .write_all(&checksum(&all).to_be_bytes())
                    .await
                    .unwrap();
                stream.shutdown().await.unwrap();
            },
        ),
    )
    .await;
    let pool = pool(&certs, PoolConfig::default());

    let (mut stream, early) = connect_early(&pool, &server, &mut client, 1000)
        .await
        .unwrap();
    assert_eq!(early, 1000);
    let mut rest = vec![0; 4000];
    client.read_exact(&mut rest).await.unwrap();
    stream.write_all(&rest).await.unwrap();
    let mut sum = Vec::new();
    timeout(WAIT, stream.read_to_end(&mut sum))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sum, checksum(&upload).to_be_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_ended_or_dropped_before_any_reply_is_still_answered_200() {
    let certs = Certs::new();
    for drop_it in [false, true] {
        let (mut client, _application, _taken) = client_with(b"ping").await;
        let server = TestServer::start(
            &certs,
            handler(
                move |_request: InboundRequest, mut responder: Responder| async move {
                    assert_eq!(wait_for_early_data(&mut responder).await, b"ping"[..]);
                    let mut stream = responder.accept(HeaderMap::new()).unwrap();
                    let mut first = [0; 4];
                    stream.read_exact(&mut first).await.unwrap();
                    if !drop_it {
                        stream.shutdown().await.unwrap();
                    }
                },
            ),
        )
        .await;
        let pool = pool(&certs, PoolConfig::default());

        let (mut stream, early) = connect_early(&pool, &server, &mut client, 64 * 1024)
            .await
            .unwrap();
        assert_eq!(early, 4);
        // END_STREAM, or the reset with CANCEL that follows a drop, reads as EOF.
        let mut rest = Vec::new();
        timeout(WAIT, stream.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert!(rest.is_empty(), "drop {drop_it}: {rest:?}");
    }
}
