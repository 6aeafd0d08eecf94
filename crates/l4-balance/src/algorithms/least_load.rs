//! `least_conn`: a scan of the tier for the fewest active connections relative to weight.
//!
//! The scan starts at a random backend so that ties (all idle, the common case at low load)
//! spread instead of all landing on the first backend. Scores are compared by
//! cross-multiplying integers, so no division and no float. The scan is O(backends), as in
//! nginx; README gives its cost and points large pools to `p2c`.

use super::super::backend::Backend;

/// Fewest active connections relative to weight.
#[inline]
pub(crate) fn least_conn<F: Fn(&Backend) -> bool>(
    backends: &[Backend],
    eligible: F,
) -> Option<usize> {
    let n = backends.len();
    if n == 0 {
        return None;
    }
    let start = fastrand::usize(..n);
    let mut best = usize::MAX;
    let (mut best_load, mut best_weight) = (0u64, 1u64);
    let (tail, head) = backends.split_at(start);
    let ordered = head.iter().zip(start..).chain(tail.iter().zip(0..));
    for (b, i) in ordered {
        if !eligible(b) {
            continue;
        }
        let load = b.state.active();
        let weight = u64::from(b.spec.weight);
        // load / weight < best_load / best_weight; active counts stay far below 2^55.
        if best == usize::MAX || load.saturating_mul(best_weight) < best_load.saturating_mul(weight)
        {
            best = i;
            best_load = load;
            best_weight = weight;
        }
    }
    (best != usize::MAX).then_some(best)
}
