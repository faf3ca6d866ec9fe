//! The echo server's HTTP answers and httpbin-style controls, over HTTP/1.1 and h2c, against the
//! real binary on loopback.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use support::Echo;
use tokio::net::TcpStream;

#[derive(Clone, Copy, PartialEq)]
enum Proto {
    H1,
    H2c,
}

struct Answer {
    status: u16,
    body: Value,
    text: String,
    headers: http::HeaderMap,
}

async fn request(
    addr: SocketAddr,
    proto: Proto,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let mut builder = http::Request::builder().method(method);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let response = match proto {
        Proto::H1 => {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("HTTP/1.1 handshake");
            tokio::spawn(conn);
            let req = builder
                .uri(path)
                .header("host", "echo.test:8080")
                .body(Empty::<Bytes>::new())
                .unwrap();
            sender.send_request(req).await.expect("HTTP/1.1 answer")
        }
        Proto::H2c => {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .expect("h2c handshake");
            tokio::spawn(conn);
            let req = builder
                .uri(format!("http://echo.test:8080{path}"))
                .body(Empty::<Bytes>::new())
                .unwrap();
            sender.send_request(req).await.expect("h2c answer")
        }
    };
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let text = String::from_utf8_lossy(&bytes).to_string();
    Answer {
        status,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        text,
        headers,
    }
}

async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Answer {
    request(addr, Proto::H1, "GET", path, headers).await
}

#[tokio::test]
async fn the_body_names_the_server_and_what_arrived_over_both_protocols() {
    let echo = Echo::start(&[]);
    for (proto, name) in [(Proto::H1, "HTTP/1.1"), (Proto::H2c, "HTTP/2")] {
        let a = request(
            echo.addr,
            proto,
            "POST",
            "/some/path?a=1&b=two",
            &[("x-route-added", "yes")],
        )
        .await;
        assert_eq!(a.status, 200, "{name}: {}", a.text);
        let b = &a.body;
        assert_eq!(b["pod"], "echo-test", "{name}");
        assert_eq!(b["namespace"], "testns");
        assert_eq!(b["node"], "node-test");
        assert_eq!(b["version"], "v7");
        assert_eq!(b["method"], "POST");
        assert_eq!(b["path"], "/some/path?a=1&b=two");
        assert_eq!(b["host"], "echo.test:8080");
        assert_eq!(b["protocol"], name);
        assert_eq!(b["status"], 200);
        assert_eq!(b["headers"]["x-route-added"], "yes", "{name}: {b}");
        assert!(b["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{b}");
        assert_eq!(a.headers["content-type"], "application/json");
    }
}

#[tokio::test]
async fn status_is_chosen_by_path_header_or_the_pods_environment() {
    let echo = Echo::start(&[]);
    assert_eq!(get(echo.addr, "/status/418", &[]).await.status, 418);
    assert_eq!(
        request(echo.addr, Proto::H2c, "GET", "/status/503", &[])
            .await
            .status,
        503
    );
    let a = get(echo.addr, "/", &[("x-echo-status", "404")]).await;
    assert_eq!((a.status, a.body["status"].clone()), (404, 404.into()));
    let no_content = get(echo.addr, "/status/204", &[]).await;
    assert_eq!((no_content.status, no_content.text.as_str()), (204, ""));
    let bad = get(echo.addr, "/status/99", &[]).await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.text
            .contains("path /status/<code>: \"99\" is not an HTTP status between 200 and 599"),
        "{}",
        bad.text
    );

    let teapot = Echo::start(&[("ECHO_STATUS", "418")]);
    assert_eq!(get(teapot.addr, "/", &[]).await.status, 418);
    assert_eq!(get(teapot.addr, "/anything", &[]).await.status, 418);
    assert_eq!(get(teapot.addr, "/status/201", &[]).await.status, 201);
}

#[tokio::test]
async fn a_delay_holds_the_answer_back() {
    let echo = Echo::start(&[]);
    let short = Duration::from_millis(50);
    let long = Duration::from_secs(20);
    // A 50 ms client gives up on an answer held back 1.5 s; with time to wait it gets it.
    for (path, headers) in [
        ("/delay/1500", vec![]),
        ("/?delay=1500", vec![]),
        ("/", vec![("x-echo-delay-ms", "1500")]),
    ] {
        let early = tokio::time::timeout(short, get(echo.addr, path, &headers)).await;
        assert!(early.is_err(), "{path} {headers:?} answered at once");
        let late = tokio::time::timeout(long, get(echo.addr, path, &headers))
            .await
            .expect("the delayed answer arrives");
        assert_eq!(late.status, 200, "{path}");
    }
    // Without a delay the same client is answered.
    assert!(
        tokio::time::timeout(Duration::from_secs(10), get(echo.addr, "/", &[]))
            .await
            .is_ok()
    );

    let slow = Echo::start(&[("ECHO_DELAY_MS", "1500")]);
    assert!(
        tokio::time::timeout(short, get(slow.addr, "/", &[]))
            .await
            .is_err(),
        "ECHO_DELAY_MS is ignored"
    );
    // A request may ask for no delay at all.
    let prompt = tokio::time::timeout(long, get(slow.addr, "/", &[("x-echo-delay-ms", "0")]))
        .await
        .expect("answered");
    assert_eq!(prompt.status, 200);
}

