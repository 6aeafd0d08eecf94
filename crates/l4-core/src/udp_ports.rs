//! Local ports for UDP flow sockets, shared across backends.
//!
//! Each flow has its own socket connected to its backend. Binding each to a port of its
//! own would cap flows at the local port range (about 28,000 on a default Linux), long
//! before `max_flows`. A connected UDP socket is told apart by its whole 4-tuple, so one
//! local port can serve one flow per backend: the book hands out a local port this worker
//! already holds whenever that port is not yet connected to the flow's backend, and binds
//! a fresh one only when none is free. Each configured `source` address adds a full range.
//!
//! A fresh port is bound without `SO_REUSEADDR`, so the kernel gives one no socket of any
//! process uses; `SO_REUSEADDR` is set right after, so this worker's later sockets to
//! other backends can share it. A pair (local port, backend) is given back only when its
//! socket is closed, never while a socket that could still receive its replies is open.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Deref;

use crossbeam::channel::{unbounded, Receiver, Sender};
use socket2::{Domain, Socket, Type};
use tokio::net::UdpSocket;

/// Held ports looked at for a free pairing before binding a fresh port.
const SCAN: usize = 32;

/// A flow's socket and its claim on (local port, backend), released when it closes.
#[derive(Debug)]
pub(crate) struct FlowSocket {
    // Declared first, so it is closed before the lease is given back.
    socket: UdpSocket,
    _lease: Lease,
}

impl Deref for FlowSocket {
    type Target = UdpSocket;
    fn deref(&self) -> &UdpSocket {
        &self.socket
    }
}

#[derive(Debug)]
struct Lease {
    local: SocketAddr,
    backend: SocketAddr,
    released: Sender<(SocketAddr, SocketAddr)>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = self.released.send((self.local, self.backend));
    }
}

/// One worker's local ports.
#[derive(Debug)]
pub(crate) struct PortBook {
    /// Configured source addresses; empty means the wildcard of the backend's family.
    sources: Vec<IpAddr>,
    next_source: usize,
    /// Local addresses held by at least one flow socket, for reuse scans, and where each
    /// stands in that list (so a release is O(1)).
    held: Vec<SocketAddr>,
    held_at: HashMap<SocketAddr, usize>,
    users: HashMap<SocketAddr, u32>,
    /// (local, backend) pairs with an open socket.
    taken: HashSet<(SocketAddr, SocketAddr)>,
    cursor: usize,
    released_tx: Sender<(SocketAddr, SocketAddr)>,
    released_rx: Receiver<(SocketAddr, SocketAddr)>,
}

impl PortBook {
    pub(crate) fn new(sources: Vec<IpAddr>) -> Self {
        let (released_tx, released_rx) = unbounded();
        PortBook {
            sources,
            next_source: 0,
            held: Vec::new(),
            held_at: HashMap::new(),
            users: HashMap::new(),
            taken: HashSet::new(),
            cursor: 0,
            released_tx,
            released_rx,
        }
    }

    /// New source addresses (a reload): fresh ports come from them; ports held stay
    /// until their flows end.
    pub(crate) fn set_sources(&mut self, sources: Vec<IpAddr>) {
        self.sources = sources;
    }

    /// Local ports held now.
    #[cfg(test)]
    pub(crate) fn ports_held(&self) -> usize {
        self.held.len()
    }

    /// Opens a non-blocking UDP socket connected to `backend` on a local port not yet
    /// connected to it.
    pub(crate) fn open(&mut self, backend: SocketAddr) -> io::Result<FlowSocket> {
        self.collect_released();
        // A held port qualifies if it is of the backend's family and from a source the
        // config still has (a reload may have removed one).
        let sources = &self.sources;
        let same_family = |local: &SocketAddr| {
            local.is_ipv4() == backend.is_ipv4()
                && if sources.is_empty() {
                    local.ip().is_unspecified()
                } else {
                    sources.contains(&local.ip())
                }
        };
        // 1. A port this worker holds that is not paired with `backend` yet.
        let scan = SCAN.min(self.held.len());
        for _ in 0..scan {
            let local = self.held[self.cursor % self.held.len()];
            self.cursor = self.cursor.wrapping_add(1);
            if same_family(&local) && !self.taken.contains(&(local, backend)) {
                if let Ok(socket) = bind_shared(local, backend) {
                    return Ok(self.register(local, backend, socket));
                }
            }
        }
        // 2. A fresh port from one of the sources, in turn.
        let sources: Vec<IpAddr> = if self.sources.is_empty() {
            vec![wildcard(backend)]
        } else {
            self.sources.clone()
        };
        let mut last_error = io::Error::from_raw_os_error(libc::EADDRNOTAVAIL);
        for _ in 0..sources.len() {
            let source = sources[self.next_source % sources.len()];
            self.next_source = self.next_source.wrapping_add(1);
            if source.is_ipv4() != backend.is_ipv4() {
                continue;
            }
            match bind_fresh(source, backend) {
                Ok((local, socket)) => return Ok(self.register(local, backend, socket)),
                Err(e) if ports_exhausted(&e) => last_error = e,
                Err(e) => return Err(e),
            }
        }
        // 3. Every source's range is spent: any held port still free for this backend.
        let free = self
            .held
            .iter()
            .copied()
            .find(|local| same_family(local) && !self.taken.contains(&(*local, backend)));
        match free {
            Some(local) => {
                let socket = bind_shared(local, backend)?;
                Ok(self.register(local, backend, socket))
            }
            None => Err(last_error),
        }
    }

