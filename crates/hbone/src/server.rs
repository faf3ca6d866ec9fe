//! The server side: serving CONNECT streams on one mutually authenticated connection, handing each
//! to the caller's handler with a [`Responder`] that decides the status.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use ambit_identity::tls::VerifiedPeer;
use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderMap, Method, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use crate::config::H2Config;
use crate::error::HboneError;
use crate::keepalive;
use crate::stream::HboneStream;

/// One CONNECT request as the handler sees it.
#[derive(Debug)]
pub struct InboundRequest {
    /// The `:authority`: the tunnel's target (`ip:port` or `host:port`), not yet validated.
    pub authority: String,
    /// The request headers (`baggage`, `forwarded`, `traceparent`, ...).
    pub headers: HeaderMap,
    /// The client identity proven by the TLS handshake.
    pub peer: VerifiedPeer,
    /// Our end of the TCP connection (the address the client dialed).
    pub local_addr: SocketAddr,
    /// The client's end of the TCP connection.
    pub remote_addr: SocketAddr,
}

/// The answer to one CONNECT. `accept` sends 200 and yields the tunnel, `refuse` sends an error
/// status; dropping it unanswered sends 503, so a handler that fails early still answers.
pub struct Responder {
    pending: Option<PendingResponse>,
    peer: VerifiedPeer,
    authority: String,
    answer_hold: Duration,
}

struct PendingResponse {
    respond: SendResponse<Bytes>,
    body: RecvStream,
    /// The client's first bytes, taken by [`Responder::early_data`] before the answer.
    first: Bytes,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("authority", &self.authority)
            .field("peer", &self.peer)
            .field("answered", &self.pending.is_none())
            .finish()
    }
}

impl Responder {
    /// Accepts the tunnel with a 200 carrying `headers` (for example the destination's
    /// `baggage`) and returns it.
    ///
    /// The 200 goes with the first DATA or END_STREAM the tunnel sends, or as soon as a read of the
    /// tunnel finds nothing: at once if the client has sent nothing yet (it may be waiting for the
    /// 200), within [`H2Config::answer_hold`] if it sent bytes with the CONNECT. Dropping the
    /// tunnel sends it too. A handler therefore reads or writes the tunnel right after accepting
    /// it, as a byte copy does.
    pub fn accept(mut self, headers: HeaderMap) -> Result<HboneStream, HboneError> {
        let PendingResponse {
            mut respond,
            body,
            first,
        } = self.take_pending();
        if !self.answer_hold.is_zero() {
            let mut stream = HboneStream::owing_answer(
                respond,
                body,
                headers,
                self.peer.clone(),
                self.answer_hold,
            );
            stream.put_back(first);
            return Ok(stream);
        }
        let mut response = Response::new(());
        *response.headers_mut() = headers.clone();
        let send =
            respond
                .send_response(response, false)
                .map_err(|source| HboneError::Respond {
                    authority: self.authority.clone(),
                    source,
                })?;
        let mut stream = HboneStream::new(send, body, headers, self.peer.clone(), None);
        stream.put_back(first);
        Ok(stream)
    }

    /// Waits, without answering, for the first bytes the client sent with its CONNECT and returns
    /// them; they stay in the tunnel for the handler to read after [`Self::accept`]. `None` when
    /// the client ended its side (or reset the stream) without sending any. A client that waits
    /// for the 200 before it sends makes this wait until it gives up: call it only where the
    /// client sends first (a handler that wants to see the request before deciding).
    pub async fn early_data(&mut self) -> Option<Bytes> {
        let pending = self.pending.as_mut()?;
        while pending.first.is_empty() {
            match pending.body.data().await {
                Some(Ok(chunk)) => pending.first = chunk,
                Some(Err(_)) | None => return None,
            }
        }
        Some(pending.first.clone())
    }

    /// Answers with `status` (400, 401, 503, ...) and ends the stream.
    pub fn refuse(mut self, status: StatusCode) {
        let pending = self.take_pending();
        answer_and_close(pending.respond, status, &self.authority);
    }

