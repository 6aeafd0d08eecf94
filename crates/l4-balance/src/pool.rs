//! A named pool: the published snapshot, and the one place where a backend's health
//! changes are decided and announced (passive detection here, probes in l4-health).

use std::fmt::Display;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::{ArcSwap, Guard};

use crate::backend::{BackendHandle, BackendState, FailureReason, Health};
use crate::flow_key::FlowKey;
use crate::snapshot::PoolSnapshot;

/// A named pool: the published snapshot readers load with one atomic operation.
#[derive(Debug)]
pub struct Pool {
    name: String,
    snapshot: ArcSwap<PoolSnapshot>,
    /// Held (never waited on) while one failure report decides on an ejection, so two
    /// workers cannot both see room under the cap and eject past it. A report that finds
    /// it taken leaves the decision to the next failure.
    ejecting: AtomicBool,
}

impl Pool {
    /// A pool publishing `snapshot`.
    pub fn new(name: impl Into<String>, snapshot: PoolSnapshot) -> Self {
        Pool {
            name: name.into(),
            snapshot: ArcSwap::from_pointee(snapshot),
            ejecting: AtomicBool::new(false),
        }
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Guard<Arc<PoolSnapshot>> {
        self.snapshot.load()
    }

    /// Publishes a new snapshot; readers see either the old or the new one, whole.
    pub fn publish(&self, snapshot: PoolSnapshot) {
        self.snapshot.store(Arc::new(snapshot));
    }

    /// The state of the backend at `addr` in the current snapshot, if present.
    pub fn backend_state(&self, addr: SocketAddr) -> Option<Arc<BackendState>> {
        self.snapshot
            .load()
            .backends()
            .find(|b| b.spec.addr == addr)
            .map(|b| Arc::clone(&b.state))
    }

    /// Selects a backend; see [`PoolSnapshot::select`].
    pub fn select(&self, key: &FlowKey, exclude: &[SocketAddr]) -> Option<BackendHandle> {
        self.snapshot.load().select(key, exclude)
    }

    /// The data path reached the backend (a TCP connect, or a UDP reply): its failure
    /// streak ends. An ejected backend that was tried because nothing else was usable
    /// (fail open) and answered comes back at once, without waiting for probes.
    #[inline]
    pub fn connect_succeeded(&self, state: &BackendState, now: Instant) {
        state.record_connect_success();
        self.connect_accepted(state, now);
    }

    /// The backend accepted a connection, but whether it serves it is not known yet
    /// (`empty_close_fails`: the streak ends only once a byte moves, through
    /// [`Pool::connect_succeeded`]). A fail-open ejected backend still comes back at once.
    #[inline]
    pub fn connect_accepted(&self, state: &BackendState, now: Instant) {
        if state.health() == Health::Ejected && !self.snapshot.load().has_usable() {
            if let Some(from) = state.mark_up(now) {
                self.announce(
                    state.addr(),
                    from,
                    Health::Up,
                    &"a connect succeeded while no other backend was usable",
                );
            }
        }
    }

    /// The data path failed to reach the backend (refused, timed out, unreachable; never
    /// l4lb's own shortage of descriptors or ports). After the pool's `failures` in a row
    /// an up backend is ejected, unless that would eject more than `max_ejection_percent`
    /// of its tier. Returns whether this report ejected it.
    pub fn connect_failed(
        &self,
        state: &BackendState,
        kind: FailureReason,
        reason: &dyn Display,
        now: Instant,
    ) -> bool {
        state.stats.record_failure(kind);
        state.note_failure_kind(kind == FailureReason::EmptyClose);
        let streak = state.record_connect_failure();
        let snapshot = self.snapshot.load();
        let settings = *snapshot.outlier();
        // Only an up backend is ejected: connects that were in flight when it went down
        // must not eject it again, and the operator's states are never overridden.
        if streak < settings.failures
            || settings.max_ejection_percent == 0
            || state.health() != Health::Up
        {
            return false;
        }
        if self
            .ejecting
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        let decision = match snapshot.tier_of(state) {
            Some(tier) if settings.may_eject(tier) => state.eject(now, &settings).ok_or(false),
            Some(_) => Err(true),
            None => Err(false),
        };
        self.ejecting.store(false, Ordering::Release);
        match decision {
            Ok(out) => {
                let why = format!(
                    "{streak} connect failures in a row (last: {reason}); out for at least {}",
                    humanize(out)
                );
                self.announce(state.addr(), Health::Up, Health::Ejected, &why);
                true
            }
            Err(capped) => {
                if capped && state.first_cap_warning() {
                    tracing::warn!(
                        pool = self.name(),
                        backend = %state.addr(),
                        failures = streak,
                        max_ejection_percent = settings.max_ejection_percent,
                        "backend keeps failing but is not ejected: the pool's ejection cap is reached"
                    );
                }
                false
            }
        }
    }

    /// Logs a health change of `backend` (one event with both states and the reason),
    /// then, once, that the pool just lost its last usable backend or got one back.
    pub fn announce(&self, backend: SocketAddr, from: Health, to: Health, reason: &dyn Display) {
        let (from_name, to_name) = (from.as_str(), to.as_str());
        if to == Health::Up {
            tracing::info!(pool = self.name(), backend = %backend, from = from_name, to = to_name, reason = %reason, "backend state changed");
        } else {
            tracing::warn!(pool = self.name(), backend = %backend, from = from_name, to = to_name, reason = %reason, "backend state changed");
        }
        let snapshot = self.snapshot.load();
        if let Some(b) = snapshot.backends().find(|b| b.spec.addr == backend) {
            b.state.stats.record_state_change();
            b.state.set_why(reason.to_string());
            // Proven dead from up (a demoted primary); not an ejected backend's probe
            // failing, which passive suspicion put out of rotation already.
            if from == Health::Up
                && to == Health::Down
                && snapshot.on_down() == crate::OnDown::Close
            {
                let live = b.state.active();
                b.state.cut_sessions();
                tracing::warn!(pool = self.name(), backend = %backend, connections = live, "on_down: close: resetting the backend's live connections");
            }
        }
        let usable = snapshot.backends().filter(|b| b.state.is_usable()).count();
        // Said when the pool loses its last usable backend, not again when an unusable
        // one changes kind (ejected -> down).
        if from == Health::Up && to != Health::Up && usable == 0 {
            let ejected = snapshot
                .backends()
                .any(|b| b.state.health() == Health::Ejected);
            if ejected {
                tracing::error!(
                    pool = self.name(),
                    "pool has no usable backend: new clients try the ejected ones (fail open)"
                );
            } else {
                tracing::error!(
                    pool = self.name(),
                    "pool has no usable backend: new clients are closed at once"
                );
            }
        } else if to == Health::Up && usable == 1 {
            tracing::warn!(pool = self.name(), "pool has a usable backend again");
        }
    }
}

fn humanize(d: std::time::Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::algorithms::Algorithm;
    use crate::backend::BackendSpec;
    use crate::flow_key::Protocol;
    use crate::outlier::OutlierSettings;

    fn pool(n: u16, outlier: OutlierSettings) -> (Pool, Vec<Arc<BackendState>>) {
        let specs: Vec<BackendSpec> = (1..=n)
            .map(|port| BackendSpec {
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                weight: 1,
                backup: false,
            })
            .collect();
        let snapshot = PoolSnapshot::build(Algorithm::RoundRobin, &specs, |_| None)
            .unwrap()
            .with_outlier(outlier);
        let pool = Pool::new("p", snapshot);
        let states = pool
            .snapshot()
            .backends()
            .map(|b| b.state.clone())
            .collect();
        (pool, states)
    }

    fn key() -> FlowKey {
        FlowKey {
            client: SocketAddr::from(([127, 0, 0, 2], 40000)),
            local: SocketAddr::from(([127, 0, 0, 1], 80)),
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn only_failures_in_a_row_eject() {
        let (pool, s) = pool(4, OutlierSettings::default());
        let now = Instant::now();
        for _ in 0..10 {
            assert!(!pool.connect_failed(&s[0], FailureReason::Refused, &"refused", now));
            assert!(!pool.connect_failed(&s[0], FailureReason::Refused, &"refused", now));
            pool.connect_succeeded(&s[0], now);
        }
        assert_eq!(s[0].health(), Health::Up, "a success resets the streak");
        assert!(!pool.connect_failed(&s[0], FailureReason::Refused, &"refused", now));
        assert!(!pool.connect_failed(&s[0], FailureReason::Refused, &"refused", now));
        assert!(pool.connect_failed(&s[0], FailureReason::Refused, &"refused", now));
        assert_eq!(s[0].health(), Health::Ejected);
        assert!(
            !pool.connect_failed(&s[0], FailureReason::Refused, &"refused", now),
            "ejected already: no second event"
        );
    }

    #[test]
    fn never_more_than_the_cap_is_ejected() {
        let (pool, s) = pool(4, OutlierSettings::default());
        let now = Instant::now();
        for state in &s[..3] {
            for _ in 0..10 {
                pool.connect_failed(state, FailureReason::Refused, &"refused", now);
            }
        }
        let ejected = s.iter().filter(|b| b.health() == Health::Ejected).count();
        assert_eq!(ejected, 2, "50% of 4");
        assert_eq!(
            s[2].health(),
            Health::Up,
            "the third keeps taking connections"
        );
        // A probe proves one dead: it no longer counts, and the third may go.
        assert_eq!(s[0].mark_down(), Some(Health::Ejected));
        assert!(pool.connect_failed(&s[2], FailureReason::Refused, &"refused", now));
    }

    #[test]
    fn ejection_time_grows_when_a_backend_fails_again_soon() {
        let settings = OutlierSettings {
            failures: 1,
            max_ejection_percent: 100,
            ejection_time: Duration::from_secs(2),
            max_ejection_time: Duration::from_secs(5),
            ..OutlierSettings::default()
        };
        let (pool, s) = pool(1, settings);
        let mut now = Instant::now();
        let mut outs = Vec::new();
        for _ in 0..4 {
            assert!(pool.connect_failed(&s[0], FailureReason::Refused, &"refused", now));
            let mut out = Duration::ZERO;
            while !s[0].ejection_over(now + out) {
                out += Duration::from_millis(100);
            }
            outs.push(out);
            assert!(!s[0].ejection_over(now));
            now += out;
            assert_eq!(s[0].mark_up(now), Some(Health::Ejected));
            now += Duration::from_secs(1);
        }
        let secs: Vec<u64> = outs.iter().map(|d| d.as_secs()).collect();
        assert_eq!(secs, vec![2, 4, 5, 5], "linear growth, capped");
        // Up for longer than max_ejection_time: the next ejection starts over.
        now += Duration::from_secs(10);
        assert!(pool.connect_failed(&s[0], FailureReason::Refused, &"refused", now));
        assert!(s[0].ejection_over(now + Duration::from_secs(2)));
    }

    #[test]
    fn a_pool_of_ejected_backends_fails_open_and_a_success_brings_one_back() {
        let (pool, s) = pool(
            2,
            OutlierSettings {
                failures: 1,
                max_ejection_percent: 100,
                ..OutlierSettings::default()
            },
        );
        let now = Instant::now();
        assert!(pool.connect_failed(&s[0], FailureReason::Refused, &"refused", now));
        assert!(pool.connect_failed(&s[1], FailureReason::Refused, &"refused", now));
        let handle = pool.select(&key(), &[]).expect("fail open");
        assert_eq!(handle.state().health(), Health::Ejected);
        pool.connect_succeeded(handle.state(), now);
        assert_eq!(handle.state().health(), Health::Up);
        // With one usable again, the other stays ejected even if a late connect succeeds.
        let other = if Arc::ptr_eq(handle.state(), &s[0]) {
            &s[1]
        } else {
            &s[0]
        };
        pool.connect_succeeded(other, now);
        assert_eq!(other.health(), Health::Ejected);
    }

    #[test]
    fn probe_down_and_operator_states_do_not_fail_open() {
        let (pool, s) = pool(2, OutlierSettings::default());
        s[0].set_health(Health::Down);
        s[1].set_health(Health::Disabled);
        assert!(pool.select(&key(), &[]).is_none());
        let now = Instant::now();
        for _ in 0..5 {
            assert!(!pool.connect_failed(&s[1], FailureReason::Refused, &"refused", now));
        }
        assert_eq!(
            s[1].health(),
            Health::Disabled,
            "never overrides the operator"
        );
    }
}
