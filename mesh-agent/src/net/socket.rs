//! Listeners and connections, created in a network namespace ([`Netns`]) or the agent's own.
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};
use nix::{setsockopt_impl, sockopt_impl};
use socket2::{Domain, Socket};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::netns::Netns;

// `IPV6_TRANSPARENT`, which nix does not name: bind to an address that is not local (the original
// client's), as `IP_TRANSPARENT` does for IPv4.
sockopt_impl!(
    Ipv6Transparent,
    SetOnly,
    libc::SOL_IPV6,
    libc::IPV6_TRANSPARENT,
    bool
);

fn domain(addr: &SocketAddr) -> Domain {
    if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    }
}

/// A non-blocking TCP socket in `netns`, or in the agent's own namespace.
fn socket(netns: Option<&Netns>, domain: Domain) -> io::Result<Socket> {
    match netns {
        Some(netns) => netns.socket(domain),
        None => super::netns::tcp_socket(domain),
    }
}

/// Marks a socket as the proxy's own: the eBPF programs never redirect its connections.
pub fn mark(socket: &Socket) -> io::Result<()> {
    socket.set_mark(mesh_common::PROXY_MARK)
}

/// A listener on `addr`, with the proxy mark and `SO_REUSEPORT` (a new agent binds the same
/// ports while an old one drains).
pub fn listen(netns: Option<&Netns>, addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket(netns, domain(&addr))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    mark(&socket)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into()).map_err(|e| {
        let place = netns.map_or_else(
            || "the agent's network namespace".to_string(),
            |n| n.path().display().to_string(),
        );
        io::Error::new(e.kind(), format!("cannot bind {addr} in {place}: {e}"))
    })?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Connects to `dst` from `netns` (so the connection carries that namespace's address), with the
/// proxy mark.
pub async fn connect(
    netns: Option<&Netns>,
    dst: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = socket(netns, domain(&dst))?;
    mark(&socket)?;
    connect_socket(socket, dst, timeout).await
}

/// Connects to `dst` in `netns` as `source` (the original client, an address that is not local),
/// so the application sees who really called; see `inpod::routing` for how replies find their way
/// back. A source of the other family connects as the namespace's own address.
pub async fn connect_transparent(
    netns: Option<&Netns>,
    source: IpAddr,
    dst: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let source = source.to_canonical();
    if source.is_ipv4() != dst.is_ipv4() {
        return connect(netns, dst, timeout).await;
    }
    let socket = socket(netns, domain(&dst))?;
    if dst.is_ipv4() {
        setsockopt(&socket, sockopt::IpTransparent, &true)?;
    } else {
        setsockopt(&socket, Ipv6Transparent, &true)?;
    }
    socket.set_mark(mesh_common::INBOUND_MARK)?;
    // Let connect() pick the port for the full 4-tuple: a bind() to port 0 must find a port free
    // for *every* destination, a linear search that grew with connection churn (the largest cost
    // in the connection-rate benchmark).
    setsockopt(&socket, sockopt::IpBindAddressNoPort, &true)?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    connect_socket(socket, dst, timeout).await
}

async fn connect_socket(
    socket: Socket,
    dst: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    match tokio::time::timeout(timeout, socket.connect(dst)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => Err(io::Error::new(e.kind(), format!("connect to {dst}: {e}"))),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer from {dst} within {timeout:?}"),
        )),
    }
}

/// Closes with RST so the peer sees a failure at once, not a clean EOF. (A zero linger never
/// blocks: the kernel drops the socket's state and sends the reset immediately.)
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listen_and_connect_in_the_agents_namespace_carry_the_mark() {
        let listener = listen(None, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = connect(None, addr, Duration::from_secs(5)).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        for s in [
            socket2::SockRef::from(&client),
            socket2::SockRef::from(&listener),
        ] {
            assert_eq!(s.mark().unwrap(), mesh_common::PROXY_MARK);
        }
        drop(server);
        let e = listen(None, addr).err();
        // SO_REUSEPORT: a second listener on the same port is allowed (an upgrade's new agent).
        assert!(e.is_none(), "{e:?}");
    }

    #[tokio::test]
    async fn a_connect_that_fails_names_the_destination() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let e = connect(None, addr, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            e.to_string().starts_with(&format!("connect to {addr}: ")),
            "{e}"
        );
    }
}
