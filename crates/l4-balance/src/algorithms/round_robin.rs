//! Smooth weighted round robin (nginx's algorithm), made lock-free.
//!
//! nginx keeps a mutable `current_weight` per backend and needs a lock (or a per-worker
//! copy) to update it. The sequence it produces depends only on the weights, so we compute
//! one full period of it when the snapshot is built and let every worker walk it with one
//! shared atomic cursor. Same spread as nginx (interleaved, never bursty), no lock.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::backend::Backend;

#[derive(Debug)]
pub(crate) struct RoundRobin {
    /// One period of the smooth weighted sequence, as backend indices.
    schedule: Vec<u32>,
    cursor: AtomicUsize,
}

impl RoundRobin {
    pub(crate) fn new(backends: &[Backend]) -> Self {
        let weights: Vec<u64> = backends.iter().map(|b| u64::from(b.spec.weight)).collect();
        RoundRobin {
            schedule: smooth_weighted_schedule(&weights),
            cursor: AtomicUsize::new(0),
        }
    }

    pub(crate) fn pick(
        &self,
        backends: &[Backend],
        eligible: &dyn Fn(&Backend) -> bool,
    ) -> Option<usize> {
        if self.schedule.is_empty() {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        let len = self.schedule.len();
        // Walk the schedule for at most one slot per backend, then fall back to a linear
        // scan: bounded work even when most backends are unusable.
        for step in 0..len.min(backends.len()) {
            let index = self.schedule[(start.wrapping_add(step)) % len] as usize;
            if backends.get(index).is_some_and(eligible) {
                return Some(index);
            }
        }
        let offset = start % backends.len();
        (0..backends.len())
            .map(|i| (offset + i) % backends.len())
            .find(|&i| eligible(&backends[i]))
    }
}

/// One period of nginx's smooth weighted round robin for `weights`, after dividing them by
/// their greatest common divisor (1:1:2 and 5:5:10 give the same short period).
fn smooth_weighted_schedule(weights: &[u64]) -> Vec<u32> {
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let weights: Vec<i64> = weights.iter().map(|w| (w / divisor) as i64).collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(total.max(0) as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += w;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        schedule.push(best as u32);
    }
    schedule
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_matches_nginx_for_5_1_1() {
        // The example from nginx's commit introducing smooth weighting: a a b a c a a.
        assert_eq!(
            smooth_weighted_schedule(&[5, 1, 1]),
            vec![0, 0, 1, 0, 2, 0, 0]
        );
    }

    #[test]
    fn schedule_is_reduced_by_gcd_and_proportional() {
        let s = smooth_weighted_schedule(&[10, 10, 20]);
        assert_eq!(s.len(), 4);
        assert_eq!(s.iter().filter(|&&i| i == 2).count(), 2);
        // Interleaved, never two of the light ones in a row.
        assert_eq!(s, vec![2, 0, 1, 2]);
    }
}
