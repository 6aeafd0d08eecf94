//! The UDP half of the experiment: the least a UDP forwarder can do per datagram, to tell
//! how far l4lb's UDP rate is from the ceiling of its design on this machine.
//!
//! The design is l4lb's: one SO_REUSEPORT socket per worker thread, datagrams received in
//! batches of 32 (`recvmmsg`), each client a flow with its own connected socket to the
//! backend (so the backend tells flows apart, and replies find their client), a batch's
//! datagrams grouped per flow and sent in one call per flow (`sendmmsg`, or one GSO
//! `sendmsg` when they are of one size, as l4lb does), replies read until EAGAIN and sent
//! back from the listener's socket. Everything a product adds is left out: no flow expiry,
//! no limits, no health, no counters, no logging, no async runtime; epoll edge-triggered,
//! each socket registered once.

use std::collections::HashMap;
use std::os::fd::RawFd;

use crate::{errno, wait_events};

const BATCH: usize = 32;
/// Longer datagrams are cut (the benchmark sends 64 bytes); l4lb's slots hold 64 KiB, and a
/// build of this forwarder with 64 KiB slots measured the same.
const SLOT: usize = 2048;
const LISTENER: u64 = u64::MAX;

/// How a flow's datagrams of one batch go out.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Send {
    /// One `sendmsg` with `UDP_SEGMENT` when they are of one size, else `sendmmsg`.
    Gso,
    /// Always `sendmmsg`.
    Mmsg,
}

struct Flow {
    fd: RawFd,
    client: libc::sockaddr_in,
}

pub struct Worker {
    epoll: RawFd,
    listener: RawFd,
    backend: libc::sockaddr_in,
    send: Send,
    flows: Vec<Flow>,
    /// Client address and port -> index in `flows`.
    by_client: HashMap<(u32, u16), usize>,
    buf: Vec<u8>,
}

fn socket_in(port: u16) -> RawFd {
    use socket2::{Domain, Socket, Type};
    use std::net::{Ipv4Addr, SocketAddrV4};
    use std::os::fd::IntoRawFd;
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, None).expect("socket");
    socket.set_reuse_port(true).expect("SO_REUSEPORT");
    socket.set_nonblocking(true).expect("O_NONBLOCK");
    // As l4lb asks for its UDP listeners (the kernel caps it at net.core.rmem_max/wmem_max):
    // a burst waits in the queue instead of being dropped while the worker is not running.
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket
        .bind(&SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into())
        .expect("bind");
    socket.into_raw_fd()
}

impl Worker {
    pub fn new(port: u16, backend: libc::sockaddr_in, send: Send) -> Self {
        // SAFETY: plain epoll_create1(2).
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(epoll >= 0, "epoll_create1");
        let worker = Worker {
            epoll,
            listener: socket_in(port),
            backend,
            send,
            flows: Vec::new(),
            by_client: HashMap::new(),
            buf: vec![0; BATCH * SLOT],
        };
        assert!(worker.register(worker.listener, LISTENER), "epoll_ctl");
        worker
    }

