//! [`HboneStream`]: one tunnelled TCP connection, i.e. the byte stream inside one HTTP/2 CONNECT
//! stream, with TCP-like half-close semantics and HTTP/2 flow control applied in both directions.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use ambit_identity::tls::VerifiedPeer;
use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, Response};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::error::HboneError;
use crate::pool::StreamSlot;

/// The bytes of one tunnelled connection.
///
/// - Reading yields the peer's DATA; END_STREAM from the peer, or a reset with `NO_ERROR` or
///   `CANCEL`, reads as EOF. Other resets are errors.
/// - Writing sends DATA as the peer's window allows (so a slow reader slows the writer).
/// - `shutdown()` sends END_STREAM: a half-close, after which the peer can still send.
/// - Dropping the stream before both directions finished resets it with `CANCEL`.
///
/// On the server, the CONNECT's 200 is owed until it can travel with something else (see
/// [`crate::server::Responder::accept`]): the first DATA or END_STREAM we send, or a read that
/// finds nothing to read. So an accepted tunnel whose client sent its first bytes with the CONNECT
/// answers them with one write, 200 and reply together, instead of two.
pub struct HboneStream {
    send: Sender,
    recv: RecvStream,
    /// Part of the last DATA frame the reader has not consumed yet.
    unread: Bytes,
    read_closed: bool,
    write_closed: bool,
    response_headers: HeaderMap,
    peer: VerifiedPeer,
    /// Keeps the pooled connection's stream count up while this stream lives (client side only).
    _slot: Option<StreamSlot>,
}

/// The sending half of a tunnel.
enum Sender {
    Open(SendStream<Bytes>),
    /// Server side: accepted, 200 not sent yet.
    Owed(Box<OwedAnswer>),
    /// The 200 could not be sent (the client reset the stream first).
    Failed,
}

/// A 200 the server has decided on but not sent yet.
struct OwedAnswer {
    respond: SendResponse<Bytes>,
    /// The 200's headers (also kept as the stream's `response_headers`).
    headers: HeaderMap,
    /// Whether the client has sent bytes before this 200: only such a client may be left waiting,
    /// since one that sent nothing may be waiting for the answer before it sends.
    received: bool,
    /// How long a read that finds nothing may still hold the 200 back.
    limit: Duration,
    /// Armed by the first read that finds nothing after bytes arrived: when it fires the 200 goes
    /// even if we have written nothing, so a client that sent a first part and then waits for the
    /// answer before sending more is never stuck.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl Sender {
    fn stream_id(&self) -> Option<h2::StreamId> {
        match self {
            Sender::Open(send) => Some(send.stream_id()),
            Sender::Owed(owed) => Some(owed.respond.stream_id()),
            Sender::Failed => None,
        }
    }
}

impl std::fmt::Debug for HboneStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneStream")
            .field("stream_id", &self.send.stream_id())
            .field("answered", &!matches!(self.send, Sender::Owed(_)))
            .field("peer", &self.peer)
            .field("read_closed", &self.read_closed)
            .field("write_closed", &self.write_closed)
            .finish_non_exhaustive()
    }
}

impl HboneStream {
    pub(crate) fn new(
        send: SendStream<Bytes>,
        recv: RecvStream,
        response_headers: HeaderMap,
        peer: VerifiedPeer,
        slot: Option<StreamSlot>,
    ) -> Self {
        Self::with_sender(Sender::Open(send), recv, response_headers, peer, slot)
    }

    fn with_sender(
        send: Sender,
        recv: RecvStream,
        response_headers: HeaderMap,
        peer: VerifiedPeer,
        slot: Option<StreamSlot>,
    ) -> Self {
        Self {
            send,
            recv,
            unread: Bytes::new(),
            read_closed: false,
            write_closed: false,
            response_headers,
            peer,
            _slot: slot,
        }
    }

    /// The server side of an accepted CONNECT whose 200 is sent later, with the first frame we send
    /// or when a read finds nothing (at once if the client has sent nothing yet, else after at
    /// most `limit`).
    pub(crate) fn owing_answer(
        respond: SendResponse<Bytes>,
        recv: RecvStream,
        response_headers: HeaderMap,
        peer: VerifiedPeer,
        limit: Duration,
    ) -> Self {
        let owed = OwedAnswer {
            respond,
            headers: response_headers.clone(),
            received: false,
            limit,
            deadline: None,
        };
        let send = Sender::Owed(Box::new(owed));
        Self::with_sender(send, recv, response_headers, peer, None)
    }

    /// Puts bytes already taken from the peer (before the stream existed) back in front of what
    /// is read next; for an owed 200 they count as the client having sent first.
    pub(crate) fn put_back(&mut self, first: Bytes) {
        if first.is_empty() {
            return;
        }
        self.note_received(&first);
        debug_assert!(self.unread.is_empty(), "put back before any read");
        self.unread = first;
    }