    fn register(
        &mut self,
        local: SocketAddr,
        backend: SocketAddr,
        socket: UdpSocket,
    ) -> FlowSocket {
        self.taken.insert((local, backend));
        let users = self.users.entry(local).or_insert(0);
        if *users == 0 {
            self.held_at.insert(local, self.held.len());
            self.held.push(local);
        }
        *users += 1;
        FlowSocket {
            socket,
            _lease: Lease {
                local,
                backend,
                released: self.released_tx.clone(),
            },
        }
    }

    /// Forgets the pairs whose sockets have closed since the last call.
    fn collect_released(&mut self) {
        while let Ok((local, backend)) = self.released_rx.try_recv() {
            self.taken.remove(&(local, backend));
            if let Some(users) = self.users.get_mut(&local) {
                *users -= 1;
                if *users == 0 {
                    self.users.remove(&local);
                    if let Some(i) = self.held_at.remove(&local) {
                        self.held.swap_remove(i);
                        if let Some(&moved) = self.held.get(i) {
                            self.held_at.insert(moved, i);
                        }
                    }
                }
            }
        }
    }
}

fn wildcard(backend: SocketAddr) -> IpAddr {
    match backend {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

fn ports_exhausted(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EADDRINUSE) | Some(libc::EAGAIN) | Some(libc::EADDRNOTAVAIL)
    )
}

fn new_socket(backend: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(backend), Type::DGRAM.cloexec(), None)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn into_tokio(socket: Socket) -> io::Result<UdpSocket> {
    UdpSocket::from_std(socket.into())
}

/// A port of `source` no socket uses, made shareable once bound.
fn bind_fresh(source: IpAddr, backend: SocketAddr) -> io::Result<(SocketAddr, UdpSocket)> {
    let socket = new_socket(backend)?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    let local = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::from(io::ErrorKind::AddrNotAvailable))?;
    socket.set_reuse_address(true)?;
    socket.connect(&backend.into())?;
    Ok((local, into_tokio(socket)?))
}

/// A second socket on `local`, which this worker holds with `SO_REUSEADDR`.
fn bind_shared(local: SocketAddr, backend: SocketAddr) -> io::Result<UdpSocket> {
    let socket = new_socket(backend)?;
    socket.set_reuse_address(true)?;
    socket.bind(&local.into())?;
    socket.connect(&backend.into())?;
    into_tokio(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_local_port_serves_one_flow_per_backend_and_replies_find_their_flow() {
        let mut book = PortBook::new(vec!["127.0.0.1".parse().unwrap()]);
        let backends: Vec<std::net::UdpSocket> = (0..3)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let flows: Vec<FlowSocket> = backends
            .iter()
            .map(|b| book.open(b.local_addr().unwrap()).unwrap())
            .collect();
        assert_eq!(book.ports_held(), 1, "three backends share one port");
        let local = flows[0].local_addr().unwrap();
        for (i, (flow, backend)) in flows.iter().zip(&backends).enumerate() {
            assert_eq!(flow.local_addr().unwrap().port(), local.port());
            backend.send_to(&[i as u8], local).unwrap();
            let mut buf = [0u8; 4];
            let n = flow.recv(&mut buf).await.unwrap();
            assert_eq!(
                &buf[..n],
                &[i as u8],
                "each reply reaches the flow of its backend"
            );
        }
        // A second flow to the same backend needs another port.
        let again = book.open(backends[0].local_addr().unwrap()).unwrap();
        assert_ne!(again.local_addr().unwrap().port(), local.port());
        assert_eq!(book.ports_held(), 2);
        drop(flows);
        drop(again);
        book.collect_released();
        assert_eq!(
            book.ports_held(),
            0,
            "ports are given back when their sockets close"
        );
    }
}
