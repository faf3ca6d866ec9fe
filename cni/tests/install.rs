//! Installing into a node's CNI configuration: joins the list idempotently, uninstall leaves the
//! file byte-for-byte as it was, and files we do not understand are refused untouched.

use std::path::Path;

use ambit_cni::install::{InstallConfig, InstallError, install, uninstall};
use serde_json::{Value, json};

const CONFLIST: &str = r#"{
    "cniVersion": "1.0.0",
    "name": "podnet",
    "plugins": [
        { "type": "bridge", "bridge": "cni0", "isGateway": true,
          "ipam": { "type": "host-local", "ranges": [[{"subnet": "10.22.0.0/16"}]] } },
        { "type": "portmap", "capabilities": {"portMappings": true} }
    ]
}
"#;

fn config(dir: &Path) -> InstallConfig {
    let plugin = dir.join("build/ambit-cni");
    std::fs::create_dir_all(plugin.parent().unwrap()).unwrap();
    std::fs::write(&plugin, b"#!/bin/true\n").unwrap();
    InstallConfig {
        bin_dir: dir.join("bin"),
        conf_dir: dir.join("net.d"),
        plugin_binary: plugin,
        entry: json!({"type": "ambit-cni", "agentSocket": "/var/run/ambit/cni.sock"}),
        conflist: None,
    }
}

#[test]
fn install_joins_the_list_once_and_uninstall_restores_it_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    std::fs::create_dir_all(&cfg.conf_dir).unwrap();
    let list = cfg.conf_dir.join("10-podnet.conflist");
    std::fs::write(&list, CONFLIST).unwrap();
    std::fs::write(cfg.conf_dir.join("99-other.conflist"), CONFLIST).unwrap();

    let report = install(&cfg).unwrap();
    assert_eq!(
        report.conflist, list,
        "the first list in name order, as kubelet picks"
    );
    assert!(report.changed);
    let joined: Value = serde_json::from_str(&std::fs::read_to_string(&list).unwrap()).unwrap();
    let types: Vec<&str> = joined["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["bridge", "portmap", "ambit-cni"]);
    assert_eq!(
        joined["plugins"][0]["ipam"]["type"], "host-local",
        "other plugins untouched"
    );
    assert!(cfg.bin_dir.join("ambit-cni").exists());

    assert!(
        !install(&cfg).unwrap().changed,
        "second install changes nothing"
    );
    let types_again: Value =
        serde_json::from_str(&std::fs::read_to_string(&list).unwrap()).unwrap();
    assert_eq!(types_again["plugins"].as_array().unwrap().len(), 3);

    assert!(uninstall(&cfg).unwrap());
    assert_eq!(
        std::fs::read_to_string(&list).unwrap(),
        CONFLIST,
        "byte for byte as it was"
    );
    assert!(!cfg.bin_dir.join("ambit-cni").exists());
    assert!(!uninstall(&cfg).unwrap(), "second uninstall is a no-op");
    let leftovers: Vec<_> = std::fs::read_dir(&cfg.conf_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        2,
        "no backup or temp files left: {leftovers:?}"
    );
}

#[test]
fn a_list_we_do_not_understand_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    std::fs::create_dir_all(&cfg.conf_dir).unwrap();
    let list = cfg.conf_dir.join("10-odd.conflist");
    for (content, reason) in [
        (
            "{ \"name\": \"x\", \"type\": \"bridge\" }",
            "no \"plugins\" array",
        ),
        (
            "{ \"plugins\": [ {\"name\": \"no-type\"} ] }",
            "plugins[0] has no \"type\"",
        ),
        ("not json at all", "not valid JSON"),
    ] {
        std::fs::write(&list, content).unwrap();
        let err = install(&cfg).unwrap_err();
        assert!(matches!(err, InstallError::Unrecognized { .. }));
        let text = err.to_string();
        assert!(
            text.contains(reason) && text.contains("nothing was changed"),
            "{text}"
        );
        assert_eq!(std::fs::read_to_string(&list).unwrap(), content);
    }
    std::fs::remove_file(&list).unwrap();
    let err = install(&cfg).unwrap_err().to_string();
    assert!(err.starts_with("no *.conflist in"), "{err}");
}
