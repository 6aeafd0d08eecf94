//! Every raw system call of the data path lives here: `splice(2)`, `pipe2(2)`,
//! `F_SETPIPE_SZ` and `RLIMIT_NOFILE` (through `nix`'s safe wrappers), and
//! `recvmmsg(2)`/`sendmmsg(2)` (through `libc`: the only `unsafe` code of the project, each
//! block with a `// SAFETY:` comment).

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// A kernel pipe used as the zero-copy buffer between two sockets.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    /// Creates a non-blocking, close-on-exec pipe and asks for `size` bytes of capacity.
    /// The capacity is read back: the kernel may round it up, or refuse it (per-user pipe
    /// limits), in which case the default size is used.
    pub fn new(size: usize) -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        let requested = i32::try_from(size).unwrap_or(i32::MAX);
        let capacity = match fcntl(&write, FcntlArg::F_SETPIPE_SZ(requested)) {
            Ok(n) => n,
            Err(_) => fcntl(&write, FcntlArg::F_GETPIPE_SZ)?,
        };
        Ok(Pipe {
            read,
            write,
            capacity: usize::try_from(capacity).unwrap_or(4096),
        })
    }

    /// Bytes the pipe holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Moves up to `len` bytes from the socket `from` into the pipe, without blocking.
    /// `Ok(0)` means end of stream.
    pub fn fill_from(&self, from: impl AsFd, len: usize) -> io::Result<usize> {
        Ok(splice(
            from,
            None,
            &self.write,
            None,
            len,
            SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
        )?)
    }

    /// Moves up to `len` bytes from the pipe to the socket `to`, without blocking.
    pub fn drain_to(&self, to: impl AsFd, len: usize) -> io::Result<usize> {
        Ok(splice(
            &self.read,
            None,
            to,
            None,
            len,
            SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
        )?)
    }
}

/// Raises the soft limit on open files to the hard limit: a proxy holds two sockets per
/// connection (plus pipes while data is in flight), and the usual soft limit of 1024 would
/// cap it at a few hundred connections. Returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
}

/// Datagrams moved by one `recvmmsg`/`sendmmsg` call at most.
pub const BATCH: usize = 32;
/// Bytes per datagram slot: the largest UDP payload fits, so nothing is ever truncated.
pub const SLOT: usize = 65_536;

/// Receive buffers for one `recvmmsg` call: `BATCH` slots of `SLOT` bytes, the datagrams'
/// lengths and source addresses. Reused for every call; only touched pages cost memory.
pub struct RecvBatch {
    buf: Box<[u8]>,
    lens: [usize; BATCH],
    addrs: [Option<SocketAddr>; BATCH],
    count: usize,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("count", &self.count)
            .finish()
    }
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            buf: vec![0u8; BATCH * SLOT].into_boxed_slice(),
            lens: [0; BATCH],
            addrs: [None; BATCH],
            count: 0,
        }
    }
}

