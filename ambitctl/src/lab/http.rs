//! A minimal HTTP/1.0 GET from inside a network namespace (readiness checks).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

/// GETs `path` from `addr` with a socket created in `netns`; returns (status, body).
pub(super) fn get(netns: &str, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let fd: OwnedFd = std::fs::File::open(format!("/run/netns/{netns}"))
        .ok()?
        .into();
    let stream = ambit_redirect::in_netns(fd.as_fd(), netns, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(1))
            .map_err(|e| ("connect".to_string(), e))
    })
    .ok()?;
    let mut stream = stream;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}
