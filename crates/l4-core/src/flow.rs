//! The UDP flow table: a sans-io state machine. Time is passed in, nothing here touches a
//! socket, so expiry and eviction are tested exactly, without sleeping.
//!
//! Flows are keyed by the client (its address, and the upstream's when a PROXY header
//! names the client; the table is per listener and per worker, so the listener half of
//! the key is implicit). The table is capped: inserting into a full
//! table evicts the least recently used flow, so a flood of new source ports can never
//! grow it past `capacity` entries. A flow expires once `idle_timeout` has passed since
//! its last activity, where activity is a client datagram (`get_mut`) or whatever the
//! caller reports through `expire`'s `activity` (backend replies, counted elsewhere).

use std::hash::Hash;
use std::time::{Duration, Instant};

use lru::LruCache;

#[derive(Debug)]
struct Entry<V> {
    value: V,
    last_seen: Instant,
}

/// Why a flow left the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowEnd {
    /// No traffic for `idle_timeout`.
    Idle,
    /// Evicted to make room under the cap.
    Evicted,
    /// Its backend became unusable; the next datagram re-selects.
    BackendDown,
    /// The listener stopped.
    Shutdown,
}

impl FlowEnd {
    /// Short name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            FlowEnd::Idle => "idle_timeout",
            FlowEnd::Evicted => "evicted",
            FlowEnd::BackendDown => "backend_down",
            FlowEnd::Shutdown => "shutdown",
        }
    }
}

/// A capped, LRU-ordered table of flows with idle expiry. Memory grows with the flows
/// present, never preallocated for the cap (a cap of millions costs nothing until used).
#[derive(Debug)]
pub struct FlowTable<K: Hash + Eq, V> {
    flows: LruCache<K, Entry<V>>,
    capacity: usize,
    idle_timeout: Duration,
}

impl<K: Hash + Eq + Copy, V> FlowTable<K, V> {
    /// A table of at most `capacity` flows (at least 1) expiring after `idle_timeout`.
    pub fn new(capacity: usize, idle_timeout: Duration) -> Self {
        FlowTable {
            flows: LruCache::unbounded(),
            capacity: capacity.max(1),
            idle_timeout,
        }
    }

    /// New limits (a reload): a smaller cap evicts on the next new flows, not at once.
    pub fn set_limits(&mut self, capacity: usize, idle_timeout: Duration) {
        self.capacity = capacity.max(1);
        self.idle_timeout = idle_timeout;
    }

    /// Whether a new flow would have to evict one.
    pub fn is_full(&self) -> bool {
        self.flows.len() >= self.capacity
    }

    /// Flows in the table.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// The flow of `client`, marked as active at `now` (most recently used).
    pub fn get_mut(&mut self, client: &K, now: Instant) -> Option<&mut V> {
        let entry = self.flows.get_mut(client)?;
        entry.last_seen = now;
        Some(&mut entry.value)
    }

    /// Inserts a new flow, active at `now`. Returns the flow that had to go: the previous
    /// flow of the same client, or, when the table was full, the least recently used one.
    pub fn insert(&mut self, client: K, value: V, now: Instant) -> Option<(K, V)> {
        let entry = Entry {
            value,
            last_seen: now,
        };
        if !self.flows.contains(&client) && self.is_full() {
            let evicted = self.flows.pop_lru().map(|(k, e)| (k, e.value));
            self.flows.push(client, entry);
            return evicted;
        }
        self.flows.push(client, entry).map(|(k, e)| (k, e.value))
    }

    /// Removes the flow of `client`.
    pub fn remove(&mut self, client: &K) -> Option<V> {
        self.flows.pop(client).map(|e| e.value)
    }

    /// Removes and returns every flow for which `pred` holds.
    pub fn remove_where(&mut self, pred: impl Fn(&V) -> bool) -> Vec<(K, V)> {
        let keys: Vec<K> = self
            .flows
            .iter()
            .filter(|(_, e)| pred(&e.value))
            .map(|(k, _)| *k)
            .collect();
        keys.into_iter()
            .filter_map(|k| self.flows.pop(&k).map(|e| (k, e.value)))
            .collect()
    }