    /// Sends the owed 200, if any; afterwards the stream can send DATA.
    fn answer(&mut self) -> io::Result<&mut SendStream<Bytes>> {
        if let Sender::Owed(owed) = &mut self.send {
            let mut response = Response::new(());
            *response.headers_mut() = std::mem::take(&mut owed.headers);
            match owed.respond.send_response(response, false) {
                Ok(send) => self.send = Sender::Open(send),
                Err(error) => {
                    self.send = Sender::Failed;
                    return Err(h2_to_io(error));
                }
            }
        }
        match &mut self.send {
            Sender::Open(send) => Ok(send),
            Sender::Owed(_) | Sender::Failed => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the HBONE client reset the stream before it was answered",
            )),
        }
    }

    /// Called when a read found nothing: sends the owed 200 unless the client is known not to be
    /// waiting for it, and then only for up to the owed answer's limit.
    fn answer_if_read_waits(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let Sender::Owed(owed) = &mut self.send else {
            return Ok(());
        };
        if owed.received {
            let limit = owed.limit;
            let deadline = owed
                .deadline
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
            if deadline.as_mut().poll(cx).is_pending() {
                return Ok(());
            }
        }
        self.answer().map(|_| ())
    }

    /// Notes that the client sent bytes before its 200.
    fn note_received(&mut self, data: &Bytes) {
        if let Sender::Owed(owed) = &mut self.send {
            owed.received |= !data.is_empty();
        }
    }

    /// The headers of the 200 that opened the tunnel: received ones on the client (for example the
    /// destination's `baggage`), the ones we sent on the server.
    pub fn response_headers(&self) -> &HeaderMap {
        &self.response_headers
    }

    /// The identity the TLS handshake proved for the other end of the connection.
    pub fn peer(&self) -> &VerifiedPeer {
        &self.peer
    }

    /// Consumes DATA already received, returning how much was copied into `buf`.
    fn take_unread(&mut self, buf: &mut ReadBuf<'_>) -> usize {
        let n = buf.remaining().min(self.unread.len());
        buf.put_slice(&self.unread.split_to(n));
        // Reopen the window only for what the reader consumed, so a slow reader pushes back on the
        // sender. Releasing can only fail once the stream is gone, when windows no longer matter.
        let _ = self.recv.flow_control().release_capacity(n);
        n
    }

    /// The error to report after sending failed: the peer's reset reason if it sent one.
    fn poll_write_failure(&mut self, cx: &mut Context<'_>, error: Option<h2::Error>) -> io::Error {
        let reset = match &mut self.send {
            Sender::Open(send) => send.poll_reset(cx),
            Sender::Owed(owed) => owed.respond.poll_reset(cx),
            Sender::Failed => Poll::Pending,
        };
        match reset {
            Poll::Ready(Ok(reason)) if is_clean_close(reason) => io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the HBONE peer closed the stream and reads no more data",
            ),
            Poll::Ready(Ok(reason)) => h2_to_io(h2::Error::from(reason)),
            Poll::Ready(Err(error)) => h2_to_io(error),
            Poll::Pending => match error {
                Some(error) => h2_to_io(error),
                None => io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the HBONE stream can no longer send data",
                ),
            },
        }
    }

    /// Waits until the peer's windows let us send at least one byte; returns how many may go now.
    /// `wanted` is how much the caller has to send (the window h2 asks for on our behalf).
    fn poll_send_capacity(
        &mut self,
        cx: &mut Context<'_>,
        wanted: usize,
    ) -> Poll<io::Result<usize>> {
        let send = self.answer()?;
        let capacity = send.capacity();
        if capacity > 0 {
            return Poll::Ready(Ok(capacity));
        }
        // Ask for a window for this write; h2 assigns it as the peer's WINDOW_UPDATEs arrive.
        send.reserve_capacity(wanted);
        // A zero assignment (capacity taken back) is polled again, which registers for the next
        // change; a few in a row yield to the runtime instead of spinning here.
        for _ in 0..4 {
            let polled = match &mut self.send {
                Sender::Open(send) => send.poll_capacity(cx),
                Sender::Owed(_) | Sender::Failed => None.into(),
            };
            match ready!(polled) {
                Some(Ok(0)) => continue,
                Some(Ok(capacity)) => return Poll::Ready(Ok(capacity)),
                Some(Err(error)) => {
                    return Poll::Ready(Err(self.poll_write_failure(cx, Some(error))));
                }
                None => return Poll::Ready(Err(self.poll_write_failure(cx, None))),
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Sends the start of `data` as DATA without copying it: as much as the peer's windows allow,
    /// split off the front of `data`. Returns how many bytes went (at least one), like
    /// `poll_write` but handing the buffer to HTTP/2 instead of copying it.
    pub fn poll_write_bytes(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        if self.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write on an HBONE stream after shutdown",
            )));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let capacity = ready!(self.poll_send_capacity(cx, data.len()))?;
        let chunk = data.split_to(capacity.min(data.len()));
        let sent = chunk.len();
        match self.answer()?.send_data(chunk, false) {
            Ok(()) => Poll::Ready(Ok(sent)),
            Err(error) => Poll::Ready(Err(self.poll_write_failure(cx, Some(error)))),
        }
    }

    /// The next bytes the peer sent, without copying them; `None` at EOF (END_STREAM, or a reset
    /// with `NO_ERROR`/`CANCEL`). The window is reopened for them at once: the caller owns them.
    pub fn poll_read_bytes(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        // Bounded like `poll_read`: each turn returns or takes a new frame.
        loop {
            if !self.unread.is_empty() {
                let data = std::mem::take(&mut self.unread);
                // Releasing can only fail once the stream is gone, when windows no longer matter.
                let _ = self.recv.flow_control().release_capacity(data.len());
                return Poll::Ready(Ok(Some(data)));
            }
            if self.read_closed {
                return Poll::Ready(Ok(None));
            }
            ready!(self.poll_next_frame(cx))?;
        }
    }

    /// Takes the peer's next DATA frame into `unread`, or notes its end (END_STREAM, or a reset
    /// with `NO_ERROR`/`CANCEL`). When nothing has arrived, an owed 200 goes as
    /// [`Self::answer_if_read_waits`] decides.
    fn poll_next_frame(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.recv.poll_data(cx) {
            Poll::Pending => {
                self.answer_if_read_waits(cx)?;
                Poll::Pending
            }
            Poll::Ready(Some(Ok(data))) => {
                self.note_received(&data);
                self.unread = data;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(None) => {
                self.read_closed = true;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Some(Err(error))) if is_clean_reset(&error) => {
                self.read_closed = true;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Err(h2_to_io(error))),
        }
    }

    fn send_chunk(&mut self, cx: &mut Context<'_>, chunk: &[u8]) -> Poll<io::Result<usize>> {
        match self
            .answer()?
            .send_data(Bytes::copy_from_slice(chunk), false)
        {
            Ok(()) => Poll::Ready(Ok(chunk.len())),
            Err(error) => Poll::Ready(Err(self.poll_write_failure(cx, Some(error)))),
        }
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        // Bounded: each turn either returns or replaces `unread` with a new frame; empty DATA
        // frames (legal) are skipped by looping.
        loop {
            if !this.unread.is_empty() {
                this.take_unread(buf);
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            ready!(this.poll_next_frame(cx))?;
        }
    }
}

/// The error of a write after `shutdown()`.
fn write_after_shutdown() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "write on an HBONE stream after shutdown",
    )
}

