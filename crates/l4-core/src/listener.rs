//! Listening sockets: one `SO_REUSEPORT` socket per worker, so the kernel spreads new
//! connections over workers and no accept lock or cross-thread wake-up is needed.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Socket, Type};

/// Backlog asked for each listening socket (the kernel caps it at `somaxconn`).
pub const BACKLOG: i32 = 4096;

/// Binds `count` TCP listening sockets sharing one address with `SO_REUSEPORT`. When
/// `addr` has port 0, the first socket picks the port and the others join it.
pub fn bind_tcp(
    addr: SocketAddr,
    count: usize,
    freebind: bool,
) -> io::Result<Vec<std::net::TcpListener>> {
    reuseport_group(addr, count, Type::STREAM, freebind, |socket| {
        // Accepted sockets inherit TCP_NODELAY from the listener on Linux: set once here,
        // not once per connection.
        socket.set_tcp_nodelay(true)?;
        Ok(())
    })?
    .into_iter()
    .map(|socket| {
        socket.listen(BACKLOG)?;
        Ok(socket.into())
    })
    .collect()
}

/// Binds `count` UDP sockets sharing one address with `SO_REUSEPORT`; the kernel keeps
/// each client 4-tuple on one socket, so each worker owns its flows outright. Port 0 as
/// in [`bind_tcp`].
pub fn bind_udp(
    addr: SocketAddr,
    count: usize,
    freebind: bool,
) -> io::Result<Vec<std::net::UdpSocket>> {
    let sockets = reuseport_group(addr, count, Type::DGRAM, freebind, |socket| {
        // Room for bursts: a full default buffer drops datagrams before we see them.
        let _ = socket.set_recv_buffer_size(4 << 20);
        let _ = socket.set_send_buffer_size(4 << 20);
        Ok(())
    })?;
    Ok(sockets.into_iter().map(Into::into).collect())
}

/// `count` bound, non-blocking sockets of `kind` sharing `addr` through `SO_REUSEPORT`;
/// with port 0 the first picks the port and the others join it. `setup` runs before bind.
fn reuseport_group(
    addr: SocketAddr,
    count: usize,
    kind: Type,
    freebind: bool,
    setup: impl Fn(&Socket) -> io::Result<()>,
) -> io::Result<Vec<Socket>> {
    let mut sockets = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count.max(1) {
        let socket = Socket::new(Domain::for_address(addr), kind, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        if freebind {
            // A VIP that is not (yet) on an interface: a BGP-announced address that
            // keepalived or the routing daemon adds later, or one routed to this host.
            if addr.is_ipv6() {
                socket.set_freebind_v6(true)?;
            } else {
                socket.set_freebind_v4(true)?;
            }
        }
        setup(&socket)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        if addr.port() == 0 {
            addr = socket
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("socket has no address"))?;
        }
        sockets.push(socket);
    }
    Ok(sockets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_is_shared_by_every_worker_socket() {
        let sockets = bind_tcp("127.0.0.1:0".parse().unwrap(), 3, false).unwrap();
        let ports: Vec<u16> = sockets
            .iter()
            .map(|s| s.local_addr().unwrap().port())
            .collect();
        assert_ne!(ports[0], 0);
        assert!(ports.iter().all(|&p| p == ports[0]));
    }

    #[test]
    fn accepted_sockets_inherit_nodelay() {
        let listener = bind_tcp("127.0.0.1:0".parse().unwrap(), 1, false)
            .unwrap()
            .remove(0);
        listener.set_nonblocking(false).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
