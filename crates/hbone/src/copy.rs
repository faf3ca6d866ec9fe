//! Splicing two byte streams together (a TCP connection and an HBONE stream, or two HBONE
//! streams), with TCP half-close carried across and live byte counts for metrics.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::stream::HboneStream;

/// Bytes moved in each direction, updated as they are written so a metrics layer can read live
/// values while the copy runs.
#[derive(Debug, Default)]
pub struct ByteCounters {
    a_to_b: AtomicU64,
    b_to_a: AtomicU64,
}

impl ByteCounters {
    /// Counters starting at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counters that start from bytes already moved before the copy began (for example the
    /// client's first bytes, sent with the CONNECT).
    pub fn starting_at(a_to_b: u64, b_to_a: u64) -> Self {
        Self {
            a_to_b: AtomicU64::new(a_to_b),
            b_to_a: AtomicU64::new(b_to_a),
        }
    }

    /// Bytes read from `a` and written to `b` so far.
    pub fn a_to_b(&self) -> u64 {
        self.a_to_b.load(Ordering::Relaxed)
    }

    /// Bytes read from `b` and written to `a` so far.
    pub fn b_to_a(&self) -> u64 {
        self.b_to_a.load(Ordering::Relaxed)
    }
}

/// Copies both directions until both are closed. EOF from one side becomes `shutdown()` (a
/// half-close) on the other, and the opposite direction keeps flowing. Returns the first error.
///
/// Buffers start at 1 KiB per direction, so idle connections stay cheap, and grow to 16 KiB−64
/// after 128 KiB and 256 KiB−64 after 10 MiB, so bulk transfers make few large writes.
pub async fn copy_bidirectional<A, B>(a: A, b: B, counters: &ByteCounters) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut a, mut b) = (a, b);
    let mut a_to_b = Transfer::new();
    let mut b_to_a = Transfer::new();
    std::future::poll_fn(|cx| {
        let forward = a_to_b.poll(cx, Pin::new(&mut a), Pin::new(&mut b), &counters.a_to_b)?;
        let backward = b_to_a.poll(cx, Pin::new(&mut b), Pin::new(&mut a), &counters.b_to_a)?;
        if forward.is_ready() && backward.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// Like [`copy_bidirectional`] between a socket (`a`) and a tunnel (`b`), without copying the
/// bytes in user space: what is read from the socket is handed to HTTP/2 as is, and received DATA
/// is written to the socket from HTTP/2's own buffers. `counters.a_to_b()` counts socket to tunnel.
pub async fn copy_with_tunnel<S>(
    socket: S,
    tunnel: HboneStream,
    counters: &ByteCounters,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut socket, mut tunnel) = (socket, tunnel);
    let mut to_tunnel = ToTunnel::new();
    let mut from_tunnel = FromTunnel::default();
    std::future::poll_fn(|cx| {
        let forward = to_tunnel.poll(cx, Pin::new(&mut socket), &mut tunnel, &counters.a_to_b)?;
        let backward =
            from_tunnel.poll(cx, &mut tunnel, Pin::new(&mut socket), &counters.b_to_a)?;
        if forward.is_ready() && backward.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// Socket to tunnel: reads into a shared buffer and hands each read to HTTP/2 as a `Bytes`.
struct ToTunnel {
    buffer: BytesMut,
    /// Read and not yet accepted by the tunnel (its window was short).
    pending: Bytes,
    moved: u64,
    read_done: bool,
    finished: bool,
}

impl ToTunnel {
    fn new() -> Self {
        Self {
            buffer: BytesMut::new(),
            pending: Bytes::new(),
            moved: 0,
            read_done: false,
            finished: false,
        }
    }

    fn poll<R>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        tunnel: &mut HboneStream,
        counter: &AtomicU64,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
    {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        for _ in 0..READS_PER_POLL {
            if self.pending.is_empty() && !self.read_done {
                let wanted = Transfer::buffer_size_for(self.moved);
                // Small reads share one allocation until a quarter of it is left; then a new one
                // (or the same, once the tunnel has let go of everything read into it).
                if self.buffer.capacity() < wanted / 4 {
                    self.buffer.reserve(wanted);
                }
                let read = ready!(tokio_util::io::poll_read_buf(
                    reader.as_mut(),
                    cx,
                    &mut self.buffer
                ))?;
                if read == 0 {
                    self.read_done = true;
                } else {
                    self.pending = self.buffer.split().freeze();
                }
            }
            while !self.pending.is_empty() {
                let sent = ready!(tunnel.poll_write_bytes(cx, &mut self.pending))?;
                self.moved += sent as u64;
                counter.fetch_add(sent as u64, Ordering::Relaxed);
            }
            if self.read_done {
                ready!(Pin::new(&mut *tunnel).poll_shutdown(cx))?;
                self.finished = true;
                return Poll::Ready(Ok(()));
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Tunnel to socket: writes each received DATA chunk straight from HTTP/2's buffer.
#[derive(Default)]
struct FromTunnel {
    pending: Bytes,
    read_done: bool,
    needs_flush: bool,
    finished: bool,
}

impl FromTunnel {
    fn poll<W>(
        &mut self,
        cx: &mut Context<'_>,
        tunnel: &mut HboneStream,
        mut writer: Pin<&mut W>,
        counter: &AtomicU64,
    ) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + ?Sized,
    {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        for _ in 0..READS_PER_POLL {
            if self.pending.is_empty() && !self.read_done {
                match tunnel.poll_read_bytes(cx) {
                    Poll::Ready(Ok(Some(data))) => self.pending = data,
                    Poll::Ready(Ok(None)) => self.read_done = true,
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                    Poll::Pending => {
                        if self.needs_flush {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.needs_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while !self.pending.is_empty() {
                let written = ready!(writer.as_mut().poll_write(cx, &self.pending))?;
                if written == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pending.advance(written);
                counter.fetch_add(written as u64, Ordering::Relaxed);
                self.needs_flush = true;
            }
            if self.read_done {
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.finished = true;
                return Poll::Ready(Ok(()));
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

const INITIAL_BUFFER: usize = 1024;
const MEDIUM_BUFFER: usize = 16 * 1024 - 64;
const LARGE_BUFFER: usize = 256 * 1024 - 64;
const MEDIUM_AFTER: u64 = 128 * 1024;
const LARGE_AFTER: u64 = 10 * 1024 * 1024;
/// Reads per poll before yielding, so one busy connection cannot starve others on its worker.
const READS_PER_POLL: usize = 32;

/// One direction of the copy.
struct Transfer {
    buffer: Vec<u8>,
    /// `buffer[start..end]` was read and not yet written.
    start: usize,
    end: usize,
    moved: u64,
    read_done: bool,
    needs_flush: bool,
    finished: bool,
}

impl Transfer {
    fn new() -> Self {
        Self {
            buffer: vec![0; INITIAL_BUFFER],
            start: 0,
            end: 0,
            moved: 0,
            read_done: false,
            needs_flush: false,
            finished: false,
        }
    }

    fn buffer_size_for(moved: u64) -> usize {
        if moved >= LARGE_AFTER {
            LARGE_BUFFER
        } else if moved >= MEDIUM_AFTER {
            MEDIUM_BUFFER
        } else {
            INITIAL_BUFFER
        }
    }

    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        counter: &AtomicU64,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        for _ in 0..READS_PER_POLL {
            if self.start == self.end && !self.read_done {
                ready!(self.poll_fill(cx, reader.as_mut(), writer.as_mut()))?;
            }
            while self.start < self.end {
                let written = ready!(
                    writer
                        .as_mut()
                        .poll_write(cx, &self.buffer[self.start..self.end])
                )?;
                if written == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.start += written;
                self.moved += written as u64;
                counter.fetch_add(written as u64, Ordering::Relaxed);
                self.needs_flush = true;
            }
            if self.read_done {
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.finished = true;
                return Poll::Ready(Ok(()));
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Reads into the (emptied) buffer; flushes the writer before waiting for more input.
    fn poll_fill<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: Pin<&mut R>,
        writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        let wanted = Self::buffer_size_for(self.moved);
        if self.buffer.len() < wanted {
            self.buffer = vec![0; wanted];
        }
        let mut read_buf = ReadBuf::new(&mut self.buffer);
        match reader.poll_read(cx, &mut read_buf) {
            Poll::Ready(Ok(())) => {
                let filled = read_buf.filled().len();
                self.start = 0;
                self.end = filled;
                self.read_done = filled == 0;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => {
                if self.needs_flush {
                    ready!(writer.poll_flush(cx))?;
                    self.needs_flush = false;
                }
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn buffers_grow_with_traffic() {
        assert_eq!(Transfer::buffer_size_for(0), 1024);
        assert_eq!(Transfer::buffer_size_for(128 * 1024 - 1), 1024);
        assert_eq!(Transfer::buffer_size_for(128 * 1024), 16 * 1024 - 64);
        assert_eq!(Transfer::buffer_size_for(10 * 1024 * 1024), 256 * 1024 - 64);
    }

    /// Both directions flow, each half-close reaches the other side, and counts are exact.
    #[tokio::test]
    async fn copies_both_ways_and_propagates_half_close() {
        let (a_inner, mut a_outer) = tokio::io::duplex(4096);
        let (b_inner, mut b_outer) = tokio::io::duplex(4096);
        let counters = ByteCounters::new();
        let upload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let expected_upload = upload.clone();
        let a_side = async move {
            a_outer.write_all(&upload).await.unwrap();
            a_outer.shutdown().await.unwrap();
            let mut reply = Vec::new();
            a_outer.read_to_end(&mut reply).await.unwrap();
            reply
        };
        let b_side = async move {
            let mut received = Vec::new();
            b_outer.read_to_end(&mut received).await.unwrap();
            b_outer.write_all(b"got it").await.unwrap();
            b_outer.shutdown().await.unwrap();
            received
        };
        let copy = copy_bidirectional(a_inner, b_inner, &counters);
        let (copied, reply, received) =
            tokio::time::timeout(std::time::Duration::from_secs(30), async {
                tokio::join!(copy, a_side, b_side)
            })
            .await
            .unwrap();
        copied.unwrap();
        assert_eq!(reply, b"got it");
        assert_eq!(received, expected_upload);
        assert_eq!(counters.a_to_b(), 300_000);
        assert_eq!(counters.b_to_a(), 6);
    }
}
