//! Maglev consistent hashing (Eisenbud et al., NSDI 2016).
//!
//! Each backend gets a permutation of the table's slots from two hashes of its address
//! (offset and skip, xxh3 with fixed seeds); backends take turns claiming their next
//! preferred free slot until the table is full, a backend of weight w taking w turns per
//! round. Lookups are one hash and one array read. Removing one of n backends moves only
//! about 1/n of the keys.
//!
//! The table depends only on the set of (address, weight) pairs: backends are sorted by
//! address before the build, so two l4lb processes with the same backends, in any config
//! order, build byte-identical tables and agree on every flow (they can sit side by side
//! behind ECMP). Health is not part of the table: an unusable backend's keys rehash into
//! the same table (a key-dependent probe sequence, see [`super::pick_by_hash`]), so they
//! spread over the usable backends by weight, every instance agrees, no other key moves,
//! and they come back when it does. (Probing forward to the next slots would not be fair:
//! the build leaves runs of one backend's slots next to another's, so one neighbour took
//! 82% of a lost backend's keys.)

use std::net::SocketAddr;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::pick_by_hash;
use crate::backend::Backend;
use crate::flow_key::{FlowKey, HashKey};

/// The paper's default: a prime well above 100 x the backend count for pools of up to
/// a few hundred backends.
pub const DEFAULT_TABLE_SIZE: u32 = 65537;

const OFFSET_SEED: u64 = 0x6d61_676c_6576_6f66; // "maglevof"
const SKIP_SEED: u64 = 0x6d61_676c_6576_736b; // "maglevsk"

const EMPTY: u32 = u32::MAX;

/// Whether `n` is prime (trial division; table sizes are checked once, at config time).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u32;
    while u64::from(d) * u64::from(d) <= u64::from(n) {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Builds the lookup table for `backends` (address, weight): each entry is an index into
/// `backends`. `size` must be prime and at least the number of backends; the caller
/// (config validation) ensures it. An empty backend list gives an empty table.
pub fn build_table(backends: &[(SocketAddr, u32)], size: u32) -> Vec<u32> {
    let n = backends.len();
    if n == 0 || size == 0 {
        return Vec::new();
    }
    let m = u64::from(size);
    // Sorted by address so that config order does not matter.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| backends[i].0);
    let divisor = backends.iter().map(|b| b.1.max(1)).fold(0, gcd).max(1);

    struct Walker {
        index: u32,
        turns: u32,
        position: u64,
        skip: u64,
    }
    let mut walkers: Vec<Walker> = order
        .iter()
        .map(|&i| {
            let name = backends[i].0.to_string();
            let offset = xxh3_64_with_seed(name.as_bytes(), OFFSET_SEED) % m;
            let skip = if m > 1 {
                xxh3_64_with_seed(name.as_bytes(), SKIP_SEED) % (m - 1) + 1
            } else {
                1
            };
            Walker {
                index: i as u32,
                turns: backends[i].1.max(1) / divisor,
                position: offset,
                skip,
            }
        })
        .collect();

    let mut table = vec![EMPTY; size as usize];
    let mut filled = 0u64;
    while filled < m {
        for w in walkers.iter_mut() {
            for _ in 0..w.turns {
                // The permutation visits every slot once (size is prime, skip in 1..size),
                // and the table is not full, so a free slot is always found.
                while table[w.position as usize] != EMPTY {
                    w.position = (w.position + w.skip) % m;
                }
                table[w.position as usize] = w.index;
                w.position = (w.position + w.skip) % m;
                filled += 1;
                if filled == m {
                    return table;
                }
            }
        }
    }
    table
}

#[derive(Debug)]
pub(crate) struct Maglev {
    table: Vec<u32>,
    /// Backend indices sorted by address: the fallback's walk, identical in every instance.
    by_address: Vec<u32>,
    key: HashKey,
}

impl Maglev {
    pub(crate) fn new(backends: &[Backend], key: HashKey, table_size: u32) -> Self {
        let specs: Vec<(SocketAddr, u32)> = backends
            .iter()
            .map(|b| (b.spec.addr, b.spec.weight))
            .collect();
        let mut by_address: Vec<u32> = (0..backends.len() as u32).collect();
        by_address.sort_by_key(|&i| backends[i as usize].spec.addr);
        Maglev {
            table: build_table(&specs, table_size),
            by_address,
            key,
        }
    }

    #[inline]
    pub(crate) fn pick<F: Fn(&Backend) -> bool>(
        &self,
        backends: &[Backend],
        flow: &FlowKey,
        eligible: F,
    ) -> Option<usize> {
        pick_by_hash(
            &self.table,
            &self.by_address,
            flow.hash(self.key),
            backends,
            eligible,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: usize) -> Vec<(SocketAddr, u32)> {
        (0..n)
            .map(|i| {
                (
                    SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 80)),
                    1,
                )
            })
            .collect()
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537) && is_prime(655373) && is_prime(251) && is_prime(2));
        assert!(!is_prime(65536) && !is_prime(1) && !is_prime(0) && !is_prime(65535));
    }

    #[test]
    fn every_slot_is_filled_evenly() {
        let table = build_table(&backends(10), 65537);
        let mut counts = [0u32; 10];
        for &i in &table {
            counts[i as usize] += 1;
        }
        for c in counts {
            assert!((6500..=6610).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn weights_take_extra_turns() {
        let mut b = backends(3);
        b[2].1 = 2;
        let table = build_table(&b, 65537);
        let heavy = table.iter().filter(|&&i| i == 2).count();
        assert!((heavy as f64 / 65537.0 - 0.5).abs() < 0.01, "{heavy}");
    }

    #[test]
    fn config_order_does_not_matter() {
        let b = backends(7);
        let mut reversed = b.clone();
        reversed.reverse();
        let t1 = build_table(&b, 251);
        let t2 = build_table(&reversed, 251);
        let by_addr = |t: &[u32], b: &[(SocketAddr, u32)]| -> Vec<SocketAddr> {
            t.iter().map(|&i| b[i as usize].0).collect()
        };
        assert_eq!(by_addr(&t1, &b), by_addr(&t2, &reversed));
    }
}
