//! The rule set in real network namespaces with real traffic: a "pod" namespace joined to a
//! "peer" namespace by a veth pair, stand-in ztunnel listeners in the pod, and assertions on
//! where each connection lands. Needs root; creates and deletes its own namespaces.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::process::Command;
use std::time::Duration;

use ambit_redirect::{RedirectConfig, describe, in_netns, install, is_installed, remove};
use socket2::{Domain, SockRef, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("iproute2 is installed");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Topology {
    pod: String,
    peer: String,
    subnet: u8,
}

impl Topology {
    fn new(subnet: u8) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "redirection tests need root (network namespaces, nftables); run sudo scripts/test"
        );
        let pid = std::process::id();
        let (pod, peer) = (
            format!("ambit-rp-{pid}-{subnet}"),
            format!("ambit-rq-{pid}-{subnet}"),
        );
        for ns in [&pod, &peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let (pv, qv) = (format!("rp{pid}x{subnet}"), format!("rq{pid}x{subnet}"));
        let (pv, qv) = (&pv[..pv.len().min(15)], &qv[..qv.len().min(15)]);
        ip(&[
            "-n", &pod, "link", "add", pv, "type", "veth", "peer", "name", qv, "netns", &peer,
        ]);
        ip(&[
            "-n",
            &pod,
            "addr",
            "add",
            &format!("10.199.{subnet}.2/24"),
            "dev",
            pv,
        ]);
        ip(&[
            "-n",
            &peer,
            "addr",
            "add",
            &format!("10.199.{subnet}.1/24"),
            "dev",
            qv,
        ]);
        ip(&["-n", &peer, "addr", "add", "169.254.7.127/32", "dev", qv]);
        ip(&["-n", &pod, "link", "set", pv, "up"]);
        ip(&["-n", &peer, "link", "set", qv, "up"]);
        ip(&[
            "-n",
            &pod,
            "route",
            "add",
            "default",
            "via",
            &format!("10.199.{subnet}.1"),
        ]);
        Self { pod, peer, subnet }
    }

    fn fd(ns: &str) -> OwnedFd {
        std::fs::File::open(format!("/run/netns/{ns}"))
            .unwrap()
            .into()
    }

    fn pod_ip(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 199, self.subnet, 2))
    }

    fn peer_ip(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 199, self.subnet, 1))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.pod, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A socket made inside `ns` by `make`.
fn socket_in(ns: &str, make: impl FnOnce() -> io::Result<Socket> + Send) -> Socket {
    let fd = Topology::fd(ns);
    in_netns(fd.as_fd(), ns, || {
        make().map_err(|e| ("socket".to_string(), e))
    })
    .unwrap()
}

fn listener_in(ns: &str, addr: SocketAddr) -> TcpListener {
    let socket = socket_in(ns, || {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.bind(&addr.into())?;
        s.listen(64)?;
        s.set_nonblocking(true)?;
        Ok(s)
    });
    TcpListener::from_std(socket.into()).unwrap()
}

/// Answers each connection with one line: `<tag> dst=<original destination> src=<peer>`.
fn serve(listener: TcpListener, tag: &'static str) {
    tokio::spawn(async move {
        while let Ok((mut stream, peer)) = listener.accept().await {
            let original = SockRef::from(&stream)
                .original_dst_v4()
                .ok()
                .and_then(|a| a.as_socket())
                .map(|a| a.to_string())
                .unwrap_or_else(|| stream.local_addr().unwrap().to_string());
            let _ = stream
                .write_all(format!("{tag} dst={original} src={}\n", peer.ip()).as_bytes())
                .await;
        }
    });
}

struct Connect {
    mark: Option<u32>,
    source: Option<IpAddr>,
}

async fn call(ns: &str, dst: SocketAddr, how: Connect) -> String {
    let socket = socket_in(ns, || {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        if let Some(mark) = how.mark {
            s.set_mark(mark)?;
        }
        if let Some(source) = how.source {
            s.set_ip_transparent_v4(true)?;
            s.set_freebind_v4(true)?;
            s.bind(&SocketAddr::new(source, 0).into())?;
        }
        Ok(s)
    });
    let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    let mut stream: TcpStream = tokio::time::timeout(Duration::from_secs(5), socket.connect(dst))
        .await
        .unwrap_or_else(|_| panic!("connect to {dst} from {ns} timed out"))
        .unwrap_or_else(|e| panic!("connect to {dst} from {ns}: {e}"));
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut line))
        .await
        .expect("answer within 5s")
        .unwrap();
    line.trim().to_string()
}

