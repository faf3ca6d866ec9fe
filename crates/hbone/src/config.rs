//! Tunables for HBONE connections: the HTTP/2 settings both sides advertise and the client pool's
//! limits. Defaults are the values upstream ztunnel uses, so that our peers and theirs see the same
//! windows, frame sizes and keepalive behaviour.

use std::time::Duration;

/// HTTP/2 settings for HBONE connections, client and server side.
///
/// The windows are large because an HBONE stream carries a whole TCP connection: a small window
/// would cap single-stream throughput at window / RTT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct H2Config {
    /// Initial per-stream receive window (`SETTINGS_INITIAL_WINDOW_SIZE`).
    pub stream_window: u32,
    /// Initial connection-level receive window.
    pub connection_window: u32,
    /// Largest DATA frame we accept (`SETTINGS_MAX_FRAME_SIZE`).
    pub max_frame_size: u32,
    /// Largest header block the client accepts in a response.
    pub client_max_header_list: u32,
    /// Largest header block the server accepts in a CONNECT request.
    pub server_max_header_list: u32,
    /// Streams a client may open at once on one connection to our server.
    pub server_max_concurrent_streams: u32,
    /// Bytes the server buffers per stream before applying backpressure to the writer.
    pub server_max_send_buffer: usize,
    /// Time between keepalive PINGs (also the delay before the first one).
    pub keepalive_interval: Duration,
    /// How long the server may hold back an accepted CONNECT's 200 when the client sent bytes
    /// with the CONNECT and the handler has nothing to send yet, so that the 200 travels with the
    /// first reply bytes (one write and one wake-up of the client fewer per tunnel). A client that
    /// sent nothing gets its 200 as soon as the handler waits to read. Zero: always at once.
    pub answer_hold: Duration,
    /// How long a PING may wait for its PONG before the connection is considered dead.
    pub keepalive_timeout: Duration,
}

impl Default for H2Config {
    fn default() -> Self {
        Self {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            client_max_header_list: 16 * 1024,
            server_max_header_list: 64 * 1024,
            server_max_concurrent_streams: 200,
            server_max_send_buffer: 400_000,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            answer_hold: Duration::from_millis(2),
        }
    }
}

impl H2Config {
    /// The h2 client builder with these settings. The client's send buffer equals the stream
    /// window, as upstream does, so one stream can keep a full window in flight.
    pub(crate) fn client_builder(&self, max_send_streams: u32) -> h2::client::Builder {
        let mut builder = h2::client::Builder::new();
        builder
            .initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_header_list_size(self.client_max_header_list)
            .max_send_buffer_size(self.stream_window as usize)
            .initial_max_send_streams(max_send_streams as usize)
            .enable_push(false);
        builder
    }

    /// The h2 server builder with these settings.
    pub(crate) fn server_builder(&self) -> h2::server::Builder {
        let mut builder = h2::server::Builder::new();
        builder
            .initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_header_list_size(self.server_max_header_list)
            .max_send_buffer_size(self.server_max_send_buffer)
            .max_concurrent_streams(self.server_max_concurrent_streams);
        builder
    }
}

/// Limits for the client-side connection pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Streams one pooled connection carries at most; the peer's `SETTINGS_MAX_CONCURRENT_STREAMS`
    /// lowers it further. Beyond it a new connection is dialed.
    pub max_streams_per_connection: u32,
    /// A connection with no open streams for this long is dropped from the pool.
    pub idle_release: Duration,
    /// Deadline for dialing a new connection: TCP connect, TLS and the HTTP/2 handshake together.
    pub connect_timeout: Duration,
    /// HTTP/2 settings for pooled connections.
    pub h2: H2Config,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_streams_per_connection: 100,
            idle_release: Duration::from_secs(5 * 60),
            connect_timeout: Duration::from_secs(10),
            h2: H2Config::default(),
        }
    }
}