impl AsyncWrite for HboneStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Err(write_after_shutdown()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let capacity = ready!(this.poll_send_capacity(cx, buf.len()))?;
        this.send_chunk(cx, &buf[..capacity.min(buf.len())])
    }

    /// Gathers the slices into one DATA frame (a writer such as hyper then queues its head and
    /// body separately instead of first copying them together: one copy instead of two).
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Err(write_after_shutdown()));
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        let capacity = ready!(this.poll_send_capacity(cx, total))?;
        let limit = capacity.min(total);
        let mut frame = bytes::BytesMut::with_capacity(limit);
        for buf in bufs {
            let room = limit - frame.len();
            if room == 0 {
                break;
            }
            frame.extend_from_slice(&buf[..buf.len().min(room)]);
        }
        let sent = frame.len();
        match this.answer()?.send_data(frame.freeze(), false) {
            Ok(()) => Poll::Ready(Ok(sent)),
            Err(error) => Poll::Ready(Err(this.poll_write_failure(cx, Some(error)))),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Frames go out from the connection task as soon as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Ok(()));
        }
        this.write_closed = true;
        let read_closed = this.read_closed;
        let send = match this.answer() {
            Ok(send) => send,
            // The client reset the stream after ending its side: nothing left to half-close.
            Err(_) if read_closed => return Poll::Ready(Ok(())),
            Err(error) => return Poll::Ready(Err(error)),
        };
        send.reserve_capacity(0);
        match send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            // The peer already ended the exchange cleanly: nothing left to half-close.
            Err(error) if is_clean_reset(&error) => Poll::Ready(Ok(())),
            Err(error) => Poll::Ready(Err(h2_to_io(error))),
        }
    }
}

impl Drop for HboneStream {
    fn drop(&mut self) {
        // An accepted tunnel still owes its 200: send it, so the client sees the tunnel was
        // accepted before h2 resets the stream (as when the 200 went at once).
        if matches!(self.send, Sender::Owed(_)) {
            let _ = self.answer();
        }
    }
}

/// Reset reasons that mean "done", not "failed" (upstream treats them as EOF).
fn is_clean_close(reason: Reason) -> bool {
    reason == Reason::NO_ERROR || reason == Reason::CANCEL
}

fn is_clean_reset(error: &h2::Error) -> bool {
    error.is_reset() && error.reason().is_some_and(is_clean_close)
}

/// Keeps I/O errors as they are (so `ErrorKind` survives) and wraps protocol errors readably.
pub(crate) fn h2_to_io(error: h2::Error) -> io::Error {
    if error.is_io() {
        if let Some(io_error) = error.into_io() {
            return io_error;
        }
        return io::Error::other("HBONE connection I/O error");
    }
    io::Error::other(HboneError::Stream(error))
}
