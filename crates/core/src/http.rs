//! A small HTTP/1.1 server for admin, metrics and readiness endpoints.
//!
//! Request bodies are collected up to a limit so handlers see a whole request; the server stops
//! accepting when its drain starts and lets open requests finish.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;

use crate::drain::DrainWatcher;

/// Largest request body a handler is given.
pub const MAX_BODY: usize = 64 * 1024;

/// A boxed response future.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>;

/// Routes one request to a response.
#[derive(Clone)]
pub struct Handler(Arc<dyn Fn(Request<Bytes>) -> ResponseFuture + Send + Sync>);

impl fmt::Debug for Handler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Handler")
    }
}

impl Handler {
    /// Wraps an async function of the request.
    pub fn new<F, Fut>(f: F) -> Self
    where
        F: Fn(Request<Bytes>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        Handler(Arc::new(move |req| Box::pin(f(req))))
    }
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A JSON response.
pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = text(status, body);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

async fn collect(req: Request<Incoming>) -> Result<Request<Bytes>, Response<Full<Bytes>>> {
    let (parts, body) = req.into_parts();
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(Request::from_parts(parts, collected.to_bytes())),
        Err(e) => Err(text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body refused: {e}\n"),
        )),
    }
}

/// Serves `handler` on `listener` until `drain` starts; open requests then finish.
pub async fn serve(listener: TcpListener, handler: Handler, drain: DrainWatcher) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = drain.signaled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                debug!(error = %e, "http accept failed");
                continue;
            }
        };
        tokio::spawn(serve_one(stream, peer, handler.clone(), drain.clone()));
    }
}

async fn serve_one(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    handler: Handler,
    drain: DrainWatcher,
) {
    let service = service_fn(move |req: Request<Incoming>| {
        let handler = handler.clone();
        async move {
            Ok::<_, Infallible>(match collect(req).await {
                Ok(req) => (handler.0)(req).await,
                Err(refusal) => refusal,
            })
        }
    });
    let conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                debug!(%peer, error = %e, "http connection ended with an error");
            }
        }
        _ = drain.signaled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = drain.forced() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn request(addr: SocketAddr, raw: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(raw.as_bytes()).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        out
    }

    #[tokio::test]
    async fn routes_requests_and_stops_on_drain() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler = Handler::new(|req: Request<Bytes>| async move {
            match (req.method().as_str(), req.uri().path()) {
                ("GET", "/healthz/ready") => text(StatusCode::OK, "ready\n"),
                ("POST", "/logging") => text(
                    StatusCode::OK,
                    format!("level={}\n", req.uri().query().unwrap_or("")),
                ),
                _ => text(StatusCode::NOT_FOUND, "no such endpoint\n"),
            }
        });
        let (trigger, watcher) = crate::drain::new();
        let server = tokio::spawn(serve(listener, handler, watcher));

        let ok = request(
            addr,
            "GET /healthz/ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.ends_with("ready\n"), "{ok}");
        let post = request(addr, "POST /logging?level=debug HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
        assert!(post.ends_with("level=level=debug\n"), "{post}");
        let missing = request(
            addr,
            "GET /nope HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");

        let outcome = trigger
            .start_drain_and_wait(crate::drain::DrainMode::Graceful, Duration::from_secs(5))
            .await;
        assert!(outcome.graceful);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "listener closed after drain"
        );
    }
}
