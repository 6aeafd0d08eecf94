//! Per-source limits (`max_connections_per_source`, `max_new_connections_per_second_per_source`,
//! `max_new_flows_per_second_per_source`) in fixed memory, lock-free.
//!
//! A table keyed by source address would grow with a spoofed flood. Instead each source is
//! counted in two slots of a fixed array (a count-min sketch, two xxh3 hashes with fixed
//! seeds), and its count is the smaller of the two: exact unless both slots are shared with
//! other busy sources, in which case the count is over-estimated (a source may be refused a
//! little early, never let past its limit). Fixed sizes whatever the traffic: 256 Ki
//! slots for concurrent connections (1 MiB; 100,000 connections from distinct sources load
//! a slot with 0.8 on average, far below any useful limit) and 64 Ki for rates (512 KiB;
//! windows restart every second).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64_with_seed;

const CONCURRENT_SLOTS: usize = 1 << 18;
const RATE_SLOTS: usize = 1 << 16;
const SEEDS: [u64; 2] = [0x6c34_6c62_7372_6331, 0x6c34_6c62_7372_6332]; // "l4lbsrc1", "l4lbsrc2"

fn slots_of(ip: IpAddr, slots: usize) -> [usize; 2] {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let bytes = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    SEEDS.map(|seed| (xxh3_64_with_seed(&bytes, seed) as usize) & (slots - 1))
}

/// Concurrent connections per source.
#[derive(Debug)]
pub struct ConcurrentPerSource {
    max: AtomicU32,
    counts: Box<[AtomicU32]>,
}

/// One source's admitted connection; releases its count when dropped.
#[derive(Debug)]
pub struct SourceSlot {
    table: Arc<ConcurrentPerSource>,
    slots: [usize; 2],
}

impl ConcurrentPerSource {
    /// At most `max` connections at once per source address.
    pub fn new(max: u32) -> Arc<Self> {
        Arc::new(ConcurrentPerSource {
            max: AtomicU32::new(max),
            counts: (0..CONCURRENT_SLOTS).map(|_| AtomicU32::new(0)).collect(),
        })
    }

    /// Admits one more connection from `ip`, or `None` if it has `max` already.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let slots = slots_of(ip, CONCURRENT_SLOTS);
        let counted = slots.map(|s| self.counts[s].fetch_add(1, Ordering::AcqRel) + 1);
        let slot = SourceSlot {
            table: Arc::clone(self),
            slots,
        };
        // Dropping the slot takes the counts back when refused.
        let max = self.max.load(Ordering::Relaxed);
        (counted.iter().min().copied().unwrap_or(0) <= max).then_some(slot)
    }
}

impl ConcurrentPerSource {
    /// A new limit (a reload); the counts of live connections carry over.
    pub fn set_max(&self, max: u32) {
        self.max.store(max, Ordering::Relaxed);
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        for s in self.slots {
            self.table.counts[s].fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// New connections (or flows) per second per source: each slot holds (second, count).
#[derive(Debug)]
pub struct RatePerSource {
    per_second: AtomicU32,
    windows: Box<[AtomicU64]>,
}

impl RatePerSource {
    /// At most `per_second` new ones per second per source address.
    pub fn new(per_second: u32) -> Arc<Self> {
        Arc::new(RatePerSource {
            per_second: AtomicU32::new(per_second),
            windows: (0..RATE_SLOTS).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// Counts one from `ip` in second `now_s`; whether it is within the rate. Refused ones
    /// count too, so a source that keeps hammering stays refused for the second.
    pub fn admit(&self, ip: IpAddr, now_s: u32) -> bool {
        let counts = slots_of(ip, RATE_SLOTS).map(|s| {
            let mut count = 0;
            let _ = self.windows[s].fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                let (second, n) = ((w >> 32) as u32, w as u32);
                count = if second == now_s {
                    n.saturating_add(1)
                } else {
                    1
                };
                Some((u64::from(now_s) << 32) | u64::from(count))
            });
            count
        });
        counts.iter().min().copied().unwrap_or(0) <= self.per_second.load(Ordering::Relaxed)
    }

    /// A new rate (a reload).
    pub fn set_rate(&self, per_second: u32) {
        self.per_second.store(per_second, Ordering::Relaxed);
    }
}

/// The current second, for [`RatePerSource::admit`].
pub fn now_second() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_limit_holds_per_source_and_releases() {
        let table = ConcurrentPerSource::new(10);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let held: Vec<_> = (0..10).map(|_| table.try_acquire(a).unwrap()).collect();
        assert!(table.try_acquire(a).is_none(), "the 11th is refused");
        assert!(table.try_acquire(b).is_some(), "another source is not");
        drop(held);
        assert!(table.try_acquire(a).is_some(), "released when they end");
    }

    #[test]
    fn rate_limit_resets_every_second() {
        let rate = RatePerSource::new(3);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let admitted = (0..5).filter(|_| rate.admit(a, 100)).count();
        assert_eq!(admitted, 3);
        assert!(rate.admit("192.0.2.9".parse().unwrap(), 100));
        assert!(rate.admit(a, 101), "a new second");
    }

    #[test]
    fn a_spoofed_flood_does_not_grow_memory_or_lock_out_others() {
        let table = ConcurrentPerSource::new(10);
        let held: Vec<_> = (0..100_000u32)
            .filter_map(|i| table.try_acquire(IpAddr::from(i.to_be_bytes())))
            .collect();
        assert_eq!(held.len(), 100_000, "distinct sources all pass");
        assert_eq!(table.counts.len(), CONCURRENT_SLOTS, "no growth");
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let mine: Vec<_> = (0..10).map(|_| table.try_acquire(a).unwrap()).collect();
        assert!(
            table.try_acquire(a).is_none(),
            "the limit still holds amid the flood"
        );
        drop(mine);
    }
}
