//! What protocol a tunnel carries: declared by the Service port (`appProtocol`, then the port
//! name, as istiod-lite translated it), or, for undeclared ports and pod-addressed traffic,
//! sniffed from the first bytes the client sends (the HTTP/2 preface or an HTTP/1.1 request
//! line) within a short bound. A declared TCP port is never sniffed, so server-first protocols
//! (MySQL, SMTP) work; an undeclared port whose client stays silent past the bound is TCP.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// How long an undeclared port waits for the client's first bytes before treating it as TCP.
pub const SNIFF_TIMEOUT: Duration = Duration::from_millis(200);

/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol of a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 (gRPC included).
    Http2,
    /// Anything else: proxied at L4.
    Tcp,
}

impl Detected {
    /// The request protocol label of the TCP metrics.
    pub fn is_http(self) -> bool {
        !matches!(self, Detected::Tcp)
    }
}

/// Classifies the bytes seen so far: `Some` once decided.
fn classify(seen: &[u8]) -> Option<Detected> {
    if seen.is_empty() {
        return None;
    }
    let preface_part = &H2_PREFACE[..seen.len().min(H2_PREFACE.len())];
    if seen.starts_with(preface_part) {
        if seen.len() >= H2_PREFACE.len() {
            return Some(Detected::Http2);
        }
        // "PRI ..." could still be an HTTP/1.1 method named PRI: wait for more.
        return None;
    }
    // An HTTP/1.x request line starts with a method token (upper-case letters) and a space.
    for (i, b) in seen.iter().enumerate() {
        match b {
            b'A'..=b'Z' | b'-' | b'_' if i < 20 => continue,
            b' ' if i > 0 => return Some(Detected::Http1),
            _ => return Some(Detected::Tcp),
        }
    }
    if seen.len() >= 20 {
        Some(Detected::Tcp)
    } else {
        None
    }
}

/// Reads the client's first bytes (at most until `timeout`) and says what they are. The bytes
/// read are returned to be replayed with [`Prefixed`].
pub async fn sniff<IO: AsyncRead + Unpin>(
    io: &mut IO,
    timeout: Duration,
) -> io::Result<(Detected, Bytes)> {
    let mut seen = BytesMut::with_capacity(64);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(detected) = classify(&seen) {
            return Ok((detected, seen.freeze()));
        }
        let mut chunk = [0u8; 64];
        match tokio::time::timeout_at(deadline, io.read(&mut chunk)).await {
            Err(_) => return Ok((Detected::Tcp, seen.freeze())),
            Ok(Ok(0)) => return Ok((Detected::Tcp, seen.freeze())),
            Ok(Ok(n)) => seen.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// A stream that first replays bytes already read from it.
#[derive(Debug)]
pub struct Prefixed<IO> {
    prefix: Bytes,
    inner: IO,
}

impl<IO> Prefixed<IO> {
    /// `inner`, with `prefix` read first.
    pub fn new(prefix: Bytes, inner: IO) -> Self {
        Self { prefix, inner }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn classifies_request_lines_prefaces_and_binary() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"POST"), None);
        assert_eq!(classify(b"DELETE "), Some(Detected::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"\x16\x03\x01"), Some(Detected::Tcp));
        assert_eq!(classify(b"HELLO"), None);
        assert_eq!(classify(b"hello world"), Some(Detected::Tcp));
        assert_eq!(classify(b" GET"), Some(Detected::Tcp));
    }

    proptest::proptest! {
        /// Whatever the client sends: a decision, once made, holds however many more bytes come
        /// (sniffing reads until one is made), and 24 bytes (an h2 preface's length) always
        /// decide.
        #[test]
        fn a_decision_stands_and_enough_bytes_always_decide(
            first in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
            more in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
        ) {
            let decided = classify(&first);
            let longer = [first.as_slice(), more.as_slice()].concat();
            if decided.is_some() {
                proptest::prop_assert_eq!(classify(&longer), decided);
            }
            if longer.len() >= H2_PREFACE.len() {
                proptest::prop_assert!(classify(&longer).is_some());
            }
        }

        /// Request lines of any method token are HTTP/1.1; the preface with anything after it
        /// is HTTP/2.
        #[test]
        fn request_lines_and_prefaces_are_recognised(
            method in "[A-Z][A-Z_-]{0,15}",
            rest in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
        ) {
            let line = [format!("{method} ").as_bytes(), rest.as_slice()].concat();
            proptest::prop_assert_eq!(classify(&line), Some(Detected::Http1));
            let h2 = [H2_PREFACE, rest.as_slice()].concat();
            proptest::prop_assert_eq!(classify(&h2), Some(Detected::Http2));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_tcp_after_the_bound() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let sniffed = tokio::spawn(async move { sniff(&mut server, SNIFF_TIMEOUT).await });
        tokio::time::sleep(SNIFF_TIMEOUT * 2).await;
        let (detected, seen) = sniffed.await.unwrap().unwrap();
        assert_eq!(detected, Detected::Tcp);
        assert!(seen.is_empty());
        client.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn sniffed_bytes_are_replayed() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET /x HTTP/1.1\r\n\r\n").await.unwrap();
        let (detected, seen) = sniff(&mut server, SNIFF_TIMEOUT).await.unwrap();
        assert_eq!(detected, Detected::Http1);
        let mut replay = Prefixed::new(seen, server);
        client.shutdown().await.unwrap();
        let mut all = Vec::new();
        replay.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET /x HTTP/1.1\r\n\r\n");
    }
}