    /// Removes the least recently used flow (to free its resources for a new one).
    pub fn pop_oldest(&mut self) -> Option<(K, V)> {
        self.flows.pop_lru().map(|(k, e)| (k, e.value))
    }

    /// Removes and returns every flow idle for `idle_timeout` or longer at `now`.
    /// `activity` may report a later activity time than the table saw (a backend reply);
    /// such a flow is kept and moved to the most recent end.
    pub fn expire(
        &mut self,
        now: Instant,
        activity: impl Fn(&V) -> Option<Instant>,
    ) -> Vec<(K, V)> {
        let mut expired = Vec::new();
        // Each step either removes the oldest flow or refreshes it to "now-ish", so the loop
        // ends after at most len() steps.
        for _ in 0..self.flows.len() {
            let Some((_, oldest)) = self.flows.peek_lru() else {
                break;
            };
            let seen = match activity(&oldest.value) {
                Some(t) if t > oldest.last_seen => t,
                _ => oldest.last_seen,
            };
            if now.saturating_duration_since(seen) >= self.idle_timeout {
                if let Some((k, e)) = self.flows.pop_lru() {
                    expired.push((k, e.value));
                }
            } else if seen > oldest.last_seen {
                let Some((k, mut e)) = self.flows.pop_lru() else {
                    break;
                };
                e.last_seen = seen;
                self.flows.push(k, e);
            } else {
                break;
            }
        }
        expired
    }

    /// Removes every flow (on shutdown).
    pub fn drain(&mut self) -> Vec<(K, V)> {
        let mut all = Vec::with_capacity(self.flows.len());
        while let Some((k, e)) = self.flows.pop_lru() {
            all.push((k, e.value));
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn client(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 2], port))
    }

    const IDLE: Duration = Duration::from_secs(30);

    #[test]
    fn expiry_happens_at_exactly_idle_timeout() {
        let t0 = Instant::now();
        let mut table = FlowTable::new(10, IDLE);
        table.insert(client(1), "a", t0);
        assert!(table
            .expire(t0 + IDLE - Duration::from_nanos(1), |_| None)
            .is_empty());
        let gone = table.expire(t0 + IDLE, |_| None);
        assert_eq!(gone, vec![(client(1), "a")]);
        assert!(table.is_empty());
    }

    #[test]
    fn a_flow_touched_just_before_expiry_survives() {
        let t0 = Instant::now();
        let mut table = FlowTable::new(10, IDLE);
        table.insert(client(1), "a", t0);
        table.insert(client(2), "b", t0);
        let touch = t0 + IDLE - Duration::from_millis(1);
        assert!(table.get_mut(&client(1), touch).is_some());
        let gone = table.expire(t0 + IDLE, |_| None);
        assert_eq!(gone, vec![(client(2), "b")]);
        assert!(table
            .expire(touch + IDLE - Duration::from_nanos(1), |_| None)
            .is_empty());
        assert_eq!(table.expire(touch + IDLE, |_| None).len(), 1);
    }

    #[test]
    fn outside_activity_keeps_a_flow() {
        let t0 = Instant::now();
        let mut table = FlowTable::new(10, IDLE);
        table.insert(client(1), t0 + Duration::from_secs(20), t0); // a reply at +20s
        table.insert(client(2), t0, t0);
        let gone = table.expire(t0 + IDLE, |reply| Some(*reply));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].0, client(2));
        assert_eq!(table.len(), 1);
        assert_eq!(
            table
                .expire(t0 + Duration::from_secs(50), |reply| Some(*reply))
                .len(),
            1
        );
    }

    #[test]
    fn lru_eviction_at_the_cap() {
        let t0 = Instant::now();
        let mut table = FlowTable::new(3, IDLE);
        for p in 1..=3 {
            assert!(table.insert(client(p), p, t0).is_none());
        }
        table.get_mut(&client(1), t0 + Duration::from_secs(1)); // 2 is now the oldest
        let evicted = table.insert(client(4), 4, t0 + Duration::from_secs(2));
        assert_eq!(evicted, Some((client(2), 2)));
        assert_eq!(table.len(), 3);
        // A flood of new ports never grows the table.
        for p in 100..10_000 {
            table.insert(client(p), p, t0);
            assert!(table.len() <= 3);
        }
    }
}
