//! Selection algorithms. Each one is built once per snapshot (all its tables precomputed)
//! and then picks with shared, lock-free state only: atomics in `BackendState`, a shared
//! cursor, or nothing at all.

mod least_load;
mod maglev;
mod p2c;
mod round_robin;
mod source_hash;

use crate::backend::Backend;
use crate::flow_key::{FlowKey, HashKey};

pub use maglev::{build_table as build_maglev_table, is_prime, DEFAULT_TABLE_SIZE};

/// What `least_time` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimeMetric {
    /// Time to establish the TCP connection.
    #[default]
    Connect,
    /// Time from connection to the backend's first byte.
    FirstByte,
}

/// How a pool spreads new connections over its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// Smooth weighted round robin, as nginx does it.
    #[default]
    RoundRobin,
    /// Fewest active connections relative to weight.
    LeastConn,
    /// Power of two random choices (weighted), the less loaded of the two.
    PowerOfTwo,
    /// Active connections weighed by the moving average of a measured time, compared over
    /// two random choices.
    LeastTime(TimeMetric),
    /// Hash of the client (by `HashKey`) over the weighted schedule.
    SourceHash(HashKey),
    /// Maglev consistent hashing.
    Maglev {
        /// What is hashed.
        key: HashKey,
        /// Lookup table size; must be prime.
        table_size: u32,
    },
}

impl Algorithm {
    /// Whether it places by a hash of the client (stable placement; slow start does not
    /// apply: it would move clients back and forth during the ramp).
    pub fn is_hashing(self) -> bool {
        matches!(self, Algorithm::SourceHash(_) | Algorithm::Maglev { .. })
    }

    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round_robin",
            Algorithm::LeastConn => "least_conn",
            Algorithm::PowerOfTwo => "p2c",
            Algorithm::LeastTime(_) => "least_time",
            Algorithm::SourceHash(_) => "source_hash",
            Algorithm::Maglev { .. } => "maglev",
        }
    }

    /// Whether the data path should measure response times for this algorithm.
    pub fn time_metric(self) -> Option<TimeMetric> {
        match self {
            Algorithm::LeastTime(metric) => Some(metric),
            _ => None,
        }
    }
}

/// An algorithm's precomputed state for one tier (primaries or backups) of a snapshot.
#[derive(Debug)]
pub(crate) enum TierSelector {
    RoundRobin(round_robin::RoundRobin),
    LeastConn(least_load::LeastConn),
    PowerOfTwo(p2c::PowerOfTwo),
    LeastTime(p2c::PowerOfTwo),
    SourceHash(source_hash::SourceHash),
    Maglev(maglev::Maglev),
}

impl TierSelector {
    pub(crate) fn build(algorithm: Algorithm, backends: &[Backend]) -> Self {
        match algorithm {
            Algorithm::RoundRobin => {
                TierSelector::RoundRobin(round_robin::RoundRobin::new(backends))
            }
            Algorithm::LeastConn => TierSelector::LeastConn(least_load::LeastConn::new(backends)),
            Algorithm::PowerOfTwo => TierSelector::PowerOfTwo(p2c::PowerOfTwo::new(backends)),
            Algorithm::LeastTime(_) => TierSelector::LeastTime(p2c::PowerOfTwo::new(backends)),
            Algorithm::SourceHash(key) => {
                TierSelector::SourceHash(source_hash::SourceHash::new(backends, key))
            }
            Algorithm::Maglev { key, table_size } => {
                TierSelector::Maglev(maglev::Maglev::new(backends, key, table_size))
            }
        }
    }

    /// Picks the index of a backend for which `eligible` holds, or `None` when there is none.
    #[inline]
    pub(crate) fn pick<F: Fn(&Backend) -> bool>(
        &self,
        backends: &[Backend],
        key: &FlowKey,
        eligible: F,
    ) -> Option<usize> {
        match self {
            TierSelector::RoundRobin(rr) => rr.pick(backends, eligible),
            TierSelector::LeastConn(lc) => lc.pick(backends, eligible),
            TierSelector::PowerOfTwo(p2c) => p2c.pick(backends, eligible, p2c::active_load),
            TierSelector::LeastTime(p2c) => p2c.pick(backends, eligible, p2c::timed_load),
            TierSelector::SourceHash(sh) => sh.pick(backends, key, eligible),
            TierSelector::Maglev(m) => m.pick(backends, key, eligible),
        }
    }
}

