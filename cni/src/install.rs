//! Installing the plugin on a node: copy the binary into the CNI binary directory and add our
//! entry to the node's network configuration list, idempotently; uninstall restores the list
//! exactly as it was. A configuration we do not understand is refused, never rewritten.

use std::path::{Path, PathBuf};

use serde_json::Value;
use thiserror::Error;

/// The plugin's `type` in the configuration list.
pub const PLUGIN_TYPE: &str = "ambit-cni";

/// What to install where.
#[derive(Clone, Debug)]
pub struct InstallConfig {
    /// CNI binary directory (`/opt/cni/bin`).
    pub bin_dir: PathBuf,
    /// CNI configuration directory (`/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// The plugin binary to copy.
    pub plugin_binary: PathBuf,
    /// Our entry in the list (`type` is forced to `ambit-cni`).
    pub entry: Value,
    /// A specific `.conflist` file name; default: the first in name order, as kubelet picks.
    pub conflist: Option<String>,
}

/// Why installation was refused or failed.
#[derive(Debug, Error)]
pub enum InstallError {
    /// No configuration list to join.
    #[error("no *.conflist in {0}: install the pod network (its CNI configuration) first")]
    NoConflist(PathBuf),
    /// A file we do not understand.
    #[error("refusing to modify {file}: {reason}; nothing was changed")]
    Unrecognized {
        /// The file.
        file: PathBuf,
        /// What is unexpected.
        reason: String,
    },
    /// Reading or writing failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> InstallError + 'a {
    move |source| InstallError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// What changed.
#[derive(Debug, PartialEq, Eq)]
pub struct InstallReport {
    /// The configuration list used.
    pub conflist: PathBuf,
    /// Whether the list was rewritten (false: already up to date).
    pub changed: bool,
}

fn pick_conflist(config: &InstallConfig) -> Result<PathBuf, InstallError> {
    if let Some(name) = &config.conflist {
        return Ok(config.conf_dir.join(name));
    }
    let mut lists: Vec<PathBuf> = std::fs::read_dir(&config.conf_dir)
        .map_err(io("reading", &config.conf_dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
        .collect();
    lists.sort();
    lists
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoConflist(config.conf_dir.clone()))
}

fn backup_path(conflist: &Path) -> PathBuf {
    let name = conflist
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    conflist.with_file_name(format!(".{name}.ambit-backup"))
}

/// Parses a list and checks its shape; returns the JSON and the plugins array index of ours.
fn read_list(path: &Path) -> Result<(String, Value), InstallError> {
    let text = std::fs::read_to_string(path).map_err(io("reading", path))?;
    let value: Value = serde_json::from_str(&text).map_err(|e| InstallError::Unrecognized {
        file: path.to_path_buf(),
        reason: format!("not valid JSON ({e})"),
    })?;
    let plugins = value
        .get("plugins")
        .and_then(Value::as_array)
        .ok_or_else(|| InstallError::Unrecognized {
            file: path.to_path_buf(),
            reason: "no \"plugins\" array (is it a single-plugin .conf renamed?)".into(),
        })?;
    for (i, plugin) in plugins.iter().enumerate() {
        if plugin.get("type").and_then(Value::as_str).is_none() {
            return Err(InstallError::Unrecognized {
                file: path.to_path_buf(),
                reason: format!("plugins[{i}] has no \"type\""),
            });
        }
    }
    Ok((text, value))
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn write_atomic(path: &Path, bytes: &[u8], mode: Option<u32>) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    std::fs::write(&tmp, bytes).map_err(io("writing", &tmp))?;
    if let Some(mode) = mode {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
            .map_err(io("setting permissions on", &tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io("renaming into place", path))
}

fn render(value: &Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("a JSON value always serialises");
    bytes.push(b'\n');
    bytes
}

/// Copies the plugin and joins the configuration list. Idempotent.
pub fn install(config: &InstallConfig) -> Result<InstallReport, InstallError> {
    let conflist = pick_conflist(config)?;
    let (text, mut value) = read_list(&conflist)?;
    let binary =
        std::fs::read(&config.plugin_binary).map_err(io("reading", &config.plugin_binary))?;
    std::fs::create_dir_all(&config.bin_dir).map_err(io("creating", &config.bin_dir))?;
    write_atomic(&config.bin_dir.join(PLUGIN_TYPE), &binary, Some(0o755))?;

    let mut entry = config.entry.clone();
    entry["type"] = Value::String(PLUGIN_TYPE.into());
    let plugins = value["plugins"]
        .as_array_mut()
        .expect("checked by read_list");
    let had_ours = plugins.iter().any(is_ours);
    match plugins.iter_mut().find(|p| is_ours(p)) {
        Some(existing) if *existing == entry => {
            return Ok(InstallReport {
                conflist,
                changed: false,
            });
        }
        Some(existing) => *existing = entry,
        None => plugins.push(entry),
    }
    if !had_ours {
        write_atomic(&backup_path(&conflist), text.as_bytes(), None)?;
    }
    write_atomic(&conflist, &render(&value), None)?;
    Ok(InstallReport {
        conflist,
        changed: true,
    })
}

/// Leaves the list as it was before [`install`] (byte for byte when nobody else changed it) and
/// removes the binary. Returns whether anything was removed.
pub fn uninstall(config: &InstallConfig) -> Result<bool, InstallError> {
    let conflist = pick_conflist(config)?;
    let (_, mut value) = read_list(&conflist)?;
    let plugins = value["plugins"]
        .as_array_mut()
        .expect("checked by read_list");
    let before = plugins.len();
    plugins.retain(|p| !is_ours(p));
    let removed = plugins.len() != before;
    let backup = backup_path(&conflist);
    if removed {
        let restored = std::fs::read_to_string(&backup).ok().filter(|original| {
            serde_json::from_str::<Value>(original).ok().as_ref() == Some(&value)
        });
        match restored {
            Some(original) => write_atomic(&conflist, original.as_bytes(), None)?,
            None => write_atomic(&conflist, &render(&value), None)?,
        }
    }
    let _ = std::fs::remove_file(&backup);
    let binary = config.bin_dir.join(PLUGIN_TYPE);
    let had_binary = binary.exists();
    if had_binary {
        std::fs::remove_file(&binary).map_err(io("removing", &binary))?;
    }
    Ok(removed || had_binary)
}
