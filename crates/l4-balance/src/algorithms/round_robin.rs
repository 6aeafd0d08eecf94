//! Smooth weighted round robin (nginx's algorithm), made lock-free.
//!
//! nginx keeps a mutable `current_weight` per backend and needs a lock (or a per-worker
//! copy) to update it. The sequence it produces depends only on the weights, so we compute
//! one full period of it when the snapshot is built and let every worker walk it with one
//! shared atomic cursor. Same spread as nginx (interleaved, never bursty), no lock.
//!
//! Unusable backends are skipped by *spending* their positions: a pick moves the cursor
//! past every position it skipped (one compare-and-swap), so the usable backends follow
//! the same sequence with the unusable ones struck out, each getting its weight's share.
//! (Taking only one position per pick would hand every skipped turn to the next backend
//! in the sequence: with one of three down, its neighbour would get double.)

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{smooth_weighted_schedule, weighted_choice, weights};
use crate::backend::Backend;

/// Positions walked before giving up on the sequence: a period of up to this many
/// positions (total weight over the weights' gcd) is always walked exactly.
const MAX_WALK: usize = 1024;

#[derive(Debug)]
pub(crate) struct RoundRobin {
    /// One period of the smooth weighted sequence, as backend indices.
    schedule: Vec<u32>,
    /// The next position, always below `schedule.len()`.
    cursor: AtomicUsize,
}

impl RoundRobin {
    pub(crate) fn new(backends: &[Backend]) -> Self {
        RoundRobin {
            schedule: smooth_weighted_schedule(&weights(backends)),
            cursor: AtomicUsize::new(0),
        }
    }

    #[inline]
    pub(crate) fn pick<F: Fn(&Backend) -> bool>(
        &self,
        backends: &[Backend],
        eligible: F,
    ) -> Option<usize> {
        let len = self.schedule.len();
        if len == 0 {
            return None;
        }
        let walk = len.min(MAX_WALK);
        let mut cursor = self.cursor.load(Ordering::Relaxed);
        loop {
            let found = (0..walk).find_map(|step| {
                let position = (cursor + step) % len;
                let index = self.schedule[position] as usize;
                backends
                    .get(index)
                    .is_some_and(&eligible)
                    .then_some((position, index))
            });
            let Some((position, index)) = found else {
                // Nothing usable within the walk (most of a long period is down): a
                // weighted draw among the usable ones keeps the shares, and the cursor
                // moves past the walked stretch so the next pick looks further on.
                let _ = self.cursor.compare_exchange(
                    cursor,
                    (cursor + walk) % len,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                return weighted_choice(backends, 0..backends.len(), eligible, fastrand::u64(..));
            };
            let next = (position + 1) % len;
            match self.cursor.compare_exchange_weak(
                cursor,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(index),
                // Another worker moved the cursor: walk again from where it is now.
                Err(now) => cursor = now % len,
            }
        }
    }
}
