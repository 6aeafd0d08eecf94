use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::algorithms::{Algorithm, TierSelector};
use crate::backend::{Backend, BackendHandle, BackendSpec, BackendState, Health, MAX_WEIGHT};
use crate::flow_key::FlowKey;
use crate::outlier::OutlierSettings;

/// Why a pool could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    /// A pool needs at least one backend.
    #[error("pool has no backends")]
    Empty,
    /// Weight outside 1..=MAX_WEIGHT.
    #[error("backend {addr}: weight {weight} is outside 1..={MAX_WEIGHT}")]
    Weight {
        /// The backend.
        addr: SocketAddr,
        /// The rejected weight.
        weight: u32,
    },
    /// The same address twice in one pool.
    #[error("backend {0} is listed twice")]
    Duplicate(SocketAddr),
}

/// Backends of one kind (primaries or backups) and the algorithm's state over them.
#[derive(Debug)]
struct Tier {
    backends: Vec<Backend>,
    selector: TierSelector,
}

impl Tier {
    fn new(algorithm: Algorithm, backends: Vec<Backend>) -> Self {
        let selector = TierSelector::build(algorithm, &backends);
        Tier { backends, selector }
    }

    fn pick(&self, key: &FlowKey, exclude: &[SocketAddr], wanted: Health) -> Option<BackendHandle> {
        self.pick_where(key, exclude, wanted, |_| true)
    }

    fn pick_where(
        &self,
        key: &FlowKey,
        exclude: &[SocketAddr],
        wanted: Health,
        also: impl Fn(&Backend) -> bool,
    ) -> Option<BackendHandle> {
        if self.backends.is_empty() {
            return None;
        }
        let eligible =
            |b: &Backend| b.state.health() == wanted && !exclude.contains(&b.spec.addr) && also(b);
        let index = self.selector.pick(&self.backends, key, eligible)?;
        Some(BackendHandle::acquire(&self.backends[index].state))
    }

    fn contains(&self, state: &BackendState) -> bool {
        self.backends
            .iter()
            .any(|b| std::ptr::eq(Arc::as_ptr(&b.state), state))
    }
}

/// Everything selection reads for one pool, immutable once built.
#[derive(Debug)]
pub struct PoolSnapshot {
    algorithm: Algorithm,
    outlier: OutlierSettings,
    on_down: OnDown,
    slow_start: Duration,
    primary: Tier,
    backup: Tier,
}

impl PoolSnapshot {
    /// Builds a snapshot with the default passive detection settings (see
    /// [`PoolSnapshot::with_outlier`]). `carry` returns the existing state of a backend that
    /// was already in the pool (on reload), so its health and counters survive.
    pub fn build(
        algorithm: Algorithm,
        specs: &[BackendSpec],
        carry: impl Fn(SocketAddr) -> Option<Arc<BackendState>>,
    ) -> Result<Self, PoolError> {
        if specs.is_empty() {
            return Err(PoolError::Empty);
        }
        let mut seen = HashSet::new();
        let mut primary = Vec::new();
        let mut backup = Vec::new();
        for spec in specs {
            if spec.weight == 0 || spec.weight > MAX_WEIGHT {
                return Err(PoolError::Weight {
                    addr: spec.addr,
                    weight: spec.weight,
                });
            }
            if !seen.insert(spec.addr) {
                return Err(PoolError::Duplicate(spec.addr));
            }
            let state = carry(spec.addr).unwrap_or_else(|| Arc::new(BackendState::new(spec.addr)));
            let backend = Backend {
                spec: spec.clone(),
                state,
            };
            if spec.backup {
                backup.push(backend);
            } else {
                primary.push(backend);
            }
        }
        Ok(PoolSnapshot {
            algorithm,
            outlier: OutlierSettings::default(),
            on_down: OnDown::Keep,
            slow_start: Duration::ZERO,
            primary: Tier::new(algorithm, primary),
            backup: Tier::new(algorithm, backup),
        })
    }

    /// A snapshot with no backend (a pool whose backends come from service discovery,
    /// before its first answer): every selection finds nothing.
    pub fn empty(algorithm: Algorithm) -> Self {
        PoolSnapshot {
            algorithm,
            outlier: OutlierSettings::default(),
            on_down: OnDown::Keep,
            slow_start: Duration::ZERO,
            primary: Tier::new(algorithm, Vec::new()),
            backup: Tier::new(algorithm, Vec::new()),
        }
    }

    /// The same snapshot with these passive detection settings.
    pub fn with_outlier(mut self, outlier: OutlierSettings) -> Self {
        self.outlier = outlier;
        self
    }

    /// The same snapshot with this policy for live connections of a backend that goes down.
    pub fn with_on_down(mut self, on_down: OnDown) -> Self {
        self.on_down = on_down;
        self
    }

    /// What happens to the live connections of a backend that goes down.
    pub fn on_down(&self) -> OnDown {
        self.on_down
    }

    /// The same snapshot with this slow start: a backend that comes back up or is added
    /// gets a share of its weight growing from 10% to all of it over `slow_start`.
    pub fn with_slow_start(mut self, slow_start: Duration) -> Self {
        self.slow_start = slow_start;
        self
    }

