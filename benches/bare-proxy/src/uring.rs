//! io_uring: a multishot accept yields connections; each gets a backend socket, a connect
//! linked to the first receive from the client, then a receive/send loop per direction.
//! The ring is SINGLE_ISSUER + DEFER_TASKRUN: completions run only when the worker asks.

use std::os::fd::RawFd;

use io_uring::{cqueue, opcode, squeue, types::Fd, IoUring};

use crate::slots::{Buffers, Slots};
use crate::{backend_socket, BUFFER};

#[derive(Clone, Copy)]
#[repr(u64)]
enum Op {
    Accept = 0,
    Connect = 1,
    Recv0 = 2,
    Recv1 = 3,
    Send0 = 4,
    Send1 = 5,
    Shutdown0 = 6,
    Shutdown1 = 7,
    Close = 8,
}

fn tag(conn: usize, op: Op) -> u64 {
    ((conn as u64) << 4) | op as u64
}

/// Direction d moves bytes read from `fds[d]` to `fds[1 - d]` (0: client to backend).
struct Conn {
    fds: [RawFd; 2],
    bufs: Buffers,
    len: [usize; 2],
    sent: [usize; 2],
    ended: [bool; 2],
    in_flight: u32,
    aborted: bool,
    closing: bool,
}

pub struct Worker {
    ring: IoUring,
    listener: RawFd,
    backends: Vec<libc::sockaddr_in>,
    next_backend: usize,
    conns: Slots<Conn>,
}

impl Worker {
    fn push(&mut self, entry: squeue::Entry) {
        // SAFETY: every buffer and address an entry points to lives in `self.conns` or
        // `self.backends` until its completion has been reaped: a connection is freed only
        // when nothing of it is in flight.
        while unsafe { self.ring.submission().push(&entry) }.is_err() {
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => panic!("io_uring_enter: {e}"),
            }
        }
    }

    fn arm_accept(&mut self) {
        let entry = opcode::AcceptMulti::new(Fd(self.listener))
            .build()
            .user_data(tag(0, Op::Accept));
        self.push(entry);
    }

    fn recv(&mut self, id: usize, d: usize) {
        let conn = self.conns.get_mut(id).expect("live connection");
        conn.in_flight += 1;
        let entry = opcode::Recv::new(Fd(conn.fds[d]), conn.bufs[d].as_mut_ptr(), BUFFER as u32)
            .build()
            .user_data(tag(id, if d == 0 { Op::Recv0 } else { Op::Recv1 }));
        self.push(entry);
    }

    fn send(&mut self, id: usize, d: usize) {
        let conn = self.conns.get_mut(id).expect("live connection");
        conn.in_flight += 1;
        let rest = &conn.bufs[d][conn.sent[d]..conn.len[d]];
        let entry = opcode::Send::new(Fd(conn.fds[1 - d]), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(tag(id, if d == 0 { Op::Send0 } else { Op::Send1 }));
        self.push(entry);
    }

    fn accepted(&mut self, client: RawFd) {
        let backend = backend_socket(0);
        if backend < 0 {
            // SAFETY: the accepted descriptor is ours and used nowhere else.
            unsafe { libc::close(client) };
            return;
        }
        let bufs = self.conns.buffers();
        let conn = Conn {
            fds: [client, backend],
            bufs,
            len: [0; 2],
            sent: [0; 2],
            ended: [false; 2],
            in_flight: 1,
            aborted: false,
            closing: false,
        };
        let id = self.conns.insert(conn);
        let addr = &self.backends[self.next_backend % self.backends.len()];
        self.next_backend += 1;
        // The first read from the client is linked to the connect: it starts once the
        // backend has answered, with no second submission. (Should the queue fill between
        // the two pushes, the link is cut and the read starts at once: the first send then
        // waits for the connect like any other.)
        let connect = opcode::Connect::new(
            Fd(backend),
            (addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
        .build()
        .flags(squeue::Flags::IO_LINK)
        .user_data(tag(id, Op::Connect));
        self.push(connect);
        self.recv(id, 0);
    }

    fn abort(&mut self, id: usize) {
        let conn = self.conns.get_mut(id).expect("live connection");
        if !conn.aborted {
            conn.aborted = true;
            for fd in conn.fds {
                // SAFETY: shutdown of descriptors the connection owns; it wakes what is in
                // flight on them so the connection can be closed.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
        }
    }

    fn close_when_idle(&mut self, id: usize) {
        let conn = self.conns.get_mut(id).expect("live connection");
        if conn.in_flight > 0 || conn.closing || !(conn.aborted || conn.ended == [true, true]) {
            return;
        }
        conn.closing = true;
        conn.in_flight = 2;
        let fds = conn.fds;
        for fd in fds {
            let entry = opcode::Close::new(Fd(fd))
                .build()
                .user_data(tag(id, Op::Close));
            self.push(entry);
        }
    }

    fn complete(&mut self, user_data: u64, res: i32, flags: u32) {
        let id = (user_data >> 4) as usize;
        let op = user_data & 0xf;
        if op == Op::Accept as u64 {
            if res >= 0 {
                self.accepted(res);
            }
            if !cqueue::more(flags) {
                self.arm_accept();
            }
            return;
        }
        let conn = self
            .conns
            .get_mut(id)
            .expect("completion of a live connection");
        conn.in_flight -= 1;
        match op {
            1 => {
                if res < 0 {
                    self.abort(id);
                } else {
                    self.recv(id, 1);
                }
            }
            2 | 3 => {
                let d = (op - 2) as usize;
                if conn.aborted || res < 0 {
                    self.abort(id);
                } else if res == 0 {
                    conn.in_flight += 1;
                    let entry = opcode::Shutdown::new(Fd(conn.fds[1 - d]), libc::SHUT_WR)
                        .build()
                        .user_data(tag(id, if d == 0 { Op::Shutdown0 } else { Op::Shutdown1 }));
                    self.push(entry);
                } else {
                    conn.len[d] = res as usize;
                    conn.sent[d] = 0;
                    self.send(id, d);
                }
            }
            4 | 5 => {
                let d = (op - 4) as usize;
                if conn.aborted || res < 0 {
                    self.abort(id);
                } else {
                    conn.sent[d] += res as usize;
                    if conn.sent[d] < conn.len[d] {
                        self.send(id, d);
                    } else {
                        self.recv(id, d);
                    }
                }
            }
            6 | 7 => conn.ended[(op - 6) as usize] = true,
            8 => {
                if conn.in_flight == 0 {
                    let conn = self.conns.remove(id).expect("live connection");
                    self.conns.recycle(conn.bufs);
                }
                return;
            }
            _ => unreachable!("unknown operation {op}"),
        }
        self.close_when_idle(id);
    }

    pub fn new(listener: RawFd, backends: Vec<libc::sockaddr_in>) -> Self {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(4096)
            .expect("io_uring_setup");
        Worker {
            ring,
            listener,
            backends,
            next_backend: 0,
            conns: Slots::new(),
        }
    }

    pub fn run(mut self) {
        self.arm_accept();
        let mut done = Vec::with_capacity(256);
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                // A signal (strace attaching, say) interrupts the wait; nothing is lost.
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => panic!("io_uring_enter: {e}"),
            }
            done.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for (user_data, res, flags) in done.drain(..) {
                self.complete(user_data, res, flags);
            }
        }
    }
}
