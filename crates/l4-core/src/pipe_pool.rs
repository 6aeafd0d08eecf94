//! A per-thread pool of empty pipes.
//!
//! An idle connection should hold no pipe (HAProxy's splice-auto idea): a direction takes a
//! pipe when data arrives and gives it back once the pipe is drained. Each worker is one
//! thread, so a thread-local free list needs no lock. Only empty pipes are returned; a pipe
//! that still holds bytes after an error is closed instead.

use std::cell::RefCell;
use std::io;

use crate::sys::Pipe;

/// Capacity asked for each pipe. 256 KiB lets one splice move several loopback segments
/// while keeping well inside the default per-user pipe allowance.
pub(crate) const PIPE_SIZE: usize = 256 * 1024;

/// Free pipes kept per worker thread; beyond this they are closed.
const MAX_POOLED: usize = 256;

thread_local! {
    static FREE: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// Takes a free pipe, or creates one.
pub(crate) fn take() -> io::Result<Pipe> {
    match FREE.with(|free| free.borrow_mut().pop()) {
        Some(pipe) => Ok(pipe),
        None => Pipe::new(PIPE_SIZE),
    }
}

/// Returns an empty pipe for reuse.
pub(crate) fn give_back(pipe: Pipe) {
    FREE.with(|free| {
        let mut free = free.borrow_mut();
        if free.len() < MAX_POOLED {
            free.push(pipe);
        }
    });
}
