//! The process shape both proxies share: a single-threaded control runtime on its own thread
//! (configuration, certificates, the operator endpoints) beside the data path's runtime, binding
//! the endpoints with errors that name them, and the shutdown signal.

use std::net::SocketAddr;

use thiserror::Error;
use tokio::net::TcpListener;

/// Why the control runtime or an endpoint could not start.
#[derive(Debug, Error)]
pub enum RuntimeError {
    /// The runtime or its thread could not be created.
    #[error("starting the control runtime: {0}")]
    Start(#[source] std::io::Error),
    /// An endpoint's address could not be bound.
    #[error("binding the {what} endpoint on {addr}: {source}")]
    Bind {
        /// Which endpoint (`metrics`, `readiness`, `admin`, `HBONE`).
        what: String,
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// One thread (named as given) running a current-thread runtime until this is dropped, which
/// stops it and cancels what is left on it.
#[derive(Debug)]
pub struct ControlRuntime {
    handle: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl ControlRuntime {
    /// Starts the runtime on a thread named `thread_name`.
    pub fn start(thread_name: &str) -> Result<Self, RuntimeError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(RuntimeError::Start)?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(thread_name.into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .map_err(RuntimeError::Start)?;
        Ok(ControlRuntime {
            handle,
            _stop: stop,
        })
    }

    /// Spawns onto it.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

/// Binds the `what` endpoint on `addr`.
pub async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, RuntimeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| RuntimeError::Bind {
            what: what.to_string(),
            addr,
            source,
        })
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; stop with SIGINT");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
