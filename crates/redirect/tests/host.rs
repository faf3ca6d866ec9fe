//! The node-side probe SNAT in real namespaces with real traffic: a "node" namespace routing
//! between two "pod" namespaces over veth pairs, the in-pod rules in one pod with stand-in
//! ztunnel listeners, and the host table in the node. Needs root; namespaces are prefixed `ahp-`.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::process::Command;
use std::time::Duration;

use ambit_redirect::host::{self, HostRemoval};
use ambit_redirect::{RedirectConfig, in_netns, install, remove};
use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

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

/// node <-> pod (10.198.<s>.0/30), node <-> other (10.198.<s>.4/30).
struct Topology {
    node: String,
    pod: String,
    other: String,
    subnet: u8,
}

impl Topology {
    fn new(subnet: u8) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "host probe tests need root (network namespaces, nftables); run sudo scripts/test"
        );
        let pid = std::process::id();
        let name = |role: &str| format!("ahp-{role}-{pid}-{subnet}");
        let t = Self {
            node: name("node"),
            pod: name("pod"),
            other: name("other"),
            subnet,
        };
        for ns in [&t.node, &t.pod, &t.other] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&[
            "netns",
            "exec",
            &t.node,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        for (peer, base) in [(&t.pod, 0u8), (&t.other, 4u8)] {
            let (a, b) = (format!("ahn{subnet}x{base}"), format!("ahp{subnet}x{base}"));
            ip(&[
                "-n", &t.node, "link", "add", &a, "type", "veth", "peer", "name", &b, "netns", peer,
            ]);
            let node_ip = format!("10.198.{subnet}.{}", base + 1);
            ip(&[
                "-n",
                &t.node,
                "addr",
                "add",
                &format!("{node_ip}/30"),
                "dev",
                &a,
            ]);
            ip(&[
                "-n",
                peer,
                "addr",
                "add",
                &format!("10.198.{subnet}.{}/30", base + 2),
                "dev",
                &b,
            ]);
            ip(&["-n", &t.node, "link", "set", &a, "up"]);
            ip(&["-n", peer, "link", "set", &b, "up"]);
            ip(&["-n", peer, "route", "add", "default", "via", &node_ip]);
        }
        t
    }

    fn fd(ns: &str) -> OwnedFd {
        std::fs::File::open(format!("/run/netns/{ns}"))
            .unwrap()
            .into()
    }

    fn pod_ip(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 198, self.subnet, 2))
    }
    fn node_ip(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 198, self.subnet, 1))
    }
    fn other_ip(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 198, self.subnet, 6))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.node, &self.pod, &self.other] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn socket_in(ns: &str, make: impl FnOnce() -> io::Result<Socket> + Send) -> Socket {
    let fd = Topology::fd(ns);
    in_netns(fd.as_fd(), ns, || {
        make().map_err(|e| ("socket".to_string(), e))
    })
    .unwrap()
}

/// Answers each connection with `<tag> src=<peer>`.
fn serve(ns: &str, port: u16, tag: &'static str) {
    let socket = socket_in(ns, || {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
        s.listen(64)?;
        s.set_nonblocking(true)?;
        Ok(s)
    });
    let listener = TcpListener::from_std(socket.into()).unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, peer)) = listener.accept().await {
            let _ = stream
                .write_all(format!("{tag} src={}\n", peer.ip()).as_bytes())
                .await;
        }
    });
}

async fn call(ns: &str, dst: SocketAddr) -> String {
    let socket = socket_in(ns, || Socket::new(Domain::IPV4, Type::STREAM, None));
    let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    let mut stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(dst))
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