    fn take_pending(&mut self) -> PendingResponse {
        self.pending
            .take()
            .expect("a Responder is answered once: accept and refuse consume it, Drop runs last")
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(pending) = self.pending.take() {
            answer_and_close(
                pending.respond,
                StatusCode::SERVICE_UNAVAILABLE,
                &self.authority,
            );
        }
    }
}

fn answer_and_close(mut respond: SendResponse<Bytes>, status: StatusCode, authority: &str) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    if let Err(error) = respond.send_response(response, true) {
        debug!(%authority, %status, %error, "could not answer CONNECT; client already gone");
    }
}

/// Serves one TLS connection: each CONNECT stream gets its own task running
/// `handler(request, responder)`; other methods get 400. When `shutdown` resolves the server sends
/// GOAWAY, lets open streams finish, and returns once they have.
pub async fn serve_connection<IO, H, F>(
    io: IO,
    peer: VerifiedPeer,
    local_addr: SocketAddr,
    remote_addr: SocketAddr,
    config: &H2Config,
    handler: H,
    shutdown: impl Future<Output = ()>,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(InboundRequest, Responder) -> F + Clone + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let mut connection = config
        .server_builder()
        .handshake::<IO, Bytes>(io)
        .await
        .map_err(|source| HboneError::Handshake {
            peer: remote_addr,
            source,
        })?;
    let keepalive = keepalive::ping_until_unanswered(
        connection.ping_pong(),
        config.keepalive_interval,
        config.keepalive_timeout,
    );
    tokio::pin!(keepalive, shutdown);
    let mut draining = false;
    loop {
        tokio::select! {
            accepted = connection.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    let addresses = (local_addr, remote_addr);
                    dispatch(request, respond, &peer, addresses, config.answer_hold, &handler);
                }
                Some(Err(source)) if is_peer_gone(&source) && !connection.has_streams() => {
                    debug!(%remote_addr, error = %source, "HBONE client closed an idle connection");
                    return Ok(());
                }
                Some(Err(source)) => return Err(HboneError::Connection { peer: remote_addr, source }),
                None => return Ok(()),
            },
            () = &mut shutdown, if !draining => {
                draining = true;
                connection.graceful_shutdown();
            }
            () = &mut keepalive => {
                return Err(HboneError::KeepaliveTimeout {
                    peer: remote_addr,
                    timeout: config.keepalive_timeout,
                });
            }
        }
    }
}

/// The client went away at the transport level: normal when it closes an idle connection, since
/// its GOAWAY and our last frames can cross.
fn is_peer_gone(error: &h2::Error) -> bool {
    use std::io::ErrorKind;
    error.get_io().is_some_and(|io| {
        matches!(
            io.kind(),
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof
        )
    })
}

/// Validates the request line and spawns the handler for a CONNECT.
fn dispatch<H, F>(
    request: http::Request<RecvStream>,
    respond: SendResponse<Bytes>,
    peer: &VerifiedPeer,
    (local_addr, remote_addr): (SocketAddr, SocketAddr),
    answer_hold: Duration,
    handler: &H,
) where
    H: Fn(InboundRequest, Responder) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let authority = request.uri().authority().map(|a| a.as_str().to_owned());
    let authority = match (request.method(), authority) {
        (&Method::CONNECT, Some(authority)) => authority,
        (method, _) => {
            debug!(%method, uri = %request.uri(), %remote_addr, "rejecting non-CONNECT HBONE request");
            answer_and_close(respond, StatusCode::BAD_REQUEST, "");
            return;
        }
    };
    let (parts, body) = request.into_parts();
    let inbound = InboundRequest {
        authority: authority.clone(),
        headers: parts.headers,
        peer: peer.clone(),
        local_addr,
        remote_addr,
    };
    let responder = Responder {
        pending: Some(PendingResponse {
            respond,
            body,
            first: Bytes::new(),
        }),
        peer: peer.clone(),
        authority,
        answer_hold,
    };
    tokio::spawn(handler(inbound, responder));
}
