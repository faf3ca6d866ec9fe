//! Starts the real `ambit-echo serve` binary on a free loopback port and stops it on drop.

#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A running `ambit-echo serve` (HTTP/gRPC port only); killed when dropped.
pub(crate) struct Echo {
    child: Child,
    /// Where its HTTP/gRPC port listens.
    pub(crate) addr: SocketAddr,
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn command(port: u16, env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ambit-echo"));
    command
        .args([
            "serve",
            "--tcp-port",
            "0",
            "--sink-port",
            "0",
            "--http-port",
        ])
        .arg(port.to_string())
        .env_remove("ECHO_STATUS")
        .env_remove("ECHO_DELAY_MS")
        .env_remove("ECHO_FAIL_FRACTION")
        .env_remove("ECHO_FAIL_STATUS")
        .env("POD_NAME", "echo-test")
        .env("POD_NAMESPACE", "testns")
        .env("NODE_NAME", "node-test")
        .env("VERSION", "v7")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

impl Echo {
    /// Starts the server with extra environment; retries on another port if the chosen one was
    /// taken between choosing and binding.
    pub(crate) fn start(env: &[(&str, &str)]) -> Echo {
        for _ in 0..5 {
            let port = free_port();
            let mut child = command(port, env).spawn().expect("ambit-echo starts");
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if TcpStream::connect(addr).is_ok() {
                    return Echo { child, addr };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("ambit-echo serve did not start listening on a loopback port in five tries");
    }

    /// Runs `serve` expecting it to refuse its configuration; returns its output.
    pub(crate) fn refuse(env: &[(&str, &str)]) -> Output {
        let mut child = command(free_port(), env)
            .spawn()
            .expect("ambit-echo starts");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = child.try_wait() {
                return child.wait_with_output().expect("output");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("ambit-echo serve kept running with a bad configuration {env:?}");
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
