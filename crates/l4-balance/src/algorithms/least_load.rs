//! `least_conn`: a scan of the tier for the fewest active connections relative to weight.
//!
//! The scan starts at a backend drawn in proportion to weight among the usable ones (a
//! draw from the weighted slot table, redrawn when it lands on an unusable backend), and
//! only a strictly lower load displaces the start. So ties (all idle, the common case at
//! low load) go to the start: idle pools spread by weight, and a skipped backend's share
//! goes to the others by weight, never to whichever backend follows it in the list.
//! Scores are compared by cross-multiplying integers, so no division and no float. The
//! scan is O(backends), as in nginx; README gives its cost and points large pools to `p2c`.

use std::cmp::Ordering;

use super::{weighted_choice, WeightedSlots};
use crate::backend::Backend;

#[derive(Debug)]
pub(crate) struct LeastConn {
    /// Weight-proportional slots to draw the start from.
    slots: WeightedSlots,
}

impl LeastConn {
    pub(crate) fn new(backends: &[Backend]) -> Self {
        LeastConn {
            slots: WeightedSlots::new(backends),
        }
    }

    /// Fewest active connections relative to weight.
    #[inline]
    pub(crate) fn pick<F: Fn(&Backend) -> bool>(
        &self,
        backends: &[Backend],
        eligible: F,
    ) -> Option<usize> {
        let start = match self.slots.draw(backends, &eligible, usize::MAX) {
            Some(i) => i,
            None => weighted_choice(backends, 0..backends.len(), &eligible, fastrand::u64(..))?,
        };
        let mut best = start;
        let (mut best_load, mut best_weight) = load_and_weight(&backends[start]);
        // Weight of the backends tied with `best` once it is no longer the start; ties
        // with the start keep the start (drawn by weight already), so idle pools pay no
        // random draw per backend.
        let mut tied_weight = 0u64;
        for i in (start + 1..backends.len()).chain(0..start) {
            let b = &backends[i];
            if !eligible(b) {
                continue;
            }
            let (load, weight) = load_and_weight(b);
            // load / weight against best_load / best_weight; active counts stay far
            // below 2^55.
            match load
                .saturating_mul(best_weight)
                .cmp(&best_load.saturating_mul(weight))
            {
                Ordering::Less => {
                    (best, best_load, best_weight, tied_weight) = (i, load, weight, weight);
                }
                Ordering::Equal if best != start => {
                    // Among several least-loaded backends, each by weight (reservoir).
                    tied_weight += weight;
                    if fastrand::u64(..tied_weight) < weight {
                        (best, best_load, best_weight) = (i, load, weight);
                    }
                }
                Ordering::Equal | Ordering::Greater => {}
            }
        }
        Some(best)
    }
}

#[inline]
fn load_and_weight(b: &Backend) -> (u64, u64) {
    (b.state.active(), u64::from(b.spec.weight))
}
