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
    let log = match ambit_core::logging::init(config.log_format, &config.log_level) {
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
            eprintln!("ztunnel: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(ztunnel::app::run(
        config,
        log,
        ztunnel::app::shutdown_signal(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = ?e, "ztunnel failed");
            eprintln!("ztunnel: {e:#}");
            ExitCode::FAILURE
        }
    }
}
