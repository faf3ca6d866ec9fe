//! Where ztunnel's sockets are born. In in-pod mode every socket of a pod (its listeners and the
//! connections made on its behalf) is created inside that pod's network namespace and carries the
//! packet mark the redirection rules exempt; in host mode (tests, a dedicated proxy) sockets are
//! ordinary. Proxies only see a [`SocketFactory`].

use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, OnceLock};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The mark on every socket ztunnel opens for a pod (`0x539`): the in-pod rules never redirect it.
pub const ZTUNNEL_MARK: u32 = 0x539;

/// Creates listeners and outgoing sockets in the right network namespace.
pub trait SocketFactory: Send + Sync + std::fmt::Debug {
    /// A listener on `addr`, with `SO_REUSEPORT` so a restarted ztunnel can bind beside the old.
    fn listener(&self, addr: SocketAddr) -> io::Result<TcpListener>;

    /// An unconnected socket for a connection to `dst`. With `source`, the socket is bound to
    /// that address even though it is not local (transparent + freebind), so the application sees
    /// the original client address.
    fn socket(&self, dst: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpSocket>;
}

/// Connects through `factory`, failing after `timeout`.
pub async fn connect(
    factory: &dyn SocketFactory,
    dst: SocketAddr,
    source: Option<IpAddr>,
    timeout: std::time::Duration,
) -> io::Result<TcpStream> {
    let socket = factory.socket(dst, source)?;
    let stream = tokio::time::timeout(timeout, socket.connect(dst))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {dst} timed out after {timeout:?}"),
            )
        })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sockets in ztunnel's own network namespace.
#[derive(Debug, Clone, Default)]
pub struct HostSockets {
    /// Mark to set, if any (needs CAP_NET_ADMIN).
    pub mark: Option<u32>,
    /// The address outgoing connections come from when no source is asked for: the pod's own
    /// address when one host carries several "pods" (tests, the dedicated mode), as a socket
    /// inside a pod's namespace would have naturally.
    pub local_ip: Option<IpAddr>,
}

impl SocketFactory for HostSockets {
    fn listener(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        new_listener(addr, self.mark)
    }

    fn socket(&self, dst: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpSocket> {
        match (source, self.local_ip) {
            (None, Some(local)) => {
                let socket = Socket::new(domain(&dst), Type::STREAM.nonblocking().cloexec(), None)?;
                if let Some(mark) = self.mark {
                    socket.set_mark(mark)?;
                }
                bind_source(&socket, local)?;
                Ok(TcpSocket::from_std_stream(socket.into()))
            }
            _ => new_socket(dst, source, self.mark),
        }
    }
}

/// Sockets inside a pod's network namespace, all marked with [`ZTUNNEL_MARK`].
#[derive(Debug, Clone)]
pub struct NetnsSockets {
    netns: Arc<OwnedFd>,
    mark: u32,
}

impl NetnsSockets {
    /// Sockets in the namespace `netns` refers to (a file descriptor ZDS handed over).
    pub fn new(netns: OwnedFd) -> Self {
        Self {
            netns: Arc::new(netns),
            mark: ZTUNNEL_MARK,
        }
    }

    /// The namespace's file descriptor.
    pub fn netns(&self) -> &OwnedFd {
        &self.netns
    }
}

impl SocketFactory for NetnsSockets {
    fn listener(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        in_netns(&self.netns, || new_listener(addr, Some(self.mark)))
    }

    fn socket(&self, dst: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpSocket> {
        in_netns(&self.netns, || new_socket(dst, source, Some(self.mark)))
    }
}

/// The namespace ztunnel started in, opened once, to return to after entering a pod's.
fn home_netns() -> io::Result<&'static File> {
    static HOME: OnceLock<Result<File, String>> = OnceLock::new();
    HOME.get_or_init(|| File::open("/proc/self/ns/net").map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| io::Error::other(format!("cannot open ztunnel's own network namespace: {e}")))
}

/// Runs `f` (socket creation only: no awaits, no blocking) with this thread inside `netns`.
/// Sockets keep the namespace they were created in, so the thread returns home at once.
pub fn in_netns<T>(netns: &OwnedFd, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let home = home_netns()?;
    setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
        io::Error::other(format!(
            "cannot enter the pod's network namespace (ztunnel needs CAP_SYS_ADMIN): {e}"
        ))
    })?;
    let result = f();
    if let Err(e) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
        // A worker thread left in a pod's namespace would put unrelated sockets there.
        panic!("cannot return to ztunnel's own network namespace: {e}");
    }
    result
}

