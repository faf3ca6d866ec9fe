//! One tunnel end to end over real TLS and HTTP/2 on loopback: bytes, half-close, status codes,
//! identities, resets and graceful shutdown.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use ambit_hbone::server::{InboundRequest, Responder};
use ambit_hbone::{ConnectRequest, DialError, HboneError, PoolConfig};
use common::*;
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// What a handler saw, sent back to the test body.
#[derive(Debug)]
struct Seen {
    authority: String,
    peer: ambit_identity::Identity,
    baggage: Option<HeaderValue>,
    local_addr: SocketAddr,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_sees_client_identity_and_authority_and_client_sees_server() {
    let certs = Certs::new();
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let server = TestServer::start(
        &certs,
        handler(move |request: InboundRequest, responder: Responder| {
            let seen_tx = seen_tx.clone();
            async move {
                seen_tx
                    .send(Seen {
                        authority: request.authority.clone(),
                        peer: request.peer.identity().clone(),
                        baggage: request.headers.get("baggage").cloned(),
                        local_addr: request.local_addr,
                    })
                    .unwrap();
                let mut headers = HeaderMap::new();
                headers.insert(
                    "baggage",
                    HeaderValue::from_static("k8s.namespace.name=server-ns"),
                );
                let stream = responder.accept(headers).unwrap();
                let (mut read, mut write) = tokio::io::split(stream);
                tokio::io::copy(&mut read, &mut write).await.unwrap();
                write.shutdown().await.unwrap();
            }
        }),
    )
    .await;
    let pool = pool(&certs, PoolConfig::default());
    let mut request = ConnectRequest::new("10.1.2.3:8080");
    request.headers.insert(
        "baggage",
        HeaderValue::from_static("k8s.namespace.name=client-ns"),
    );

    let stream = pool.connect(server.key(), request).await.unwrap();
    assert_eq!(stream.peer().identity(), &server_identity());
    assert_eq!(
        stream.response_headers().get("baggage").unwrap(),
        "k8s.namespace.name=server-ns"
    );
    assert_eq!(send_and_receive(stream, b"ping").await, b"ping");

    let seen = timeout(WAIT, seen_rx.recv()).await.unwrap().unwrap();
    assert_eq!(seen.authority, "10.1.2.3:8080");
    assert_eq!(seen.peer, client_identity());
    assert_eq!(seen.baggage.unwrap(), "k8s.namespace.name=client-ns");
    assert_eq!(seen.local_addr, server.addr);
    assert!(server.log.errors().is_empty(), "{:?}", server.log.errors());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_half_close_then_server_replies_after_eof() {
    let certs = Certs::new();
    let server = TestServer::start(
        &certs,
        handler(|_request, responder: Responder| async move {
            let mut stream = responder.accept(HeaderMap::new()).unwrap();
            let mut request = Vec::new();
            stream.read_to_end(&mut request).await.unwrap();
            let reply = format!("received {} bytes", request.len());
            stream.write_all(reply.as_bytes()).await.unwrap();
            stream.shutdown().await.unwrap();
        }),
    )
    .await;
    let pool = pool(&certs, PoolConfig::default());
    let mut stream = pool
        .connect(server.key(), ConnectRequest::new("127.0.0.1:80"))
        .await
        .unwrap();

    stream
        .write_all(&pseudo_random_bytes(1, 200_000))
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let write_after_shutdown = stream.write_all(b"late").await.unwrap_err();
    assert_eq!(write_after_shutdown.kind(), std::io::ErrorKind::BrokenPipe);
    let mut reply = String::new();
    timeout(WAIT, stream.read_to_string(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, "received 200000 bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_half_close_then_client_keeps_sending() {
    let certs = Certs::new();
    let (received_tx, mut received_rx) = mpsc::unbounded_channel();
    let server = TestServer::start(
        &certs,
        handler(move |_request, responder: Responder| {
            let received_tx = received_tx.clone();
            async move {
                let mut stream = responder.accept(HeaderMap::new()).unwrap();
                stream.write_all(b"greeting from the server").await.unwrap();
                stream.shutdown().await.unwrap();
                let mut received = Vec::new();
                stream.read_to_end(&mut received).await.unwrap();
                received_tx.send(received).unwrap();
            }
        }),
    )
    .await;
    let pool = pool(&certs, PoolConfig::default());
    let mut stream = pool
        .connect(server.key(), ConnectRequest::new("127.0.0.1:80"))
        .await
        .unwrap();

    let mut greeting = Vec::new();
    timeout(WAIT, stream.read_to_end(&mut greeting))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(greeting, b"greeting from the server");
    let upload = pseudo_random_bytes(2, 300_000);
    stream.write_all(&upload).await.unwrap();
    stream.shutdown().await.unwrap();
    let received = timeout(WAIT, received_rx.recv()).await.unwrap().unwrap();
    assert_eq!(checksum(&received), checksum(&upload));
    assert_eq!(received.len(), upload.len());
}

/// Forwards the tunnel to the `:authority` over loopback TCP, as ztunnel's inbound does: 503 if
/// the target cannot be reached, 401 for port 81 ("denied by policy").
fn forwarding_handler() -> TestHandler {
    handler(|request: InboundRequest, responder: Responder| async move {
        let Ok(target) = request.authority.parse::<SocketAddr>() else {
            return responder.refuse(StatusCode::BAD_REQUEST);
        };
        if target.port() == 81 {
            return responder.refuse(StatusCode::UNAUTHORIZED);
        }
        let Ok(upstream) = TcpStream::connect(target).await else {
            return responder.refuse(StatusCode::SERVICE_UNAVAILABLE);
        };
        let stream = responder.accept(HeaderMap::new()).unwrap();
        let counters = ambit_hbone::copy::ByteCounters::new();
        let _ = ambit_hbone::copy::copy_bidirectional(stream, upstream, &counters).await;
    })
}

/// A plain TCP echo server on loopback, the "application" behind the HBONE server.
async fn tcp_echo_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = socket.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_target_gives_503_and_the_connection_stays_usable() {
    let certs = Certs::new();
    let server = TestServer::start(&certs, forwarding_handler()).await;
    let pool = pool(&certs, PoolConfig::default());
    let closed = closed_port().await;

    let error = pool
        .connect(server.key(), ConnectRequest::new(closed.to_string()))
        .await
        .unwrap_err();
    assert!(
        matches!(error, HboneError::Status(status) if status == StatusCode::SERVICE_UNAVAILABLE)
    );
    let message = error.to_string();
    assert!(message.contains("503 Service Unavailable"), "{message}");
    assert!(
        message.contains("nothing listening on the target port"),
        "{message}"
    );

    let app = tcp_echo_app().await;
    let stream = pool
        .connect(server.key(), ConnectRequest::new(app.to_string()))
        .await
        .unwrap();
    let payload = pseudo_random_bytes(3, 100_000);
    assert_eq!(send_and_receive(stream, &payload).await, payload);
    assert_eq!(
        pool.stats().connections_opened,
        1,
        "the refused stream did not cost the connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_denial_gives_401_and_the_connection_stays_usable() {
    let certs = Certs::new();
    let server = TestServer::start(&certs, forwarding_handler()).await;
    let pool = pool(&certs, PoolConfig::default());

    let error = pool
        .connect(server.key(), ConnectRequest::new("127.0.0.1:81"))
        .await
        .unwrap_err();
    assert!(matches!(error, HboneError::Status(status) if status == StatusCode::UNAUTHORIZED));
    let message = error.to_string();
    assert!(message.contains("401 Unauthorized"), "{message}");
    assert!(message.contains("authorization policy"), "{message}");

    let app = tcp_echo_app().await;
    let stream = pool
        .connect(server.key(), ConnectRequest::new(app.to_string()))
        .await
        .unwrap();
    assert_eq!(
        send_and_receive(stream, b"after the denial").await,
        b"after the denial"
    );
    assert_eq!(pool.stats().connections_opened, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_responder_sends_503() {
    let certs = Certs::new();
    let server = TestServer::start(
        &certs,
        handler(|_request, responder: Responder| async move { drop(responder) }),
    )
    .await;
    let pool = pool(&certs, PoolConfig::default());
    let error = pool
        .connect(server.key(), ConnectRequest::new("127.0.0.1:80"))
        .await
        .unwrap_err();
    assert!(
        matches!(error, HboneError::Status(status) if status == StatusCode::SERVICE_UNAVAILABLE)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_reset_by_the_server_with_cancel_reads_as_eof() {
    let certs = Certs::new();
    let server = TestServer::start(
        &certs,
        handler(|_request, responder: Responder| async move {
            let mut stream = responder.accept(HeaderMap::new()).unwrap();
            stream.write_all(b"partial").await.unwrap();
            let mut ack = [0u8; 3];
            stream.read_exact(&mut ack).await.unwrap();
            // Dropped without shutdown: h2 resets the stream with CANCEL.
        }),
    )
    .await;
    let pool = pool(&certs, PoolConfig::default());
    let mut stream = pool
        .connect(server.key(), ConnectRequest::new("127.0.0.1:80"))
        .await
        .unwrap();
    let mut partial = [0u8; 7];
    timeout(WAIT, stream.read_exact(&mut partial))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&partial, b"partial");
    stream.write_all(b"ack").await.unwrap();
    let mut rest = Vec::new();
    let read = timeout(WAIT, stream.read_to_end(&mut rest)).await.unwrap();
    assert_eq!(read.unwrap(), 0, "CANCEL reads as a clean EOF");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_connect_request_gets_400() {
    let certs = Certs::new();
    let server = TestServer::start(&certs, echo_handler()).await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let client_tls =
        ambit_identity::tls::client_config(&certs.client, &[server_identity()]).unwrap();
    let (tls_stream, _peer) = ambit_identity::tls::connect(client_tls, tcp).await.unwrap();
    let (mut send_request, connection) = h2::client::handshake(tls_stream).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::get("https://127.0.0.1/").body(()).unwrap();
    let (response, _body) = send_request.send_request(request, true).unwrap();
    let response = timeout(WAIT, response).await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialing_a_closed_port_explains_the_likely_cause() {
    let certs = Certs::new();
    let pool = pool(&certs, PoolConfig::default());
    let error = pool
        .connect(
            pool_key(closed_port().await),
            ConnectRequest::new("10.0.0.1:80"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            HboneError::Dial {
                source: DialError::Connect(_),
                ..
            }
        ),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("TCP connect failed"), "{message}");
    assert!(
        message.contains("NetworkPolicy blocking port 15008"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_with_an_unexpected_identity_is_rejected() {
    let certs = Certs::new();
    let server = TestServer::start(&certs, echo_handler()).await;
    let pool = pool(&certs, PoolConfig::default());
    let mut key = server.key();
    key.dst_ids = vec![ambit_identity::Identity::new(TRUST_DOMAIN, "other", "impostor").unwrap()];
    let error = pool
        .connect(key, ConnectRequest::new("10.0.0.1:80"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            HboneError::Dial {
                source: DialError::Tls(_),
                ..
            }
        ),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("sa/server-sa"), "{message}");
    assert!(
        message.contains("impostor"),
        "names the expected identity: {message}"
    );
    assert!(
        error.to_string().contains("TLS handshake failed"),
        "{error}"
    );
    assert_eq!(pool.stats().connections, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_open_streams_finish_and_the_pool_recovers() {
    let certs = Certs::new();
    let server = TestServer::start(&certs, echo_handler()).await;
    let pool = pool(&certs, PoolConfig::default());
    let mut stream = pool
        .connect(server.key(), ConnectRequest::new("127.0.0.1:80"))
        .await
        .unwrap();
    stream.write_all(b"before").await.unwrap();

    server.shutdown_connections();
    // The open stream keeps working through the drain...
    let mut before = [0u8; 6];
    timeout(WAIT, stream.read_exact(&mut before))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&before, b"before");
    assert_eq!(send_and_receive(stream, b" and after").await, b" and after");
    // ...then the server connection ends cleanly and the pool lets go of it.
    server.log.wait_closed(1).await;
    timeout(WAIT, async {
        while pool.stats().connections > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    assert!(server.log.errors().is_empty(), "{:?}", server.log.errors());

    let stream = pool
        .connect(server.key(), ConnectRequest::new("127.0.0.1:80"))
        .await
        .unwrap();
    assert_eq!(
        send_and_receive(stream, b"new connection").await,
        b"new connection"
    );
    assert_eq!(pool.stats().connections_opened, 2);
}

/// The zero-copy splice at both ends, as ztunnel uses it: client socket → tunnel on one side,
/// tunnel → application socket on the other. A bulk upload large enough to grow the buffers to
/// their largest size arrives intact, the client's FIN reaches the application as EOF, the reply
/// written after it comes back, and each side's counters are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_with_tunnel_splices_both_ends_with_half_close_and_exact_counts() {
    const UPLOAD: usize = 12 * 1024 * 1024;
    // The application: reads to EOF, then answers with what it got and closes.
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut socket, _) = app.accept().await.unwrap();
        let mut received = Vec::new();
        socket.read_to_end(&mut received).await.unwrap();
        let reply = format!("{} bytes, checksum {}", received.len(), checksum(&received));
        socket.write_all(reply.as_bytes()).await.unwrap();
        socket.shutdown().await.unwrap();
    });
    let (server_counts_tx, mut server_counts_rx) = mpsc::unbounded_channel();
    let certs = Certs::new();
    let server = TestServer::start(
        &certs,
        handler(move |request: InboundRequest, responder: Responder| {
            let server_counts_tx = server_counts_tx.clone();
            async move {
                let target: SocketAddr = request.authority.parse().unwrap();
                let upstream = TcpStream::connect(target).await.unwrap();
                let tunnel = responder.accept(HeaderMap::new()).unwrap();
                let counters = ambit_hbone::copy::ByteCounters::new();
                ambit_hbone::copy::copy_with_tunnel(upstream, tunnel, &counters)
                    .await
                    .unwrap();
                server_counts_tx
                    .send((counters.a_to_b(), counters.b_to_a()))
                    .unwrap();
            }
        }),
    )
    .await;
    let pool = pool(&certs, PoolConfig::default());
    let tunnel = pool
        .connect(server.key(), ConnectRequest::new(app_addr.to_string()))
        .await
        .unwrap();
    // The client's captured connection: `client` is the application's end, `captured` ours.
    let capture = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = TcpStream::connect(capture.local_addr().unwrap())
        .await
        .unwrap();
    let (captured, _) = capture.accept().await.unwrap();
    let client_side = tokio::spawn(async move {
        let counters = ambit_hbone::copy::ByteCounters::new();
        let result = ambit_hbone::copy::copy_with_tunnel(captured, tunnel, &counters).await;
        (result, counters.a_to_b(), counters.b_to_a())
    });

    let upload = pseudo_random_bytes(7, UPLOAD);
    let expected = format!("{UPLOAD} bytes, checksum {}", checksum(&upload));
    let (mut read, mut write) = client.split();
    let send = async {
        write.write_all(&upload).await.unwrap();
        write.shutdown().await.unwrap();
    };
    let mut reply = String::new();
    let receive = read.read_to_string(&mut reply);
    let ((), received) = timeout(WAIT, async { tokio::join!(send, receive) })
        .await
        .unwrap();
    received.unwrap();
    assert_eq!(reply, expected);

    let (result, sent, returned) = timeout(WAIT, client_side).await.unwrap().unwrap();
    result.unwrap();
    assert_eq!((sent, returned), (UPLOAD as u64, expected.len() as u64));
    let (app_to_tunnel, tunnel_to_app) = timeout(WAIT, server_counts_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (app_to_tunnel, tunnel_to_app),
        (expected.len() as u64, UPLOAD as u64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vectored_writes_arrive_whole_and_in_order() {
    let certs = Certs::new();
    let server = TestServer::start(&certs, echo_handler()).await;
    let pool = pool(&certs, PoolConfig::default());
    let mut stream = pool
        .connect(server.key(), ConnectRequest::new("127.0.0.1:80"))
        .await
        .unwrap();
    assert!(tokio::io::AsyncWrite::is_write_vectored(&stream));

    // A head and a body as separate slices (how hyper writes a message), then more slices than
    // one write takes at a time; a short write is continued from where it stopped.
    let body = pseudo_random_bytes(3, 100_000);
    let parts: Vec<&[u8]> = vec![b"HTTP/1.1 200 OK\r\n\r\n", &body, b"", b"tail"];
    let mut expected = Vec::new();
    for part in &parts {
        expected.extend_from_slice(part);
    }
    let mut offset = 0;
    while offset < expected.len() {
        // The slices still to send, starting inside the one the last write stopped in.
        let mut slices = Vec::new();
        let mut skip = offset;
        for part in &parts {
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            slices.push(std::io::IoSlice::new(&part[skip..]));
            skip = 0;
        }
        let written = stream.write_vectored(&slices).await.unwrap();
        assert!(written > 0);
        offset += written;
    }
    let echoed = finish_and_receive(&mut stream).await;
    assert_eq!(echoed.len(), expected.len());
    assert_eq!(checksum(&echoed), checksum(&expected));
}