#[tokio::test]
async fn a_fail_fraction_fails_that_share_of_requests() {
    let always = Echo::start(&[("ECHO_FAIL_FRACTION", "1")]);
    for _ in 0..5 {
        assert_eq!(get(always.addr, "/", &[]).await.status, 503);
    }
    let custom = Echo::start(&[("ECHO_FAIL_FRACTION", "1.0"), ("ECHO_FAIL_STATUS", "500")]);
    assert_eq!(get(custom.addr, "/", &[]).await.status, 500);

    // Half of 200 requests: every status appears (the chance it does not is 2^-199).
    let half = Echo::start(&[("ECHO_FAIL_FRACTION", "0.5")]);
    let mut ok = 0;
    let mut failed = 0;
    for _ in 0..200 {
        match get(half.addr, "/", &[]).await.status {
            200 => ok += 1,
            503 => failed += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(ok > 0 && failed > 0, "ok {ok}, failed {failed}");

    // Per request, on a healthy pod.
    let healthy = Echo::start(&[]);
    let a = get(
        healthy.addr,
        "/",
        &[("x-echo-fail-fraction", "1"), ("x-echo-fail-status", "502")],
    )
    .await;
    assert_eq!(a.status, 502);
}

#[test]
fn bad_environment_values_stop_the_server_with_their_names() {
    for (name, value, message) in [
        (
            "ECHO_FAIL_FRACTION",
            "2",
            "is not a fraction between 0.0 and 1.0",
        ),
        (
            "ECHO_STATUS",
            "700",
            "is not an HTTP status between 200 and 599",
        ),
        ("ECHO_DELAY_MS", "-1", "is not a delay in milliseconds"),
        (
            "ECHO_FAIL_STATUS",
            "x",
            "is not an HTTP status between 200 and 599",
        ),
    ] {
        let output = Echo::refuse(&[(name, value)]);
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!("{name}: \"{value}\" {message}")),
            "{name}={value}: {stderr}"
        );
    }
}

/// gRPC framing by hand: a 5-byte prefix (not compressed, length) and the message.
fn grpc_frame(message: &[u8]) -> Bytes {
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    Bytes::from(frame)
}

#[tokio::test]
async fn an_asked_grpc_status_is_a_trailers_only_answer() {
    let echo = Echo::start(&[]);
    let stream = TcpStream::connect(echo.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    // EchoRequest{message: "hi"}: field 1, length-delimited.
    let call = |status: Option<&str>| {
        let mut req = http::Request::builder()
            .method("POST")
            .uri(format!("http://{}/ambit.echo.v1.Echo/Echo", echo.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(status) = status {
            req = req.header("x-echo-grpc-status", status);
        }
        req.body(Full::new(grpc_frame(b"\x0a\x02hi"))).unwrap()
    };
    let response = sender.send_request(call(Some("7"))).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["grpc-status"], "7");
    let collected = response.into_body().collect().await.unwrap();
    assert!(collected.trailers().is_none(), "status came in trailers");
    assert!(collected.to_bytes().is_empty());

    let response = sender.send_request(call(None)).await.unwrap();
    assert!(response.headers().get("grpc-status").is_none());
    let collected = response.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
    let bytes = collected.to_bytes();
    // The answer starts with field 1 = "hi" after the 5-byte prefix.
    assert_eq!(&bytes[5..9], b"\x0a\x02hi");
}

#[tokio::test]
async fn a_failing_pod_answers_grpc_calls_unavailable() {
    let echo = Echo::start(&[("ECHO_FAIL_FRACTION", "1")]);
    let stream = TcpStream::connect(echo.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}/ambit.echo.v1.Echo/Echo", echo.addr))
        .header("content-type", "application/grpc+proto")
        .body(Full::new(grpc_frame(b"")))
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    // UNAVAILABLE.
    assert_eq!(response.headers()["grpc-status"], "14");
}