fn domain(addr: &SocketAddr) -> Domain {
    if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    }
}

/// A listener whose accepted connections are already `TCP_NODELAY`: Linux copies the option from
/// the listening socket to each connection it accepts, saving a `setsockopt` per connection.
fn new_listener(addr: SocketAddr, mark: Option<u32>) -> io::Result<TcpListener> {
    let socket = Socket::new(domain(&addr), Type::STREAM.nonblocking().cloexec(), None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(mark) = mark {
        socket.set_mark(mark)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

fn new_socket(dst: SocketAddr, source: Option<IpAddr>, mark: Option<u32>) -> io::Result<TcpSocket> {
    let socket = Socket::new(domain(&dst), Type::STREAM.nonblocking().cloexec(), None)?;
    if let Some(mark) = mark {
        socket.set_mark(mark)?;
    }
    if let Some(source) = source {
        // Best effort: without CAP_NET_ADMIN only local source addresses can be bound.
        let _ = if source.is_ipv4() {
            socket
                .set_ip_transparent_v4(true)
                .and_then(|()| socket.set_freebind_v4(true))
        } else {
            socket
                .set_ip_transparent_v6(true)
                .and_then(|()| socket.set_freebind_v6(true))
        };
        bind_source(&socket, source)?;
    }
    Ok(TcpSocket::from_std_stream(socket.into()))
}

/// Binds an outgoing socket to `source` without choosing its port yet
/// (`IP_BIND_ADDRESS_NO_PORT`): the port is then picked at `connect`, where the kernel only needs
/// the 4-tuple to be unique. A plain `bind(source, 0)` must find a port no other socket on that
/// address uses, searching the bind table under a lock: with connection churn that search was
/// three quarters of ztunnel's CPU, and it limits a source address to one connection per port
/// across all destinations.
fn bind_source(socket: &Socket, source: IpAddr) -> io::Result<()> {
    // Linux 4.2 and later; where it is missing the bind below still works, only slower.
    let _ = nix::sys::socket::setsockopt(
        socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    );
    socket.bind(&SocketAddr::new(source, 0).into())
}

/// The destination a redirected connection from `peer` was originally addressed to
/// (`SO_ORIGINAL_DST`, asked in the address family of the connection, which is its peer's).
pub fn original_dst(stream: &TcpStream, peer: SocketAddr) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let addr = if peer.is_ipv4() {
        sock.original_dst_v4()?
    } else {
        sock.original_dst_v6()?
    };
    addr.as_socket()
        .ok_or_else(|| io::Error::other("original destination is not an IP address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_inherit_no_delay_from_the_listener() {
        let listener = HostSockets::default()
            .listener("127.0.0.1:0".parse().unwrap())
            .unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(
            accepted.nodelay().unwrap(),
            "accepted without Nagle's delay"
        );
        assert!(
            !client.nodelay().unwrap(),
            "the option is the listener's, not global"
        );
    }

    #[tokio::test]
    async fn a_source_bound_socket_takes_its_port_only_at_connect() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap();
        let factory = HostSockets::default();
        let mut ports = std::collections::HashSet::new();
        for _ in 0..3 {
            let socket = factory
                .socket(server, Some(IpAddr::from([127, 0, 0, 1])))
                .unwrap();
            assert_eq!(
                socket.local_addr().unwrap().port(),
                0,
                "bound with IP_BIND_ADDRESS_NO_PORT: no port reserved before connect"
            );
            let stream = socket.connect(server).await.unwrap();
            let local = stream.local_addr().unwrap();
            assert_eq!(local.ip(), IpAddr::from([127, 0, 0, 1]));
            assert!(ports.insert(local.port()), "each connection its own port");
            let _accepted = listener.accept().await.unwrap();
        }
    }
}