fn to_socket_addr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    match i32::from(storage.ss_family) {
        libc::AF_INET if len as usize >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, the kernel wrote at
            // least that many bytes, and sockaddr_storage is aligned for every sockaddr type.
            let sin =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len as usize >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

impl RecvBatch {
    /// Receives up to `BATCH` datagrams from `fd` without blocking. Returns how many;
    /// `WouldBlock` when none is queued.
    pub fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        self.count = 0;
        // SAFETY: all-zero bytes are a valid value of these plain C structs.
        let mut storages: [libc::sockaddr_storage; BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        let mut iovecs: [libc::iovec; BATCH] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; BATCH];
        for (i, chunk) in self.buf.chunks_exact_mut(SLOT).enumerate().take(BATCH) {
            iovecs[i] = libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: SLOT,
            };
        }
        for i in 0..BATCH {
            hdrs[i].msg_hdr.msg_name = (&mut storages[i] as *mut libc::sockaddr_storage).cast();
            hdrs[i].msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdrs[i].msg_hdr.msg_iov = &mut iovecs[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at a live iovec over a distinct SLOT-byte chunk of
        // self.buf and at a live sockaddr_storage with its true size; all of them outlive
        // the call, and the kernel writes at most those sizes.
        let n = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for i in 0..n {
            self.lens[i] = (hdrs[i].msg_len as usize).min(SLOT);
            self.addrs[i] = to_socket_addr(&storages[i], hdrs[i].msg_hdr.msg_namelen);
        }
        self.count = n;
        Ok(n)
    }

    /// Datagrams held after the last `recv`.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the last `recv` returned nothing.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The `i`th datagram and its source (None for an unconnected peer the kernel did not
    /// name, which does not happen for UDP over IP).
    pub fn get(&self, i: usize) -> (Option<SocketAddr>, &[u8]) {
        let start = i * SLOT;
        (self.addrs[i], &self.buf[start..start + self.lens[i]])
    }
}

/// Whether UDP generic segmentation offload may be tried; cleared for good when the
/// kernel says it has no `UDP_SEGMENT` at all.
static GSO: AtomicBool = AtomicBool::new(true);

/// What a refused GSO send means.
#[derive(Debug, PartialEq, Eq)]
enum GsoRefusal {
    /// This send cannot be segmented (a segment larger than the route's MTU: EINVAL; a
    /// device that cannot checksum it: EIO): send it datagram by datagram, and keep GSO
    /// for the next send, which may go another way.
    ThisSend,
    /// The kernel has no UDP GSO: never try again.
    ForGood,
    /// Not about GSO (a full buffer, an unreachable peer): the caller's error.
    NotGso,
}

fn gso_refusal(e: &io::Error) -> GsoRefusal {
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::EIO) => GsoRefusal::ThisSend,
        Some(libc::ENOPROTOOPT) | Some(libc::EOPNOTSUPP) => GsoRefusal::ForGood,
        _ => GsoRefusal::NotGso,
    }
}

/// Segments the kernel accepts in one GSO send (`UDP_MAX_SEGMENTS`).
const GSO_MAX_SEGMENTS: usize = 64;

/// Whether `payloads` can go as one GSO send: at least two, all but the last of one
/// non-zero size, the last no longer, within one IP datagram in all.
fn gso_eligible(payloads: &[&[u8]]) -> Option<u16> {
    let (last, rest) = payloads.split_last()?;
    let size = rest.first()?.len();
    let total: usize = payloads.iter().map(|p| p.len()).sum();
    (size > 0
        && payloads.len() <= GSO_MAX_SEGMENTS.min(BATCH)
        && rest.iter().all(|p| p.len() == size)
        && last.len() <= size
        && !last.is_empty()
        && total <= 65_000)
        .then(|| u16::try_from(size).ok())
        .flatten()
}

/// One `sendmsg` with `UDP_SEGMENT`: the kernel builds one large buffer and cuts it into
/// `size`-byte datagrams late, instead of walking the whole send path per datagram. The
/// receiver sees exactly the datagrams given, in order.
fn send_segmented(
    fd: BorrowedFd<'_>,
    payloads: &[&[u8]],
    size: u16,
    dest: Option<&socket2::SockAddr>,
) -> io::Result<usize> {
    let mut iovecs: [libc::iovec; BATCH] = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; BATCH];
    for (i, payload) in payloads.iter().enumerate() {
        iovecs[i] = libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: payload.len(),
        };
    }
    // Room for one cmsghdr carrying a u16, 8-byte aligned as cmsg headers require.
    let mut control = [0u64; 4];
    // SAFETY: all-zero bytes are a valid msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iovecs.as_mut_ptr();
    msg.msg_iovlen = payloads.len();
    if let Some(dest) = dest {
        msg.msg_name = dest.as_ptr() as *mut libc::c_void;
        msg.msg_namelen = dest.len();
    }
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
    // SAFETY: msg_control points at `control`, which is larger than msg_controllen and
    // aligned for cmsghdr, so CMSG_FIRSTHDR returns a valid header inside it and CMSG_DATA
    // points at room for the u16 (written unaligned, as the macro gives no alignment).
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = libc::UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), size);
    }
    // SAFETY: msg points at live iovecs over live payloads, a live control buffer and, if
    // any, a live address of the stated length; the kernel only reads them.
    let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(payloads.len())
}

