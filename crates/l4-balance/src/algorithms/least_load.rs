//! `least_conn` and `least_time`: a scan of the tier for the lowest load relative to weight.
//!
//! The scan starts at a random backend so that ties (all idle, the common case at low load)
//! spread instead of all landing on the first backend. Scores are compared by
//! cross-multiplying, in integers, so no division and no float.

use super::super::backend::Backend;

#[inline]
fn scan<F, S>(backends: &[Backend], eligible: F, score: S) -> Option<usize>
where
    F: Fn(&Backend) -> bool,
    S: Fn(&Backend) -> u128,
{
    let n = backends.len();
    if n == 0 {
        return None;
    }
    let start = fastrand::usize(..n);
    let mut best: Option<(usize, u128, u128)> = None;
    for step in 0..n {
        let i = if start + step >= n {
            start + step - n
        } else {
            start + step
        };
        let b = &backends[i];
        if !eligible(b) {
            continue;
        }
        let load = score(b);
        let weight = u128::from(b.spec.weight);
        match best {
            // load / weight < best_load / best_weight
            Some((_, best_load, best_weight)) if load * best_weight >= best_load * weight => {}
            _ => best = Some((i, load, weight)),
        }
    }
    best.map(|(i, _, _)| i)
}

/// Fewest active connections relative to weight.
#[inline]
pub(crate) fn least_conn<F: Fn(&Backend) -> bool>(
    backends: &[Backend],
    eligible: F,
) -> Option<usize> {
    scan(backends, eligible, |b| u128::from(b.state.active()))
}

/// Active connections (plus the one being placed) times the backend's average measured
/// time, relative to weight, as nginx's `least_time`. A backend with no sample yet scores
/// as if its time were 1µs, so it is tried early and measured.
#[inline]
pub(crate) fn least_time<F: Fn(&Backend) -> bool>(
    backends: &[Backend],
    eligible: F,
) -> Option<usize> {
    scan(backends, eligible, |b| {
        u128::from(b.state.active() + 1) * u128::from(b.state.response_time_us().max(1))
    })
}
