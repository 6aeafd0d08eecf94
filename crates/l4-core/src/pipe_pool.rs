//! A per-thread pool of empty pipes, capped.
//!
//! An idle connection should hold no pipe (HAProxy's splice-auto idea): a direction takes a
//! pipe when data arrives and gives it back once the pipe is drained. Each worker is one
//! thread, so a thread-local free list needs no lock. Only empty pipes are returned; a pipe
//! that still holds bytes after an error is closed instead.
//!
//! Pipes are capped per worker (`max_pipes` split over the workers, like HAProxy's
//! `maxpipes`): past the cap a direction copies through user space instead. A pipe the
//! kernel would not give its full size (past the per-user pipe quota, new pipes shrink to
//! one page and splicing through them is slower than copying) is closed at once, and the
//! direction copies.

use std::cell::{Cell, RefCell};
use std::io;
use std::ops::Deref;

use crate::sys::Pipe;

/// Capacity asked for each pipe. 256 KiB lets one splice move several loopback segments
/// while keeping well inside the default per-user pipe allowance.
pub(crate) const PIPE_SIZE: usize = 256 * 1024;

thread_local! {
    static FREE: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    /// Pipes of this thread that exist: pooled or in use.
    static ALIVE: Cell<usize> = const { Cell::new(0) };
}

/// A pipe of this thread's pool; counted until it is closed.
#[derive(Debug)]
pub(crate) struct PooledPipe(Option<Pipe>);

impl Deref for PooledPipe {
    type Target = Pipe;
    fn deref(&self) -> &Pipe {
        // Only `give_back` takes the pipe out, and it consumes `self`.
        self.0
            .as_ref()
            .unwrap_or_else(|| unreachable!("a pooled pipe is present until given back"))
    }
}

impl Drop for PooledPipe {
    fn drop(&mut self) {
        if self.0.take().is_some() {
            ALIVE.with(|alive| alive.set(alive.get().saturating_sub(1)));
        }
    }
}

/// Why no pipe was given.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NoPipe {
    /// This worker already has `max` pipes.
    #[error("pipe cap of {0} per worker reached")]
    Cap(usize),
    /// The kernel gave a smaller pipe than asked (the per-user pipe quota is spent).
    #[error("pipe shrunk to {0} bytes by the kernel")]
    Shrunk(usize),
    /// pipe2 failed (out of descriptors).
    #[error("cannot create a pipe: {0}")]
    Io(#[from] io::Error),
}

/// Takes a free pipe, or creates one if this worker has fewer than `max`.
pub(crate) fn take(max: usize) -> Result<PooledPipe, NoPipe> {
    // Over the cap (a reload lowered it): close pooled pipes until under it.
    while ALIVE.with(Cell::get) > max {
        if FREE.with(|free| free.borrow_mut().pop()).is_none() {
            break;
        }
        ALIVE.with(|alive| alive.set(alive.get().saturating_sub(1)));
    }
    if ALIVE.with(Cell::get) > max {
        return Err(NoPipe::Cap(max));
    }
    if let Some(pipe) = FREE.with(|free| free.borrow_mut().pop()) {
        return Ok(PooledPipe(Some(pipe)));
    }
    if ALIVE.with(Cell::get) >= max {
        return Err(NoPipe::Cap(max));
    }
    let pipe = Pipe::new(PIPE_SIZE)?;
    if pipe.capacity() < PIPE_SIZE {
        return Err(NoPipe::Shrunk(pipe.capacity()));
    }
    ALIVE.with(|alive| alive.set(alive.get() + 1));
    Ok(PooledPipe(Some(pipe)))
}

/// Returns an empty pipe for reuse.
pub(crate) fn give_back(mut pipe: PooledPipe) {
    if let Some(inner) = pipe.0.take() {
        FREE.with(|free| free.borrow_mut().push(inner));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_counts_pipes_in_use_and_pooled() {
        std::thread::spawn(|| {
            let a = take(2).unwrap();
            let b = take(2).unwrap();
            assert!(matches!(take(2), Err(NoPipe::Cap(2))));
            give_back(a);
            let c = take(2).expect("a pooled pipe is reused");
            drop(b); // closed: a new one may be made
            let d = take(2).unwrap();
            assert!(matches!(take(2), Err(NoPipe::Cap(2))));
            drop((c, d));
            assert_eq!(ALIVE.with(Cell::get), 0);
        })
        .join()
        .unwrap();
    }
}