    /// Slow start (zero: off).
    pub fn slow_start(&self) -> Duration {
        self.slow_start
    }

    /// Selects a usable backend not in `exclude` (addresses already tried for this
    /// connection). Backups are considered only when no primary qualifies. When nothing
    /// is usable but some backends are only ejected (suspected by passive detection, not
    /// proven dead by probes or switched off), they are tried rather than refusing the
    /// client: fail open, as Envoy's panic threshold and nginx's "all peers failed" reset.
    pub fn select(&self, key: &FlowKey, exclude: &[SocketAddr]) -> Option<BackendHandle> {
        if !self.slow_start.is_zero() && !self.algorithm.is_hashing() {
            // A ramping backend takes its turn with the probability of its share; when it
            // declines, the algorithm's fair skip passes the turn on by weight. If every
            // candidate declined, the plain pick below still serves the client.
            let now = std::cell::OnceCell::new();
            let now_ms = || *now.get_or_init(|| crate::clock::millis(std::time::Instant::now()));
            let ramp = |b: &Backend| {
                let share = b.state.slow_start_share(self.slow_start, now_ms);
                share >= 1.0 || fastrand::f64() < share
            };
            if let Some(handle) = self.primary.pick_where(key, exclude, Health::Up, ramp) {
                return Some(handle);
            }
        }
        self.primary
            .pick(key, exclude, Health::Up)
            .or_else(|| self.backup.pick(key, exclude, Health::Up))
            .or_else(|| self.primary.pick(key, exclude, Health::Ejected))
            .or_else(|| self.backup.pick(key, exclude, Health::Ejected))
    }

    /// The algorithm this snapshot was built for.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Passive detection settings.
    pub fn outlier(&self) -> &OutlierSettings {
        &self.outlier
    }

    /// All backends, primaries first.
    pub fn backends(&self) -> impl Iterator<Item = &Backend> {
        self.primary
            .backends
            .iter()
            .chain(self.backup.backends.iter())
    }

    /// The tier (primaries or backups) that holds `state`, if this snapshot has it.
    pub(crate) fn tier_of(&self, state: &BackendState) -> Option<&[Backend]> {
        [&self.primary, &self.backup]
            .into_iter()
            .find(|tier| tier.contains(state))
            .map(|tier| tier.backends.as_slice())
    }

    /// Whether any backend takes new connections.
    pub fn has_usable(&self) -> bool {
        self.backends().any(|b| b.state.is_usable())
    }
}

