//! `least_conn`: a scan of the tier for the fewest active connections relative to weight.
//!
//! The scan starts at a backend drawn in proportion to weight among the usable ones (a
//! draw from the weighted slot table, redrawn when it lands on an unusable backend), and
//! only a strictly lower load displaces the start. So ties (all idle, the common case at
//! low load) go to the start: idle pools spread by weight, and a skipped backend's share
//! goes to the others by weight, never to whichever backend follows it in the list.
//! Scores are compared by cross-multiplying integers, so no division and no float. The
//! scan is O(backends), as in nginx; README gives its cost and points large pools to `p2c`.

use super::{smooth_weighted_schedule, weighted_choice, weights};
use crate::backend::Backend;

/// Draws of a start before falling back to a weighted scan for one.
const TRIES: usize = 8;

#[derive(Debug)]
pub(crate) struct LeastConn {
    /// Weight-proportional slots to draw the start from.
    slots: Vec<u32>,
}

impl LeastConn {
    pub(crate) fn new(backends: &[Backend]) -> Self {
        LeastConn {
            slots: smooth_weighted_schedule(&weights(backends)),
        }
    }

    /// Fewest active connections relative to weight.
    #[inline]
    pub(crate) fn pick<F: Fn(&Backend) -> bool>(
        &self,
        backends: &[Backend],
        eligible: F,
    ) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let drawn = (0..TRIES).find_map(|_| {
            let i = self.slots[fastrand::usize(..self.slots.len())] as usize;
            backends.get(i).is_some_and(&eligible).then_some(i)
        });
        let start = match drawn {
            Some(i) => i,
            None => weighted_choice(backends, &eligible, fastrand::u64(..))?,
        };
        let mut best = start;
        let (mut best_load, mut best_weight) = load_and_weight(&backends[start]);
        for i in (start + 1..backends.len()).chain(0..start) {
            let b = &backends[i];
            if !eligible(b) {
                continue;
            }
            let (load, weight) = load_and_weight(b);
            // load / weight < best_load / best_weight; active counts stay far below 2^55.
            if load.saturating_mul(best_weight) < best_load.saturating_mul(weight) {
                best = i;
                best_load = load;
                best_weight = weight;
            }
        }
        Some(best)
    }
}

#[inline]
fn load_and_weight(b: &Backend) -> (u64, u64) {
    (b.state.active(), u64::from(b.spec.weight))
}