/// One period of nginx's smooth weighted round robin for `weights`, after dividing them by
/// their greatest common divisor (1:1:2 and 5:5:10 give the same short period). Round
/// robin walks it; p2c and source_hash use it as a weight-proportional table of slots.
pub(crate) fn smooth_weighted_schedule(weights: &[u64]) -> Vec<u32> {
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

pub(crate) fn weights(backends: &[Backend]) -> Vec<u64> {
    backends.iter().map(|b| u64::from(b.spec.weight)).collect()
}

/// Backend indices in config order.
pub(crate) fn config_order(backends: &[Backend]) -> Vec<u32> {
    (0..backends.len() as u32).collect()
}

/// A weight-proportional table of slots to draw backends from at random (p2c's two
/// candidates, least_conn's start).
#[derive(Debug)]
pub(crate) struct WeightedSlots {
    slots: Vec<u32>,
}

/// Draws before giving up on randomness (the caller then falls back to a weighted scan).
const DRAWS: usize = 8;

impl WeightedSlots {
    pub(crate) fn new(backends: &[Backend]) -> Self {
        WeightedSlots {
            slots: smooth_weighted_schedule(&weights(backends)),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// A backend drawn in proportion to weight among the eligible ones other than `not`
    /// (a draw that lands on another is redrawn), or `None` after a few misses.
    #[inline]
    pub(crate) fn draw<F: Fn(&Backend) -> bool>(
        &self,
        backends: &[Backend],
        eligible: &F,
        not: usize,
    ) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        (0..DRAWS).find_map(|_| {
            let i = self.slots[fastrand::usize(..self.slots.len())] as usize;
            (i != not && backends.get(i).is_some_and(eligible)).then_some(i)
        })
    }
}

/// Weight-proportional choice among the backends for which `eligible` holds,
/// deterministic in `r` (a hash for the hashing algorithms, a random number otherwise),
/// walking the backends in `order`. Every algorithm falls back to it when its fast path
/// finds nobody eligible, so that even then a lost backend's share is spread by weight,
/// never handed to a neighbour. O(backends); reached only when most of a tier's weight is
/// unusable.
#[inline(never)]
pub(crate) fn weighted_choice<F, I>(
    backends: &[Backend],
    order: I,
    eligible: F,
    r: u64,
) -> Option<usize>
where
    F: Fn(&Backend) -> bool,
    I: Iterator<Item = usize> + Clone,
{
    let total: u64 = order
        .clone()
        .filter_map(|i| backends.get(i))
        .filter(|b| eligible(b))
        .map(|b| u64::from(b.spec.weight))
        .sum();
    if total == 0 {
        return None;
    }
    let mut target = r % total;
    let mut last = None;
    for i in order {
        let Some(b) = backends.get(i) else { continue };
        // Health may change between the two passes: then the last eligible one seen wins.
        if !eligible(b) {
            continue;
        }
        let weight = u64::from(b.spec.weight);
        if target < weight {
            return Some(i);
        }
        target -= weight;
        last = Some(i);
    }
    last
}

/// Rehashes tried after a key's own slot before [`weighted_choice`]: with half the weight
/// unusable, 8 misses in a row happen for 1 key in 256.
const REHASHES: u64 = 8;

/// The `attempt`-th member of a key's probe sequence: the splitmix64 finalizer over the
/// key's hash, so each attempt is an independent, uniform draw that every l4lb instance
/// computes alike (no random state, no `DefaultHasher`).
#[inline]
pub(crate) fn rehash(hash: u64, attempt: u64) -> u64 {
    let mut z = hash.wrapping_add(attempt.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A hashing algorithm's pick over a weight-proportional table of backend indices
/// (maglev's lookup table, source_hash's schedule). A key whose own slot is eligible stays
/// there, so keys of usable backends never move. A key whose backend is unusable rehashes:
/// each attempt lands on a backend in proportion to its weight, so the lost backend's keys
/// spread over the survivors by weight, deterministically, and return when it does. The
/// last resort walks the backends in `order` (maglev: by address, so that instances with
/// the same backends in another config order still agree).
#[inline]
pub(crate) fn pick_by_hash<F: Fn(&Backend) -> bool>(
    slots: &[u32],
    order: &[u32],
    hash: u64,
    backends: &[Backend],
    eligible: F,
) -> Option<usize> {
    let len = slots.len() as u64;
    if len == 0 {
        return None;
    }
    let own = slots[(hash % len) as usize] as usize;
    if backends.get(own).is_some_and(&eligible) {
        return Some(own);
    }
    for attempt in 1..=REHASHES {
        let index = slots[(rehash(hash, attempt) % len) as usize] as usize;
        if backends.get(index).is_some_and(&eligible) {
            return Some(index);
        }
    }
    let order = order.iter().map(|&i| i as usize);
    weighted_choice(backends, order, eligible, rehash(hash, REHASHES + 1))
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
        // Interleaved, never two of the light ones in a row.
        assert_eq!(s, vec![2, 0, 1, 2]);
    }
}
