//! The io_uring experiment of issue 15: the least a TCP proxy can do per connection, once
//! with every socket operation submitted through io_uring (`uring`), once with epoll
//! readiness as nginx uses it (`epoll`: edge-triggered, each socket registered once and
//! removed by its `close`), so that io_uring's part of any gain is told apart from the part
//! that comes from doing little.
//!
//! One thread per worker, each with its own SO_REUSEPORT listener. Backends are taken in
//! round robin. Each direction moves bytes through a 16 KiB buffer; a peer's end becomes a
//! `shutdown(SHUT_WR)` of the other side, and both sockets are closed when both directions
//! have ended or either failed.
//!
//! It has none of what makes l4lb a product (no health, logging, metrics, timeouts, limits,
//! reload): it measures the ceiling of each design on this machine, so that the verdict
//! does not depend on how much of l4lb would have to be rewritten to get it.
//!
//! `udp` and `udp-mmsg` do the same for UDP datagrams (see udp.rs), beside one epoll TCP
//! worker on the same port for iperf3's control connection.
//!
//! Usage: bare-proxy <uring|epoll|udp|udp-mmsg> <workers> <listen-port> <backend-port>...

mod epoll;
mod slots;
mod udp;
mod uring;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{IntoRawFd, RawFd};

const BUFFER: usize = 16 * 1024;

fn listener(port: u16, nonblocking: bool) -> RawFd {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    socket.set_reuse_port(true).expect("SO_REUSEPORT");
    // Accepted sockets inherit it.
    socket.set_tcp_nodelay(true).expect("TCP_NODELAY");
    socket.set_nonblocking(nonblocking).expect("O_NONBLOCK");
    socket
        .bind(&SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into())
        .expect("bind");
    socket.listen(4096).expect("listen");
    socket.into_raw_fd()
}

/// A TCP socket for a backend, with TCP_NODELAY; -1 if none could be made.
fn backend_socket(flags: libc::c_int) -> RawFd {
    // SAFETY: plain socket(2); the caller owns the descriptor.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | flags,
            0,
        )
    };
    if fd >= 0 {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt with a valid int option value.
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
    fd
}

fn sockaddr(port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(Ipv4Addr::LOCALHOST).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Waits for events on `epoll`; how many were written to `events` (0 when a signal, strace
/// attaching say, interrupted the wait: nothing is lost).
fn wait_events(epoll: RawFd, events: &mut [libc::epoll_event]) -> usize {
    // SAFETY: the buffer holds `events.len()` entries.
    let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, -1) };
    if n < 0 {
        assert_eq!(errno(), libc::EINTR, "epoll_wait");
        return 0;
    }
    n as usize
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let modes = ["uring", "epoll", "udp", "udp-mmsg"];
    if args.len() < 4 || !modes.contains(&args[0].as_str()) {
        eprintln!("usage: bare-proxy <uring|epoll|udp|udp-mmsg> <workers> <listen-port> <backend-port>...");
        std::process::exit(2);
    }
    if args[0].starts_with("udp") {
        return udp_main(&args);
    }
    let uring = args[0] == "uring";
    let workers: usize = args[1].parse().expect("workers");
    let port: u16 = args[2].parse().expect("listen port");
    let backends: Vec<u16> = args[3..]
        .iter()
        .map(|p| p.parse().expect("backend port"))
        .collect();
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let backends: Vec<_> = backends.iter().map(|&p| sockaddr(p)).collect();
            let listener = listener(port, !uring);
            std::thread::spawn(move || {
                if uring {
                    uring::Worker::new(listener, backends).run()
                } else {
                    epoll::Worker::new(listener, backends).run()
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("worker");
    }
}

/// UDP workers, and one TCP worker for iperf3's control connection on the same port.
fn udp_main(args: &[String]) {
    let send = if args[0] == "udp" {
        udp::Send::Gso
    } else {
        udp::Send::Mmsg
    };
    let workers: usize = args[1].parse().expect("workers");
    let port: u16 = args[2].parse().expect("listen port");
    let backend = sockaddr(args[3].parse().expect("backend port"));
    let control = listener(port, true);
    let mut threads = vec![std::thread::spawn(move || {
        epoll::Worker::new(control, vec![backend]).run()
    })];
    threads.extend((0..workers).map(|_| {
        let worker = udp::Worker::new(port, backend, send);
        std::thread::spawn(move || worker.run())
    }));
    for t in threads {
        t.join().expect("worker");
    }
}
