//! The CNI plugin binary: environment and stdin in, result or error JSON out.

use std::collections::BTreeMap;
use std::io::Read;

fn main() {
    // Runtimes call the plugin with CNI_COMMAND=VERSION; `--version` is for people and images.
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("ambit-cni {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    let env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("CNI_"))
        .collect();
    let mut stdin = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut stdin) {
        eprintln!("ambit-cni: reading stdin: {e}");
    }
    let outcome = ambit_cni::plugin::run(&env, &stdin);
    print!("{}", outcome.stdout);
    std::process::exit(outcome.status);
}
