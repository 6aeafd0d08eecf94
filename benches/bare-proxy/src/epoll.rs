//! epoll as nginx uses it: every socket is registered once, edge-triggered, for reading and
//! writing, and its `close` removes it; readiness is remembered per socket and cleared only
//! when a call answers EAGAIN (or a short read drains a socket whose end has not been seen),
//! so no call is made that is known to block.

use std::os::fd::RawFd;

use crate::slots::{Buffers, Slots};
use crate::{backend_socket, errno, wait_events, BUFFER};

const LISTENER: u64 = u64::MAX;

/// Direction d moves bytes read from `fds[d]` to `fds[1 - d]` (0: client to backend).
struct Conn {
    fds: [RawFd; 2],
    bufs: Buffers,
    len: [usize; 2],
    sent: [usize; 2],
    /// Per socket: it may have bytes or its end to read / room to write.
    readable: [bool; 2],
    writable: [bool; 2],
    /// Per socket: the reactor has seen its end, so a short read has not drained it.
    hung_up: [bool; 2],
    /// Per direction: its end was read / passed on with a shutdown.
    eof: [bool; 2],
    ended: [bool; 2],
}

pub struct Worker {
    epoll: RawFd,
    listener: RawFd,
    backends: Vec<libc::sockaddr_in>,
    next_backend: usize,
    conns: Slots<Conn>,
}

impl Worker {
    pub fn new(listener: RawFd, backends: Vec<libc::sockaddr_in>) -> Self {
        // SAFETY: plain epoll_create1(2).
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(
            epoll >= 0,
            "epoll_create1: {}",
            std::io::Error::last_os_error()
        );
        let worker = Worker {
            epoll,
            listener,
            backends,
            next_backend: 0,
            conns: Slots::new(),
        };
        assert!(
            worker.register(listener, libc::EPOLLIN as u32, LISTENER),
            "epoll_ctl listener"
        );
        worker
    }

    fn register(&self, fd: RawFd, events: u32, data: u64) -> bool {
        let mut event = libc::epoll_event { events, u64: data };
        // SAFETY: epoll_ctl with a valid event struct.
        unsafe { libc::epoll_ctl(self.epoll, libc::EPOLL_CTL_ADD, fd, &mut event) == 0 }
    }

    fn accept_all(&mut self) {
        loop {
            // SAFETY: accept4 without an address; the descriptor is owned from here.
            let client = unsafe {
                libc::accept4(
                    self.listener,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if client < 0 {
                return;
            }
            let backend = backend_socket(libc::SOCK_NONBLOCK);
            let addr = &self.backends[self.next_backend % self.backends.len()];
            self.next_backend += 1;
            // SAFETY: connect with a sockaddr_in that outlives the call.
            let connected = backend >= 0
                && (unsafe {
                    libc::connect(
                        backend,
                        (addr as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                } == 0
                    || errno() == libc::EINPROGRESS);
            if !connected {
                close_all(&[client, backend]);
                continue;
            }
            let bufs = self.conns.buffers();
            let conn = Conn {
                fds: [client, backend],
                bufs,
                len: [0; 2],
                sent: [0; 2],
                readable: [false; 2],
                writable: [false; 2],
                hung_up: [false; 2],
                eof: [false; 2],
                ended: [false; 2],
            };
            let id = self.conns.insert(conn);
            let interest =
                (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
            let generation = u64::from(self.conns.generation(id).unwrap_or(0)) << 32;
            let registered = (0..2).all(|side| {
                self.register(
                    [client, backend][side],
                    interest,
                    generation | ((id as u64) << 1) | side as u64,
                )
            });
            if !registered {
                self.release(id);
            }
        }
    }

    fn release(&mut self, id: usize) {
        if let Some(conn) = self.conns.remove(id) {
            close_all(&conn.fds);
            self.conns.recycle(conn.bufs);
        }
    }

    fn event(&mut self, data: u64, events: u32) {
        if data == LISTENER {
            self.accept_all();
            return;
        }
        let (generation, id, side) = (
            (data >> 32) as u32,
            (data as u32 >> 1) as usize,
            (data & 1) as usize,
        );
        if self.conns.generation(id) != Some(generation) {
            return;
        }
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        let (inp, out, hup, rdhup, err) = (
            libc::EPOLLIN as u32,
            libc::EPOLLOUT as u32,
            libc::EPOLLHUP as u32,
            libc::EPOLLRDHUP as u32,
            libc::EPOLLERR as u32,
        );
        if events & (inp | rdhup | hup | err) != 0 {
            conn.readable[side] = true;
        }
        if events & (rdhup | hup | err) != 0 {
            conn.hung_up[side] = true;
        }
        if events & (out | hup | err) != 0 {
            conn.writable[side] = true;
        }
        let ok = pump(conn, 0) && pump(conn, 1);
        if !ok || conn.ended == [true, true] {
            self.release(id);
        }
    }

    pub fn run(mut self) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
        loop {
            let n = wait_events(self.epoll, &mut events);
            for event in &events[..n] {
                let (data, flags) = (event.u64, event.events);
                self.event(data, flags);
            }
        }
    }
}

/// Moves what direction d can move without blocking; false on an error (the connection is
/// then closed).
fn pump(conn: &mut Conn, d: usize) -> bool {
    let (src, dst) = (conn.fds[d], conn.fds[1 - d]);
    loop {
        if conn.sent[d] < conn.len[d] {
            if !conn.writable[1 - d] {
                return true;
            }
            let rest = &conn.bufs[d][conn.sent[d]..conn.len[d]];
            // SAFETY: send from a live buffer of `rest.len()` bytes.
            let n =
                unsafe { libc::send(dst, rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL) };
            if n < 0 {
                if errno() != libc::EAGAIN {
                    return false;
                }
                conn.writable[1 - d] = false;
                return true;
            }
            conn.sent[d] += n as usize;
            continue;
        }
        if conn.eof[d] {
            if !conn.ended[d] {
                // SAFETY: shutdown of a descriptor the connection owns.
                unsafe { libc::shutdown(dst, libc::SHUT_WR) };
                conn.ended[d] = true;
            }
            return true;
        }
        if !conn.readable[d] {
            return true;
        }
        // SAFETY: recv into a live buffer of BUFFER bytes.
        let n = unsafe { libc::recv(src, conn.bufs[d].as_mut_ptr().cast(), BUFFER, 0) };
        if n > 0 {
            conn.len[d] = n as usize;
            conn.sent[d] = 0;
            if (n as usize) < BUFFER && !conn.hung_up[d] {
                // Drained: a later arrival is a new edge.
                conn.readable[d] = false;
            }
        } else if n == 0 {
            conn.eof[d] = true;
        } else if errno() == libc::EAGAIN {
            conn.readable[d] = false;
            return true;
        } else {
            return false;
        }
    }
}

fn close_all(fds: &[RawFd]) {
    for &fd in fds {
        if fd >= 0 {
            // SAFETY: the descriptors are owned by the caller and not used after this;
            // close also removes them from the epoll set.
            unsafe { libc::close(fd) };
        }
    }
}
