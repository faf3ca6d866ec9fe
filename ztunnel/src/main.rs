//! The ztunnel binary: reads its configuration from the environment and runs until SIGTERM.

use std::collections::BTreeMap;
use std::process::ExitCode;

use ambit_core::config::ProcessEnv;

fn main() -> ExitCode {
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
