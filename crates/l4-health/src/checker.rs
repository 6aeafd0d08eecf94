//! Active checks: one task per backend, off the data path, one probe in flight at a time.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use l4_balance::{BackendState, Health, Pool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::probe::ProbeError;
use crate::tracker::{Tracker, Verdict};
use crate::HealthSettings;

/// The checks of one pool.
#[derive(Debug, Clone)]
pub struct Checker {
    pool: Arc<Pool>,
    settings: HealthSettings,
}

/// Starts checking every backend of `pool` on the current tokio runtime until `stop`.
pub fn spawn_checks(
    pool: Arc<Pool>,
    settings: HealthSettings,
    stop: CancellationToken,
) -> Vec<JoinHandle<()>> {
    let checker = Checker { pool, settings };
    let states: Vec<Arc<BackendState>> = checker
        .pool
        .snapshot()
        .backends()
        .map(|b| Arc::clone(&b.state))
        .collect();
    states
        .into_iter()
        .map(|state| {
            let checker = checker.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let check = Arc::new(checker.settings.check.clone());
                let probe = move |addr: SocketAddr, timeout: Duration| {
                    let check = Arc::clone(&check);
                    async move { check.probe(addr, timeout).await }
                };
                let run = checker.run(state, probe);
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = run => {}
                }
            })
        })
        .collect()
}

/// `interval` ±10%, so the probes of many backends (and many l4lb instances) drift apart.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(0.9 + 0.2 * fastrand::f64())
}

impl Checker {
    /// A checker for `pool` (used directly by tests with their own probe).
    pub fn new(pool: Arc<Pool>, settings: HealthSettings) -> Self {
        Checker { pool, settings }
    }

    /// Probes `state`'s backend forever with `probe`.
    pub async fn run<P, F>(&self, state: Arc<BackendState>, probe: P)
    where
        P: Fn(SocketAddr, Duration) -> F,
        F: Future<Output = Result<(), ProbeError>>,
    {
        let s = &self.settings;
        let target = match s.port {
            Some(port) => SocketAddr::new(state.addr().ip(), port),
            None => state.addr(),
        };
        // A check that speaks the protocol tells a replica from a primary: its first probe
        // runs at once and decides alone, so a backend that starts (or is added) as the
        // wrong role leaves rotation within one probe, not after `fall` intervals.
        let mut first_decides = s.active && s.check.speaks_protocol();
        let fall = if first_decides { 1 } else { s.fall };
        let mut tracker = Tracker::new(s.rise, fall, state.health() == Health::Up);
        if !first_decides {
            // Start somewhere in the first interval so backends are not probed in lockstep.
            tokio::time::sleep(s.interval.mul_f64(fastrand::f64())).await;
        }
        loop {
            let health = state.health();
            let now = tokio::time::Instant::now().into_std();
            match health {
                // The operator's states are left alone.
                Health::Draining | Health::Disabled => {}
                // Passive detection's ejection is served in full before any probe.
                Health::Ejected if !state.ejection_over(now) => tracker.reset(false),
                Health::Up if !s.active => tracker.reset(true),
                Health::Up | Health::Down | Health::Ejected => {
                    tracker.reset(health == Health::Up);
                    let result = probe(target, s.timeout).await;
                    self.apply(&state, health, &mut tracker, result);
                }
            }
            if first_decides {
                first_decides = false;
                tracker = Tracker::new(s.rise, s.fall, state.health() == Health::Up);
            }
            tokio::time::sleep(jittered(s.interval)).await;
        }
    }