/// What happens to a backend's live connections when checks mark it down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnDown {
    /// They go on (the backend may still serve them; a draining-like end).
    #[default]
    Keep,
    /// They are reset, so clients reconnect to a healthy backend at once (a database
    /// primary that was demoted: HAProxy's `on-marked-down shutdown-sessions`).
    Close,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Health;
    use crate::flow_key::Protocol;

    fn spec(port: u16, weight: u32, backup: bool) -> BackendSpec {
        BackendSpec {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            weight,
            backup,
        }
    }

    fn key() -> FlowKey {
        FlowKey {
            client: SocketAddr::from(([127, 0, 0, 2], 40000)),
            local: SocketAddr::from(([127, 0, 0, 1], 80)),
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn weighted_round_robin_spreads_by_weight() {
        let snap = PoolSnapshot::build(
            Algorithm::RoundRobin,
            &[spec(1, 1, false), spec(2, 1, false), spec(3, 2, false)],
            |_| None,
        )
        .unwrap();
        let mut counts = [0u32; 4];
        for _ in 0..4000 {
            let h = snap.select(&key(), &[]).unwrap();
            counts[h.addr().port() as usize] += 1;
        }
        assert_eq!(&counts[1..], &[1000, 1000, 2000]);
    }

    #[test]
    fn handle_counts_active_connections() {
        let snap =
            PoolSnapshot::build(Algorithm::RoundRobin, &[spec(1, 1, false)], |_| None).unwrap();
        let h1 = snap.select(&key(), &[]).unwrap();
        let h2 = snap.select(&key(), &[]).unwrap();
        assert_eq!(h1.state().active(), 2);
        drop(h1);
        assert_eq!(h2.state().active(), 1);
        assert_eq!(h2.state().total(), 2);
    }

    #[test]
    fn backups_only_when_no_primary_is_usable() {
        let snap = PoolSnapshot::build(
            Algorithm::RoundRobin,
            &[spec(1, 1, false), spec(2, 1, false), spec(9, 1, true)],
            |_| None,
        )
        .unwrap();
        for _ in 0..10 {
            assert_ne!(snap.select(&key(), &[]).unwrap().addr().port(), 9);
        }
        let primaries: Vec<_> = snap.backends().filter(|b| !b.spec.backup).collect();
        primaries[0].state.set_health(Health::Down);
        primaries[1].state.set_health(Health::Draining);
        for _ in 0..10 {
            assert_eq!(snap.select(&key(), &[]).unwrap().addr().port(), 9);
        }
        primaries[1].state.set_health(Health::Up);
        assert_eq!(snap.select(&key(), &[]).unwrap().addr().port(), 2);
    }

    #[test]
    fn draining_backend_keeps_its_live_handles_but_gets_no_new_ones() {
        let snap = PoolSnapshot::build(
            Algorithm::LeastConn,
            &[spec(1, 1, false), spec(2, 1, false)],
            |_| None,
        )
        .unwrap();
        let held: Vec<_> = (0..10).map(|_| snap.select(&key(), &[]).unwrap()).collect();
        let draining = Arc::clone(&snap.backends().next().unwrap().state);
        let before = draining.active();
        assert!(before > 0);
        draining.set_health(Health::Draining);
        for _ in 0..50 {
            assert_ne!(snap.select(&key(), &[]).unwrap().addr(), draining.addr());
        }
        assert_eq!(draining.active(), before, "live connections stay counted");
        drop(held);
        assert_eq!(draining.active(), 0, "released as they end");
    }

    #[test]
    fn excluded_backends_are_skipped_and_exhaustion_is_none() {
        let snap = PoolSnapshot::build(
            Algorithm::RoundRobin,
            &[spec(1, 1, false), spec(2, 1, false)],
            |_| None,
        )
        .unwrap();
        let a = snap.select(&key(), &[]).unwrap().addr();
        let b = snap.select(&key(), &[a]).unwrap().addr();
        assert_ne!(a, b);
        assert!(snap.select(&key(), &[a, b]).is_none());
    }

    #[test]
    fn bad_pools_are_rejected() {
        assert_eq!(
            PoolSnapshot::build(Algorithm::RoundRobin, &[], |_| None).unwrap_err(),
            PoolError::Empty
        );
        assert!(matches!(
            PoolSnapshot::build(Algorithm::RoundRobin, &[spec(1, 0, false)], |_| None),
            Err(PoolError::Weight { .. })
        ));
        assert!(matches!(
            PoolSnapshot::build(
                Algorithm::RoundRobin,
                &[spec(1, 1, false), spec(1, 2, false)],
                |_| None
            ),
            Err(PoolError::Duplicate(_))
        ));
    }

    #[test]
    fn carried_state_survives_a_rebuild() {
        let old =
            PoolSnapshot::build(Algorithm::RoundRobin, &[spec(1, 1, false)], |_| None).unwrap();
        let state = Arc::clone(&old.backends().next().unwrap().state);
        state.set_health(Health::Down);
        let new = PoolSnapshot::build(
            Algorithm::RoundRobin,
            &[spec(1, 1, false), spec(2, 1, false)],
            |addr| {
                old.backends()
                    .find(|b| b.spec.addr == addr)
                    .map(|b| b.state.clone())
            },
        )
        .unwrap();
        assert_eq!(new.backends().next().unwrap().state.health(), Health::Down);
    }

    #[test]
    fn slow_start_ramps_a_returning_backend_for_every_weighted_algorithm() {
        let state = BackendState::new(SocketAddr::from(([127, 0, 0, 1], 2)));
        let ramp = Duration::from_secs(10);
        assert_eq!(
            state.slow_start_share(ramp, || 5_000),
            1.0,
            "never came back"
        );
        state.mark_added(std::time::Instant::now());
        let at = |ms: u64| {
            let returned = crate::clock::millis(std::time::Instant::now());
            state.slow_start_share(ramp, move || returned + ms)
        };
        assert!((at(0) - 0.1).abs() < 0.01);
        assert!((at(5_000) - 0.5).abs() < 0.01);
        assert_eq!(at(10_000), 1.0);

        for algorithm in [
            Algorithm::RoundRobin,
            Algorithm::LeastConn,
            Algorithm::PowerOfTwo,
            Algorithm::LeastTime(crate::TimeMetric::Connect),
        ] {
            let snap =
                PoolSnapshot::build(algorithm, &[spec(1, 1, false), spec(2, 1, false)], |_| None)
                    .unwrap()
                    .with_slow_start(Duration::from_secs(3600));
            let fresh = snap.backends().find(|b| b.spec.addr.port() == 2).unwrap();
            fresh.state.mark_added(std::time::Instant::now());
            let mut fresh_picks = 0;
            for _ in 0..10_000 {
                // Handles are dropped at once: connection counts stay equal (least_conn).
                if snap.select(&key(), &[]).unwrap().addr().port() == 2 {
                    fresh_picks += 1;
                }
            }
            // At 10% of its weight it gets about 1 pick in 11, never its full half.
            assert!(
                (500..=1_500).contains(&fresh_picks),
                "{algorithm:?}: {fresh_picks} of 10000"
            );
            // Alone, it still serves: slow start never refuses a client.
            let only = PoolSnapshot::build(algorithm, &[spec(2, 1, false)], |_| None)
                .unwrap()
                .with_slow_start(Duration::from_secs(3600));
            only.backends()
                .next()
                .unwrap()
                .state
                .mark_added(std::time::Instant::now());
            assert!(only.select(&key(), &[]).is_some());
        }
    }
}
