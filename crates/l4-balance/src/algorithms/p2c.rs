//! Power of two random choices: sample two distinct backends in proportion to weight and
//! take the one with the lower load relative to weight. Nearly as good as a full scan at
//! spreading load, with constant work per pick, and no herd onto one "least" backend when
//! many workers pick at once or when measured times differ only by noise.
//!
//! `p2c` compares active connections; `least_time` compares active connections weighed by
//! the measured time (the "P2C + EWMA" design of Finagle and Envoy), so a slow backend
//! loses every comparison against a fast one while fast backends share evenly.

use super::{weighted_choice, WeightedSlots};
use crate::backend::Backend;

#[derive(Debug)]
pub(crate) struct PowerOfTwo {
    /// Weight-proportional slots to sample from.
    slots: WeightedSlots,
}

/// Active connections.
#[inline]
pub(crate) fn active_load(b: &Backend) -> u128 {
    u128::from(b.state.active())
}

/// Active connections plus one per unit of weight, times the moving average of the
/// measured time rounded up to a power of two: backends within 2x of each other count as
/// equally fast, so noise between healthy backends (100µs vs 120µs) does not decide,
/// while a clearly slower one loses. Divided by weight in the comparison, the baseline
/// becomes exactly 1 for every backend, so idle backends of equal speed tie (and the
/// weighted draw decides) whatever their weights; a baseline of one connection would let
/// the heavier backend win every idle comparison. A backend with no sample yet counts as
/// 1µs, so it is tried and measured.
#[inline]
pub(crate) fn timed_load(b: &Backend) -> u128 {
    let time = b
        .state
        .response_time_us()
        .max(1)
        .checked_next_power_of_two();
    let baseline = u64::from(b.spec.weight);
    u128::from(b.state.active().saturating_add(baseline)) * u128::from(time.unwrap_or(u64::MAX))
}

impl PowerOfTwo {
    pub(crate) fn new(backends: &[Backend]) -> Self {
        PowerOfTwo {
            slots: WeightedSlots::new(backends),
        }
    }

    #[inline]
    pub(crate) fn pick<F, L>(&self, backends: &[Backend], eligible: F, load: L) -> Option<usize>
    where
        F: Fn(&Backend) -> bool,
        L: Fn(&Backend) -> u128,
    {
        if self.slots.is_empty() {
            return None;
        }
        let Some(a) = self.slots.draw(backends, &eligible, usize::MAX) else {
            // Most of the weight is unusable: a weighted draw among the usable ones.
            return weighted_choice(backends, 0..backends.len(), eligible, fastrand::u64(..));
        };
        let Some(b) = self.slots.draw(backends, &eligible, a) else {
            return Some(a);
        };
        let (ba, bb) = (&backends[a], &backends[b]);
        // load_a / weight_a <= load_b / weight_b
        let left = load(ba) * u128::from(bb.spec.weight);
        let right = load(bb) * u128::from(ba.spec.weight);
        Some(if left <= right { a } else { b })
    }
}