/// Sends `payloads` as separate datagrams on `fd` (to `to`, or to the connected peer)
/// without blocking: as one GSO send when they qualify (a stream of equal-sized
/// datagrams), else with as few `sendmmsg` calls as possible. Returns how many were sent;
/// an error only when none was.
pub fn send_batch(
    fd: BorrowedFd<'_>,
    payloads: &[&[u8]],
    to: Option<SocketAddr>,
) -> io::Result<usize> {
    let dest = to.map(socket2::SockAddr::from);
    if GSO.load(Ordering::Relaxed) {
        if let Some(size) = gso_eligible(payloads) {
            match send_segmented(fd, payloads, size, dest.as_ref()) {
                Ok(n) => return Ok(n),
                Err(e) => match gso_refusal(&e) {
                    GsoRefusal::ThisSend => {}
                    GsoRefusal::ForGood => GSO.store(false, Ordering::Relaxed),
                    GsoRefusal::NotGso => return Err(e),
                },
            }
        }
    }
    let mut sent = 0;
    while sent < payloads.len() {
        let chunk = &payloads[sent..payloads.len().min(sent + BATCH)];
        // SAFETY: all-zero bytes are a valid mmsghdr.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        let mut iovecs: [libc::iovec; BATCH] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; BATCH];
        for (i, payload) in chunk.iter().enumerate() {
            // The kernel only reads from a send iovec; the cast to *mut is what the C
            // struct's type asks for.
            iovecs[i] = libc::iovec {
                iov_base: payload.as_ptr() as *mut libc::c_void,
                iov_len: payload.len(),
            };
            hdrs[i].msg_hdr.msg_iov = &mut iovecs[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
            if let Some(dest) = &dest {
                hdrs[i].msg_hdr.msg_name = dest.as_ptr() as *mut libc::c_void;
                hdrs[i].msg_hdr.msg_namelen = dest.len();
            }
        }
        // SAFETY: the headers point at live iovecs over live payload slices and, if any,
        // at a live socket address of the stated length; the kernel only reads them.
        let n = unsafe {
            libc::sendmmsg(
                fd.as_raw_fd(),
                hdrs.as_mut_ptr(),
                chunk.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if sent > 0 { Ok(sent) } else { Err(e) };
        }
        sent += n as usize;
        if (n as usize) < chunk.len() {
            break;
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_kernel_without_gso_turns_it_off_for_good() {
        let e = |code| io::Error::from_raw_os_error(code);
        assert_eq!(gso_refusal(&e(libc::EINVAL)), GsoRefusal::ThisSend);
        assert_eq!(gso_refusal(&e(libc::EIO)), GsoRefusal::ThisSend);
        assert_eq!(gso_refusal(&e(libc::ENOPROTOOPT)), GsoRefusal::ForGood);
        assert_eq!(gso_refusal(&e(libc::EAGAIN)), GsoRefusal::NotGso);
    }

    #[test]
    fn pipe_capacity_is_read_back() {
        let pipe = Pipe::new(256 * 1024).unwrap();
        assert!(pipe.capacity() >= 4096);
    }

    #[test]
    fn batches_keep_datagram_boundaries_and_sources() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let payloads: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; usize::from(i) * 100]).collect();
        let slices: Vec<&[u8]> = payloads.iter().map(|p| p.as_slice()).collect();
        let to = rx.local_addr().unwrap();
        assert_eq!(send_batch(tx.as_fd(), &slices, Some(to)).unwrap(), 40);
        let mut batch = RecvBatch::default();
        let mut got = Vec::new();
        while got.len() < 40 {
            let n = batch.recv(rx.as_fd()).unwrap();
            for i in 0..n {
                let (from, data) = batch.get(i);
                assert_eq!(from, Some(tx.local_addr().unwrap()));
                got.push(data.to_vec());
            }
        }
        assert_eq!(got, payloads);
        assert_eq!(
            batch.recv(rx.as_fd()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn equal_sized_runs_keep_their_boundaries_through_gso() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        let mut payloads: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 64]).collect();
        payloads.push(vec![99; 10]); // a shorter last one is allowed
        let slices: Vec<&[u8]> = payloads.iter().map(|p| p.as_slice()).collect();
        assert!(gso_eligible(&slices).is_some());
        assert_eq!(send_batch(tx.as_fd(), &slices, None).unwrap(), 21);
        let mut batch = RecvBatch::default();
        let mut got = Vec::new();
        while got.len() < 21 {
            let n = batch.recv(rx.as_fd()).unwrap();
            got.extend((0..n).map(|i| batch.get(i).1.to_vec()));
        }
        assert_eq!(got, payloads);
        assert!(gso_eligible(&[&[1u8, 2][..], &[3u8][..], &[4u8, 5][..]]).is_none());
        assert!(gso_eligible(&[&[1u8][..]]).is_none());
    }
}