#[tokio::test]
async fn node_connections_to_captured_pods_arrive_from_the_probe_address() {
    let t = Topology::new(71);
    let config = RedirectConfig::default();
    serve(&t.pod, 15006, "ztunnel-inbound");
    serve(&t.pod, 8080, "app");
    let (pod, node, other) = (t.pod_ip(), t.node_ip(), t.other_ip());
    let app = SocketAddr::new(pod, 8080);
    let (node_fd, pod_fd) = (Topology::fd(&t.node), Topology::fd(&t.pod));

    // Capture the pod, as the agent does: in-pod rules, then its IP in the node's set.
    install(pod_fd.as_fd(), &t.pod, &config).unwrap();
    assert_eq!(host::list(node_fd.as_fd(), &t.node).unwrap(), None);
    host::install(node_fd.as_fd(), &t.node, &config).unwrap();
    host::add(node_fd.as_fd(), &t.node, &config, &[pod]).unwrap();
    host::add(node_fd.as_fd(), &t.node, &config, &[pod]).unwrap();
    host::install(node_fd.as_fd(), &t.node, &config).unwrap();
    assert_eq!(
        host::list(node_fd.as_fd(), &t.node).unwrap(),
        Some(vec![pod]),
        "adding twice and re-installing (an agent restart) keep one entry"
    );

    // The node's own connection (a kubelet probe) reaches the application from 169.254.7.127,
    // bypassing ztunnel; another pod's connection is captured with its own address.
    assert_eq!(call(&t.node, app).await, "app src=169.254.7.127");
    assert_eq!(
        call(&t.other, app).await,
        format!("ztunnel-inbound src={other}")
    );
    // The node's connections to pods outside the set keep their source.
    serve(&t.other, 9000, "other");
    assert_eq!(
        call(&t.node, SocketAddr::new(other, 9000)).await,
        "other src=10.198.71.5"
    );

    // Without the set entry the in-pod rules capture the node's connection like any other.
    host::remove(node_fd.as_fd(), &t.node, &[pod]).unwrap();
    host::remove(node_fd.as_fd(), &t.node, &[pod]).unwrap();
    assert_eq!(
        call(&t.node, app).await,
        format!("ztunnel-inbound src={node}")
    );

    // A restart's resync: exactly the captured pods, atomically.
    let stale: IpAddr = "10.198.71.200".parse().unwrap();
    host::add(node_fd.as_fd(), &t.node, &config, &[stale]).unwrap();
    host::sync(node_fd.as_fd(), &t.node, &config, &[pod]).unwrap();
    assert_eq!(
        host::list(node_fd.as_fd(), &t.node).unwrap(),
        Some(vec![pod])
    );
    assert_eq!(call(&t.node, app).await, "app src=169.254.7.127");
    assert_eq!(
        host::remove_if_empty(node_fd.as_fd(), &t.node).unwrap(),
        HostRemoval::Kept(vec![pod]),
        "the table stays while a captured pod needs it"
    );

    // Release: in-pod rules and the set entry go; the node's connection arrives as itself.
    remove(pod_fd.as_fd(), &t.pod, &config).unwrap();
    host::remove(node_fd.as_fd(), &t.node, &[pod]).unwrap();
    assert_eq!(call(&t.node, app).await, format!("app src={node}"));
    assert_eq!(
        host::remove_if_empty(node_fd.as_fd(), &t.node).unwrap(),
        HostRemoval::Removed
    );
    assert_eq!(
        host::remove_if_empty(node_fd.as_fd(), &t.node).unwrap(),
        HostRemoval::Absent
    );
    assert_eq!(host::list(node_fd.as_fd(), &t.node).unwrap(), None);
}

#[tokio::test]
async fn ipv6_entries_and_the_rule_text() {
    let t = Topology::new(72);
    let config = RedirectConfig::default();
    let node_fd = Topology::fd(&t.node);
    let v6: IpAddr = "fd00:198::2".parse().unwrap();
    host::add(node_fd.as_fd(), &t.node, &config, &[t.pod_ip(), v6]).unwrap();
    assert_eq!(
        host::list(node_fd.as_fd(), &t.node).unwrap(),
        Some(vec![t.pod_ip(), v6])
    );
    host::remove(node_fd.as_fd(), &t.node, &[v6, t.pod_ip()]).unwrap();
    assert_eq!(
        host::remove_if_empty(node_fd.as_fd(), &t.node).unwrap(),
        HostRemoval::Removed
    );
    let text = host::ruleset_text(&config);
    assert!(
        text.contains(
            "ip daddr @pods-v4 meta l4proto tcp meta skuid != 4294967295 snat ip to 169.254.7.127"
        ),
        "{text}"
    );
    assert!(
        text.contains("snat ip6 to fd16:9254:7127:1337:ffff:ffff:ffff:ffff"),
        "{text}"
    );
}