const PLAIN: Connect = Connect {
    mark: None,
    source: None,
};

#[tokio::test]
async fn redirects_as_istio_does_and_removal_restores_direct_traffic() {
    let t = Topology::new(61);
    let config = RedirectConfig::default();
    let any = |port| SocketAddr::from(([0, 0, 0, 0], port));
    serve(listener_in(&t.pod, any(15001)), "outbound");
    serve(listener_in(&t.pod, any(15006)), "inbound");
    serve(listener_in(&t.pod, any(15008)), "hbone");
    serve(listener_in(&t.pod, any(8080)), "app");
    serve(listener_in(&t.peer, any(9000)), "peer");
    let (pod, peer) = (t.pod_ip(), t.peer_ip());
    let pod_fd = Topology::fd(&t.pod);

    assert!(!is_installed(pod_fd.as_fd(), &t.pod).unwrap());
    install(pod_fd.as_fd(), &t.pod, &config).unwrap();
    install(pod_fd.as_fd(), &t.pod, &config).unwrap();
    let described = describe(pod_fd.as_fd(), &t.pod, &config).unwrap();
    assert!(
        described.contains("# live rules per chain: prerouting-mangle=1 output-route=1 prerouting-nat=2 output-nat=4"),
        "installing twice leaves one copy:\n{described}"
    );
    assert!(described.contains("redirect to :15001"), "{described}");

    // Outbound from the application lands on 15001 with its original destination.
    assert_eq!(
        call(&t.pod, SocketAddr::new(peer, 9000), PLAIN).await,
        format!("outbound dst={peer}:9000 src={pod}")
    );
    // Inbound to the application lands on 15006 with the client's address and the real port.
    assert_eq!(
        call(&t.peer, SocketAddr::new(pod, 8080), PLAIN).await,
        format!("inbound dst={pod}:8080 src={peer}")
    );
    // HBONE is not redirected.
    assert_eq!(
        call(&t.peer, SocketAddr::new(pod, 15008), PLAIN).await,
        format!("hbone dst={pod}:15008 src={peer}")
    );
    // ztunnel's own (marked) sockets go where they point.
    let marked = Connect {
        mark: Some(0x539),
        source: None,
    };
    assert_eq!(
        call(&t.pod, SocketAddr::new(peer, 9000), marked).await,
        format!("peer dst={peer}:9000 src={pod}")
    );
    // Kubelet probes (source 169.254.7.127) reach the application directly.
    let probe = Connect {
        mark: None,
        source: Some(IpAddr::V4(config.probe_v4)),
    };
    assert_eq!(
        call(&t.peer, SocketAddr::new(pod, 8080), probe).await,
        format!("app dst={pod}:8080 src=169.254.7.127")
    );
    // ztunnel's spoofed connection to the application: the app sees the client's address and
    // its replies come back to ztunnel's socket (connection mark + policy routing), not to the
    // real client.
    let spoofed = Connect {
        mark: Some(0x539),
        source: Some(peer),
    };
    assert_eq!(
        call(&t.pod, SocketAddr::new(pod, 8080), spoofed).await,
        format!("app dst={pod}:8080 src={peer}")
    );

    assert!(remove(pod_fd.as_fd(), &t.pod, &config).unwrap());
    assert!(
        !remove(pod_fd.as_fd(), &t.pod, &config).unwrap(),
        "second removal is a no-op"
    );
    assert!(!is_installed(pod_fd.as_fd(), &t.pod).unwrap());
    assert_eq!(
        call(&t.pod, SocketAddr::new(peer, 9000), PLAIN).await,
        format!("peer dst={peer}:9000 src={pod}"),
        "after removal traffic goes direct"
    );
    assert_eq!(
        call(&t.peer, SocketAddr::new(pod, 8080), PLAIN).await,
        format!("app dst={pod}:8080 src={peer}")
    );
}