    fn apply(
        &self,
        state: &BackendState,
        before: Health,
        tracker: &mut Tracker,
        result: Result<(), ProbeError>,
    ) {
        let s = &self.settings;
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        state.stats.record_check(result.is_ok(), unix_ms);
        if let (Health::Ejected, Err(e)) = (before, &result) {
            // An ejected backend that fails a probe after its ejection time is proven
            // dead: down, where it no longer counts against the ejection cap.
            // Only from ejected: a fail-open connect may have brought it up meanwhile.
            if state.transition(Health::Ejected, Health::Down) {
                let why = format!("{e} after its ejection time");
                self.pool
                    .announce(state.addr(), Health::Ejected, Health::Down, &why);
            }
            return;
        }
        match tracker.observe(result.is_ok()) {
            Verdict::Same => {}
            Verdict::Up => {
                let now = tokio::time::Instant::now().into_std();
                if let Some(from) = state.mark_up(now) {
                    let why = format!("{0}/{0} probes ok", s.rise);
                    self.pool.announce(state.addr(), from, Health::Up, &why);
                }
            }
            Verdict::Down => {
                if state.transition(Health::Up, Health::Down) {
                    let why = match &result {
                        Err(e) => format!("{e}, {0}/{0} probes failed", s.fall),
                        Ok(()) => format!("{0}/{0} probes failed", s.fall),
                    };
                    self.pool
                        .announce(state.addr(), Health::Up, Health::Down, &why);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use tokio::time::Instant;

    fn pool() -> (Arc<Pool>, Arc<BackendState>) {
        crate::test_pool()
    }

    /// Runs the checker against scripted probe results in paused time and records, for
    /// every probe, the health before it and when it ran.
    async fn scripted(settings: HealthSettings, script: &[bool]) -> Vec<(Health, Duration)> {
        let (pool, state) = pool();
        let checker = Checker::new(pool, settings);
        let results = Arc::new(Mutex::new(
            script.iter().copied().collect::<VecDeque<bool>>(),
        ));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let start = Instant::now();
        let probe = {
            let (results, seen, state) = (results.clone(), seen.clone(), state.clone());
            move |_addr: SocketAddr, timeout: Duration| {
                let next = results.lock().unwrap().pop_front();
                seen.lock().unwrap().push((state.health(), start.elapsed()));
                async move {
                    match next {
                        Some(true) => Ok(()),
                        Some(false) => Err(ProbeError::Timeout(timeout)),
                        None => std::future::pending().await,
                    }
                }
            }
        };
        let run = checker.run(state.clone(), probe);
        let _ = tokio::time::timeout(Duration::from_secs(3600), run).await;
        let out = seen.lock().unwrap().clone();
        out
    }

    /// Active connect probes every second, rise 2, fall 3.
    fn every_second() -> HealthSettings {
        HealthSettings {
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(100),
            rise: 2,
            fall: 3,
            port: None,
            check: crate::Check::TcpConnect,
            active: true,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_protocol_check_probes_at_once_and_its_first_failure_decides() {
        let settings = HealthSettings {
            check: crate::Check::Tcp {
                send: b"INFO replication\r\n".to_vec(),
                expect: crate::Expect::Contains(b"role:master".to_vec()),
            },
            ..every_second()
        };
        // A replica at start: down after its first probe, which runs at once; afterwards
        // `fall` applies again (two failures do not take it down once it is back up).
        let seen = scripted(settings, &[false, true, true, false, false]).await;
        let health: Vec<Health> = seen.iter().map(|(h, _)| *h).collect();
        use Health::*;
        assert_eq!(seen[0].1, Duration::ZERO, "the first probe runs at once");
        assert_eq!(health, vec![Up, Down, Down, Up, Up, Up]);
    }

    #[tokio::test(start_paused = true)]
    async fn fall_then_rise_in_paused_time() {
        let settings = every_second();
        let seen = scripted(settings, &[false, false, false, true, true, true]).await;
        let health: Vec<Health> = seen.iter().map(|(h, _)| *h).collect();
        use Health::*;
        // Health as each probe starts: down after the third failure, up after two successes.
        // (The seventh probe is the one left pending when the script ran out.)
        assert_eq!(health, vec![Up, Up, Up, Down, Down, Up, Up]);
        // Probes are an interval apart, ±10%.
        for pair in seen.windows(2) {
            let gap = pair[1].1 - pair[0].1;
            assert!(
                gap >= Duration::from_millis(900) && gap <= Duration::from_millis(1100),
                "{gap:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn passive_only_pools_probe_only_down_backends() {
        let settings = HealthSettings {
            interval: Duration::from_secs(1),
            active: false,
            rise: 1,
            ..HealthSettings::default()
        };
        let (pool, state) = pool();
        let checker = Checker::new(pool, settings);
        let probes = Arc::new(Mutex::new(0));
        let probe = {
            let probes = probes.clone();
            move |_a: SocketAddr, _t: Duration| {
                *probes.lock().unwrap() += 1;
                async { Ok(()) }
            }
        };
        let flipper = {
            let state = state.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(10)).await;
                assert_eq!(*probes.lock().unwrap(), 0, "an up backend is not probed");
                state.set_health(Health::Down);
                tokio::time::sleep(Duration::from_secs(3)).await;
                assert_eq!(state.health(), Health::Up, "a probe brought it back");
            }
        };
        tokio::select! {
            () = checker.run(state.clone(), probe) => unreachable!(),
            () = flipper => {}
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejected_backend_is_probed_only_after_its_ejection_time() {
        use l4_balance::OutlierSettings;
        let settings = HealthSettings {
            interval: Duration::from_secs(1),
            rise: 2,
            ..HealthSettings::default()
        };
        let (pool, state) = pool();
        let outlier = OutlierSettings {
            failures: 1,
            ejection_time: Duration::from_secs(10),
            ..OutlierSettings::default()
        };
        pool.publish(
            l4_balance::PoolSnapshot::build(
                l4_balance::Algorithm::RoundRobin,
                &[l4_balance::BackendSpec {
                    addr: state.addr(),
                    weight: 1,
                    backup: false,
                }],
                |_| Some(state.clone()),
            )
            .unwrap()
            .with_outlier(outlier),
        );
        let start = Instant::now();
        assert!(pool.connect_failed(
            &state,
            l4_balance::FailureReason::Refused,
            &"refused",
            start.into_std()
        ));
        let checker = Checker::new(pool, settings);
        let first_probe = Arc::new(Mutex::new(None));
        let probe = {
            let first_probe = first_probe.clone();
            move |_a: SocketAddr, _t: Duration| {
                first_probe
                    .lock()
                    .unwrap()
                    .get_or_insert_with(|| start.elapsed());
                async { Ok(()) }
            }
        };
        let _ =
            tokio::time::timeout(Duration::from_secs(30), checker.run(state.clone(), probe)).await;
        let first = first_probe.lock().unwrap().expect("probed at last");
        assert!(first >= Duration::from_secs(10), "first probe at {first:?}");
        assert_eq!(
            state.health(),
            Health::Up,
            "two good probes brought it back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejected_backend_that_fails_its_probe_is_down() {
        let (pool, state) = pool();
        state.set_health(Health::Ejected); // ejection time 0: already served
        let settings = HealthSettings {
            interval: Duration::from_secs(1),
            ..HealthSettings::default()
        };
        let checker = Checker::new(pool, settings);
        let probe = |_a: SocketAddr, t: Duration| async move { Err(ProbeError::Timeout(t)) };
        let _ =
            tokio::time::timeout(Duration::from_secs(3), checker.run(state.clone(), probe)).await;
        assert_eq!(state.health(), Health::Down);
    }

    #[tokio::test(start_paused = true)]
    async fn draining_is_never_overridden() {
        let settings = HealthSettings {
            interval: Duration::from_secs(1),
            fall: 1,
            active: true,
            ..HealthSettings::default()
        };
        let (pool, state) = pool();
        state.set_health(Health::Draining);
        let checker = Checker::new(pool, settings);
        let probe = |_a: SocketAddr, t: Duration| async move { Err(ProbeError::Timeout(t)) };
        let _ =
            tokio::time::timeout(Duration::from_secs(10), checker.run(state.clone(), probe)).await;
        assert_eq!(state.health(), Health::Draining);
    }
}