    fn register(&self, fd: RawFd, data: u64) -> bool {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: data,
        };
        // SAFETY: epoll_ctl with a valid event struct.
        unsafe { libc::epoll_ctl(self.epoll, libc::EPOLL_CTL_ADD, fd, &mut event) == 0 }
    }

    /// The flow of `client`, opened (a socket connected to the backend) if new.
    fn flow(&mut self, client: &libc::sockaddr_in) -> Option<usize> {
        let key = (client.sin_addr.s_addr, client.sin_port);
        if let Some(&i) = self.by_client.get(&key) {
            return Some(i);
        }
        // SAFETY: plain socket(2); the descriptor is owned by the flow from here.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if fd < 0 {
            return None;
        }
        // SAFETY: connect with a sockaddr_in that outlives the call.
        let connected = unsafe {
            libc::connect(
                fd,
                (&self.backend as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        } == 0;
        let i = self.flows.len();
        if !connected || !self.register(fd, i as u64) {
            // SAFETY: the descriptor was made above and is not used after this.
            unsafe { libc::close(fd) };
            return None;
        }
        self.flows.push(Flow {
            fd,
            client: *client,
        });
        self.by_client.insert(key, i);
        Some(i)
    }

    /// Receives batches until the queue is drained, forwarding each.
    fn receive(&mut self) {
        loop {
            // SAFETY: all-zero bytes are valid for these plain C structs.
            let mut addrs: [libc::sockaddr_in; BATCH] = unsafe { std::mem::zeroed() };
            let mut iovecs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
            let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
            for i in 0..BATCH {
                iovecs[i] = libc::iovec {
                    iov_base: self.buf[i * SLOT..].as_mut_ptr().cast(),
                    iov_len: SLOT,
                };
                hdrs[i].msg_hdr.msg_iov = &mut iovecs[i];
                hdrs[i].msg_hdr.msg_iovlen = 1;
                hdrs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_in).cast();
                hdrs[i].msg_hdr.msg_namelen =
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            }
            // SAFETY: every header points at a live buffer and address of the stated sizes.
            let n = unsafe {
                libc::recvmmsg(
                    self.listener,
                    hdrs.as_mut_ptr(),
                    BATCH as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n <= 0 {
                return;
            }
            let n = n as usize;
            let mut lens = [0usize; BATCH];
            // Each datagram's flow; grouped so each flow's datagrams go in one call, in order.
            let mut flows = [None; BATCH];
            for i in 0..n {
                lens[i] = hdrs[i].msg_len as usize;
                flows[i] = self.flow(&addrs[i]);
            }
            let mut taken = [false; BATCH];
            for i in 0..n {
                let Some(flow) = flows[i] else { continue };
                if taken[i] {
                    continue;
                }
                let mut group = [0usize; BATCH];
                let mut count = 0;
                for j in i..n {
                    if !taken[j] && flows[j] == Some(flow) {
                        taken[j] = true;
                        group[count] = j;
                        count += 1;
                    }
                }
                self.forward(flow, &group[..count], &lens);
            }
            if n < BATCH {
                // Drained: a later datagram is a new edge.
                return;
            }
        }
    }

    fn forward(&mut self, flow: usize, group: &[usize], lens: &[usize]) {
        let fd = self.flows[flow].fd;
        // SAFETY: all-zero bytes are valid iovecs and message headers.
        let mut iovecs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        for (k, &j) in group.iter().enumerate() {
            iovecs[k] = libc::iovec {
                iov_base: self.buf[j * SLOT..].as_mut_ptr().cast(),
                iov_len: lens[j],
            };
        }
        let size = lens[group[0]];
        // l4lb's rule: at least two, all but the last of one non-zero size, the last no
        // longer and not empty, within one IP datagram in all.
        let last = lens[group[group.len() - 1]];
        let one_size = group.len() >= 2
            && size > 0
            && group[..group.len() - 1].iter().all(|&j| lens[j] == size)
            && last <= size
            && last > 0
            && group.iter().map(|&j| lens[j]).sum::<usize>() <= 65_000;
        if self.send == Send::Gso && one_size {
            let mut control = [0u64; 4];
            // SAFETY: all-zero bytes are a valid msghdr.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iovecs.as_mut_ptr();
            msg.msg_iovlen = group.len();
            msg.msg_control = control.as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE only computes a size; the control buffer is larger, aligned
            // for cmsghdr, so the header and its u16 fit inside it.
            unsafe {
                msg.msg_controllen = libc::CMSG_SPACE(2) as usize;
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_UDP;
                (*cmsg).cmsg_type = libc::UDP_SEGMENT;
                (*cmsg).cmsg_len = libc::CMSG_LEN(2) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), size as u16);
                libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT);
            }
            return;
        }
        // SAFETY: all-zero bytes are valid message headers.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for k in 0..group.len() {
            hdrs[k].msg_hdr.msg_iov = &mut iovecs[k];
            hdrs[k].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: the headers point at live iovecs over the receive buffer. A full buffer
        // drops the rest, as UDP does.
        unsafe {
            libc::sendmmsg(
                fd,
                hdrs.as_mut_ptr(),
                group.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
    }

    /// Replies of a flow until EAGAIN, each sent to its client from the listener.
    fn reply(&mut self, flow: usize) {
        let Flow { fd, client } = self.flows[flow];
        loop {
            // SAFETY: recv into a live buffer of SLOT bytes.
            let n = unsafe { libc::recv(fd, self.buf.as_mut_ptr().cast(), SLOT, 0) };
            if n < 0 {
                // A refused datagram (ICMP port unreachable) is reported once; go on. Any
                // other error ends this turn, as EAGAIN does.
                if errno() == libc::ECONNREFUSED {
                    continue;
                }
                return;
            }
            // SAFETY: sendto from a live buffer with a sockaddr_in of its stated size.
            unsafe {
                libc::sendto(
                    self.listener,
                    self.buf.as_ptr().cast(),
                    n as usize,
                    libc::MSG_DONTWAIT,
                    (&client as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
        }
    }

    pub fn run(mut self) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
        loop {
            let n = wait_events(self.epoll, &mut events);
            for event in &events[..n] {
                match event.u64 {
                    LISTENER => self.receive(),
                    flow => self.reply(flow as usize),
                }
            }
        }
    }
}
