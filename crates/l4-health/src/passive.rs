//! Passive detection: connect failures seen by the data path. `fall` of them within
//! `interval x fall` take an up backend down at once, without waiting for a probe. Only
//! active probes bring it back (the checker probes down backends even in pools without a
//! `health:` section).

use std::collections::HashMap;
use std::fmt::Display;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use l4_balance::{BackendState, Health, Pool};

use crate::{announce, HealthSettings};

const COUNT_BITS: u32 = 24;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

/// Failure windows of one pool's backends. Lock-free: each window is one atomic word
/// (start in ms since `epoch`, count).
#[derive(Debug)]
pub struct Passive {
    pool: Arc<Pool>,
    fall: u32,
    window: Duration,
    epoch: Instant,
    windows: HashMap<SocketAddr, AtomicU64>,
}

impl Passive {
    /// Passive detection for every backend of `pool`.
    pub fn new(pool: Arc<Pool>, settings: &HealthSettings) -> Self {
        let windows = pool
            .snapshot()
            .backends()
            .map(|b| (b.spec.addr, AtomicU64::new(0)))
            .collect();
        Passive {
            pool,
            fall: settings.fall.max(1),
            window: settings.interval.saturating_mul(settings.fall.max(1)),
            epoch: Instant::now(),
            windows,
        }
    }

    /// Records a failed connect to `backend`; marks it down when this is the `fall`th
    /// failure within the window. Returns whether it was marked down.
    pub fn connect_failed(&self, backend: &BackendState, reason: &dyn Display) -> bool {
        // Only an up backend accumulates failures: connects that were in flight when it
        // went down must not pre-fill the window it comes back with.
        if backend.health() != Health::Up {
            return false;
        }
        let Some(window) = self.windows.get(&backend.addr()) else {
            return false;
        };
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX >> COUNT_BITS);
        let window_ms = u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX);
        let mut count = 0;
        let _ = window.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |word| {
            let (start, n) = (word >> COUNT_BITS, word & COUNT_MASK);
            let (start, n) = if n == 0 || now.saturating_sub(start) > window_ms {
                (now, 1)
            } else {
                (start, (n + 1).min(COUNT_MASK))
            };
            count = n;
            Some((start << COUNT_BITS) | n)
        });
        if count < u64::from(self.fall) {
            return false;
        }
        window.store(0, Ordering::Relaxed);
        if !backend.transition(Health::Up, Health::Down) {
            return false;
        }
        let why = format!(
            "{count} connect failures within {:?} (last: {reason})",
            self.window
        );
        announce(&self.pool, backend.addr(), false, &why);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fall_failures_in_the_window_mark_down_once() {
        let (pool, state) = crate::test_pool();
        let settings = HealthSettings {
            interval: Duration::from_secs(60),
            fall: 3,
            ..HealthSettings::default()
        };
        let passive = Passive::new(Arc::clone(&pool), &settings);
        assert!(!passive.connect_failed(&state, &"refused"));
        assert!(!passive.connect_failed(&state, &"refused"));
        assert_eq!(state.health(), Health::Up);
        assert!(passive.connect_failed(&state, &"refused"));
        assert_eq!(state.health(), Health::Down);
        for _ in 0..5 {
            assert!(
                !passive.connect_failed(&state, &"refused"),
                "down already: no second event"
            );
        }
        // Back up (by probes): the failures seen while down did not pre-fill the window.
        state.set_health(Health::Up);
        assert!(!passive.connect_failed(&state, &"refused"));
        assert_eq!(state.health(), Health::Up);
    }

    #[test]
    fn passive_never_overrides_draining() {
        let (pool, state) = crate::test_pool();
        let passive = Passive::new(
            Arc::clone(&pool),
            &HealthSettings {
                fall: 1,
                ..HealthSettings::default()
            },
        );
        state.set_health(Health::Draining);
        assert!(!passive.connect_failed(&state, &"refused"));
        assert_eq!(state.health(), Health::Draining);
    }
}
