//! Every raw system call of the data path lives here: `splice(2)`, `pipe2(2)`,
//! `F_SETPIPE_SZ` and `RLIMIT_NOFILE`. Today they all go through `nix`'s safe wrappers, so
//! this module holds no `unsafe` block; anything that needs one later goes here, with a
//! `// SAFETY:` comment.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipe_capacity_is_read_back() {
        let pipe = Pipe::new(256 * 1024).unwrap();
        assert!(pipe.capacity() >= 4096);
    }
}
