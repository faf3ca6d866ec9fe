//! The ztunnel binary: reads its configuration from the environment and runs until SIGTERM.

use std::collections::BTreeMap;
use std::process::ExitCode;

use ambit_core::config::ProcessEnv;

/// jemalloc, as upstream ztunnel uses. The data path allocates and frees buffers of 16 KiB to
/// 1 MiB per frame (HTTP/2 DATA frames up to the 1 MiB frame size, TLS records, copy chunks); the
/// system allocator hands such sizes back to the kernel and faults them in again on the next
/// frame, which cost more CPU than the encryption in the throughput benchmark. jemalloc keeps
/// them for reuse and returns idle memory on a timer instead.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The longest a log line (an access-log line per connection, mostly) waits before it is written:
/// lines are written in batches, when 64 KiB are pending or this long after the first of them,
/// instead of one `write` each.
const LOG_FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

fn main() -> ExitCode {
    // The only argument: `--version` (images and installers check the binary with it).
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("ztunnel {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let vars: BTreeMap<String, String> = std::env::vars().collect();
    let config = match ztunnel::config::from_env(&ProcessEnv, &vars) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ztunnel: invalid configuration:\n{e}");
            return ExitCode::from(2);
        }
    };
    // A line per connection: written in batches (docs/operations.md, "Logs").
    let output = ambit_core::logging::LogOutput::Buffered {
        flush_interval: LOG_FLUSH_INTERVAL,
    };
    let log = match ambit_core::logging::init_with(config.log_format, &config.log_level, output) {
        Ok(log) => Some(log),
        Err(e) => {
            eprintln!("ztunnel: logging: {e}");
            None
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .thread_name("ztunnel")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            if let Some(log) = &log {
                log.flush();
            }
            eprintln!("ztunnel: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let flush = log.clone();
    let result = runtime.block_on(ztunnel::app::run(
        config,
        log,
        ztunnel::app::shutdown_signal(),
    ));
    // Connections still open are dropped with the runtime, each logging its line.
    drop(runtime);
    if let Err(e) = &result {
        tracing::error!(error = ?e, "ztunnel failed");
    }
    // Every buffered line out before the process ends (and before the direct message below).
    if let Some(log) = &flush {
        log.flush();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztunnel: {e:#}");
            ExitCode::FAILURE
        }
    }
}
