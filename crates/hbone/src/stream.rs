//! [`HboneStream`]: one tunnelled TCP connection, i.e. the byte stream inside one HTTP/2 CONNECT
//! stream, with TCP-like half-close semantics and HTTP/2 flow control applied in both directions.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use ambit_identity::tls::VerifiedPeer;
use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use http::HeaderMap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::HboneError;
use crate::pool::StreamSlot;

/// The bytes of one tunnelled connection.
///
/// - Reading yields the peer's DATA; END_STREAM from the peer, or a reset with `NO_ERROR` or
///   `CANCEL`, reads as EOF. Other resets are errors.
/// - Writing sends DATA as the peer's window allows (so a slow reader slows the writer).
/// - `shutdown()` sends END_STREAM: a half-close, after which the peer can still send.
/// - Dropping the stream before both directions finished resets it with `CANCEL`.
pub struct HboneStream {
    send: SendStream<Bytes>,
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

impl std::fmt::Debug for HboneStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneStream")
            .field("stream_id", &self.send.stream_id())
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
        match self.send.poll_reset(cx) {
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
        let capacity = self.send.capacity();
        if capacity > 0 {
            return Poll::Ready(Ok(capacity));
        }
        // Ask for a window for this write; h2 assigns it as the peer's WINDOW_UPDATEs arrive.
        self.send.reserve_capacity(wanted);
        // A zero assignment (capacity taken back) is polled again, which registers for the next
        // change; a few in a row yield to the runtime instead of spinning here.
        for _ in 0..4 {
            match ready!(self.send.poll_capacity(cx)) {
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
        match self.send.send_data(chunk, false) {
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
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => self.unread = data,
                None => self.read_closed = true,
                Some(Err(error)) if is_clean_reset(&error) => self.read_closed = true,
                Some(Err(error)) => return Poll::Ready(Err(h2_to_io(error))),
            }
        }
    }

    fn send_chunk(&mut self, cx: &mut Context<'_>, chunk: &[u8]) -> Poll<io::Result<usize>> {
        match self.send.send_data(Bytes::copy_from_slice(chunk), false) {
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
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => this.unread = data,
                None => this.read_closed = true,
                Some(Err(error)) if is_clean_reset(&error) => this.read_closed = true,
                Some(Err(error)) => return Poll::Ready(Err(h2_to_io(error))),
            }
        }
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write on an HBONE stream after shutdown",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let capacity = ready!(this.poll_send_capacity(cx, buf.len()))?;
        this.send_chunk(cx, &buf[..capacity.min(buf.len())])
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
        this.send.reserve_capacity(0);
        match this.send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            // The peer already ended the exchange cleanly: nothing left to half-close.
            Err(error) if is_clean_reset(&error) => Poll::Ready(Ok(())),
            Err(error) => Poll::Ready(Err(h2_to_io(error))),
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
