//! Smooth weighted round robin (nginx's algorithm), made lock-free.
//!
//! nginx keeps a mutable `current_weight` per backend and needs a lock (or a per-worker
//! copy) to update it. The sequence it produces depends only on the weights, so we compute
//! one full period of it when the snapshot is built and let every worker walk it with one
//! shared atomic cursor. Same spread as nginx (interleaved, never bursty), no lock.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{first_eligible_slot, smooth_weighted_schedule, weights};
use crate::backend::Backend;

#[derive(Debug)]
pub(crate) struct RoundRobin {
    /// One period of the smooth weighted sequence, as backend indices.
    schedule: Vec<u32>,
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
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        first_eligible_slot(&self.schedule, start, backends, eligible)
    }
}
