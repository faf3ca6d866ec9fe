//! Finding the network namespace of a pod that never passed through the plugin (it existed
//! before the agent, or before its namespace was labelled): every distinct network namespace a
//! process on the node lives in (`/proc/*/ns/net`, by inode) is entered on a short-lived thread
//! and its interface addresses are read; the one holding the pod's IP is the pod's.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A pod's network namespace found under `/proc`.
#[derive(Debug)]
pub struct FoundNetns {
    /// `/proc/<pid>/ns/net` of a process living in it.
    pub path: PathBuf,
    /// The namespace's inode (identifies it while the path's process may come and go).
    pub inode: u64,
    /// The open namespace.
    pub fd: OwnedFd,
}

/// The inode of the network namespace at `path` (following the `/proc` link).
pub fn netns_inode(path: &Path) -> std::io::Result<u64> {
    Ok(std::fs::metadata(path)?.ino())
}

/// Addresses on the interfaces of the namespace `fd`.
fn addresses_in(fd: &OwnedFd, name: &str) -> Result<Vec<IpAddr>, String> {
    ambit_redirect::in_netns(fd.as_fd(), name, || {
        let addrs = nix::ifaddrs::getifaddrs()
            .map_err(|e| ("reading interface addresses".to_string(), e.into()))?;
        Ok(addrs
            .filter_map(|a| a.address)
            .filter_map(|a| {
                if let Some(v4) = a.as_sockaddr_in() {
                    Some(IpAddr::V4(v4.ip()))
                } else {
                    a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                }
            })
            .collect())
    })
    .map_err(|e| e.to_string())
}

/// Scans `proc_root` (normally `/proc`) for the network namespace holding any of `ips`,
/// skipping the namespaces whose inodes are in `skip` (the node's own). `Ok(None)` when no
/// process lives in such a namespace.
pub fn find_netns(
    proc_root: &Path,
    ips: &[IpAddr],
    skip: &BTreeSet<u64>,
) -> std::io::Result<Option<FoundNetns>> {
    if ips.is_empty() {
        return Ok(None);
    }
    let mut seen: BTreeSet<u64> = skip.clone();
    for entry in std::fs::read_dir(proc_root)? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let path = proc_root.join(pid).join("ns/net");
        // Processes exit while we look: every failure here just skips the process.
        let Ok(file) = std::fs::File::open(&path) else {
            continue;
        };
        let Ok(meta) = file.metadata() else { continue };
        if !seen.insert(meta.ino()) {
            continue;
        }
        let fd = OwnedFd::from(file);
        let Ok(addresses) = addresses_in(&fd, &path.display().to_string()) else {
            continue;
        };
        if addresses.iter().any(|a| ips.contains(a)) {
            return Ok(Some(FoundNetns {
                path,
                inode: meta.ino(),
                fd,
            }));
        }
    }
    Ok(None)
}
