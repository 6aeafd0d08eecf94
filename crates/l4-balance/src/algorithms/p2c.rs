//! Power of two random choices: sample two backends in proportion to weight and take the
//! one with fewer active connections relative to weight. Nearly as good as least_conn at
//! spreading load, with constant work per pick and no herd onto one "least" backend when
//! many workers pick at once.

use super::{first_eligible_slot, smooth_weighted_schedule, weights};
use crate::backend::Backend;

#[derive(Debug)]
pub(crate) struct PowerOfTwo {
    /// Weight-proportional slots to sample from.
    slots: Vec<u32>,
}

/// Samples tried before giving up on randomness and scanning.
const TRIES: usize = 4;

impl PowerOfTwo {
    pub(crate) fn new(backends: &[Backend]) -> Self {
        PowerOfTwo {
            slots: smooth_weighted_schedule(&weights(backends)),
        }
    }

    fn sample<F: Fn(&Backend) -> bool>(&self, backends: &[Backend], eligible: &F) -> Option<usize> {
        (0..TRIES).find_map(|_| {
            let i = self.slots[fastrand::usize(..self.slots.len())] as usize;
            backends.get(i).is_some_and(eligible).then_some(i)
        })
    }

    #[inline]
    pub(crate) fn pick<F: Fn(&Backend) -> bool>(
        &self,
        backends: &[Backend],
        eligible: F,
    ) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let Some(a) = self.sample(backends, &eligible) else {
            let start = fastrand::usize(..self.slots.len());
            return first_eligible_slot(&self.slots, start, backends, eligible);
        };
        let Some(b) = self.sample(backends, &eligible) else {
            return Some(a);
        };
        let (ba, bb) = (&backends[a], &backends[b]);
        // active_a / weight_a <= active_b / weight_b
        let left = u128::from(ba.state.active()) * u128::from(bb.spec.weight);
        let right = u128::from(bb.state.active()) * u128::from(ba.spec.weight);
        Some(if left <= right { a } else { b })
    }
}
