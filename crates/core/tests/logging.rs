//! `init` installs a process-wide subscriber, so it is tested once, in its own test binary.

use ambit_core::logging::{LogFormat, init};

#[test]
fn runtime_level_changes_and_resets() {
    let handle = init(LogFormat::Json, "info").unwrap();
    let start = handle.current();
    assert!(!start.is_empty());
    handle.set_level("debug,h2=warn").unwrap();
    assert_eq!(handle.current(), "debug,h2=warn");
    assert!(tracing::enabled!(tracing::Level::DEBUG));
    let err = handle.set_level("ztunnel=loud").unwrap_err().to_string();
    assert!(err.contains("ztunnel=loud"), "{err}");
    assert_eq!(
        handle.current(),
        "debug,h2=warn",
        "a bad directive keeps the old filter"
    );
    handle.reset().unwrap();
    assert_eq!(handle.current(), start);
    assert!(
        init(LogFormat::Text, "info").is_err(),
        "second init is refused"
    );
}
