//! The waypoint binary: reads its configuration from the environment and runs until SIGTERM.

use std::collections::BTreeMap;
use std::process::ExitCode;

use ambit_core::config::ProcessEnv;

/// jemalloc, as ztunnel: request and frame buffers are reused instead of faulted in again.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    // The only argument: `--version` (images and installers check the binary with it).
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("waypoint {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let vars: BTreeMap<String, String> = std::env::vars().collect();
    let config = match waypoint::config::from_env(&ProcessEnv, &vars) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("waypoint: invalid configuration:\n{e}");
            return ExitCode::from(2);
        }
    };
    let log = match ambit_core::logging::init(config.log_format, &config.log_level) {
        Ok(log) => Some(log),
        Err(e) => {
            eprintln!("waypoint: logging: {e}");
            None
        }
    };
    // Wiring and the drain only: the data path runs on worker threads of its own
    // (`waypoint::worker`), the control plane on the control runtime.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .thread_name("waypoint")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("waypoint: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(waypoint::app::run(
        config,
        log,
        waypoint::app::shutdown_signal(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = ?e, "waypoint failed");
            eprintln!("waypoint: {e:#}");
            ExitCode::FAILURE
        }
    }
}
