use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::millis;
use crate::outlier::OutlierSettings;

/// The largest accepted weight (as in HAProxy); keeps precomputed schedules small.
pub const MAX_WEIGHT: u32 = 256;

/// What an operator declares about a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Relative share of new connections, 1..=[`MAX_WEIGHT`].
    pub weight: u32,
    /// A backup receives traffic only while no primary backend is usable.
    pub backup: bool,
}

/// Health and administrative state of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// Receives new connections.
    Up = 0,
    /// Failed its checks: receives no new connections.
    Down = 1,
    /// Being taken out: no new connections, live ones continue.
    Draining = 2,
    /// Switched off by the operator.
    Disabled = 3,
    /// Taken out by passive (outlier) detection after consecutive failed connects: no new
    /// connections until its ejection time has passed and probes bring it back. Counted
    /// against the pool's `max_ejection_percent`; tried anyway when nothing else is usable.
    Ejected = 4,
}

impl Health {
    fn from_u8(v: u8) -> Health {
        match v {
            0 => Health::Up,
            1 => Health::Down,
            2 => Health::Draining,
            4 => Health::Ejected,
            _ => Health::Disabled,
        }
    }

    /// The name used in logs and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Up => "up",
            Health::Down => "down",
            Health::Draining => "draining",
            Health::Disabled => "disabled",
            Health::Ejected => "ejected",
        }
    }
}

/// Mutable state of one backend, shared by every snapshot that contains it and carried over
/// a reload, so counters and health survive a config change.
#[derive(Debug)]
pub struct BackendState {
    addr: SocketAddr,
    health: AtomicU8,
    active: AtomicU64,
    total: AtomicU64,
    connect_failures: AtomicU64,
    /// Exponentially weighted moving average of measured response times, in microseconds;
    /// 0 until the first sample. Read by `least_time`.
    response_ewma_us: AtomicU64,
    /// Failed connects since the last successful one (passive detection).
    consecutive_failures: AtomicU32,
    /// While ejected: the time (ms on [`crate::clock`]) before which probes may not bring
    /// it back.
    ejected_until_ms: AtomicU64,
    /// The current ejection's multiplier: grows when a backend is ejected again soon after
    /// it came back.
    ejections: AtomicU32,
    /// When it last came back up (ms on [`crate::clock`]); 0 if it never went down.
    returned_at_ms: AtomicU64,
    /// Set when a failure streak found the pool's ejection cap reached and said so;
    /// cleared by the next success, so it is said once per streak.
    cap_warned: AtomicBool,
    /// Counters for metrics and the admin API, read at scrape time.
    pub stats: BackendStats,
    /// Why the state last changed (for the admin API); written only on a change.
    why: arc_swap::ArcSwapOption<String>,
    /// Cancelled to cut the backend's live connections (`on_down: close`); replaced by a
    /// fresh one at each cut, so later connections are not affected.
    sessions: arc_swap::ArcSwap<tokio_util::sync::CancellationToken>,
    /// Set when a reload removed it from an `on_down: close` pool and its connections
    /// were cut: a connection that started on an old snapshot must not outlive the cut.
    retired: AtomicBool,
    /// Whether the current failure streak is of empty closes (accept, then close before
    /// any byte): then an accepted connect does not end it, only a byte moving does.
    empty_close_streak: AtomicBool,
}

/// Why a connect failed, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    /// Refused (RST, or ICMP port unreachable for UDP).
    Refused = 0,
    /// No answer within the connect timeout.
    Timeout = 1,
    /// Host or network unreachable, reset during the handshake.
    Unreachable = 2,
    /// Accepted, then closed or reset before a byte moved either way.
    EmptyClose = 3,
}

impl FailureReason {
    /// Every reason, in label order.
    pub const ALL: [FailureReason; 4] = [
        FailureReason::Refused,
        FailureReason::Timeout,
        FailureReason::Unreachable,
        FailureReason::EmptyClose,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Refused => "refused",
            FailureReason::Timeout => "timeout",
            FailureReason::Unreachable => "unreachable",
            FailureReason::EmptyClose => "empty_close",
        }
    }
}

/// Upper bounds (seconds) of the connect-time histogram's buckets; +Inf is implied.
pub const CONNECT_BUCKETS: [f64; 10] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0,
];

/// Per-backend counters: plain atomics written by the data path (a few relaxed adds per
/// connection, no lock, no allocation) and summed by the admin endpoint when scraped.
#[derive(Debug, Default)]
pub struct BackendStats {
    failures: [AtomicU64; 4],
    connect_buckets: [AtomicU64; CONNECT_BUCKETS.len() + 1],
    connect_sum_us: AtomicU64,
    state_changes: AtomicU64,
    checks_ok: AtomicU64,
    checks_failed: AtomicU64,
    /// Milliseconds since the Unix epoch of the last probe; 0 = never.
    last_check_unix_ms: AtomicU64,
    last_check_ok: AtomicBool,
}

impl BackendStats {
    /// Counts a failed connect.
    pub fn record_failure(&self, reason: FailureReason) {
        self.failures[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Failed connects for `reason`.
    pub fn failures(&self, reason: FailureReason) -> u64 {
        self.failures[reason as usize].load(Ordering::Relaxed)
    }

    /// Records how long a successful connect took.
    pub fn record_connect_time(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let bucket = CONNECT_BUCKETS
            .iter()
            .position(|&upper| secs <= upper)
            .unwrap_or(CONNECT_BUCKETS.len());
        self.connect_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.connect_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// The connect-time histogram: (sum in seconds, count, per-bucket counts, not
    /// cumulative; the last is +Inf).
    pub fn connect_histogram(&self) -> (f64, u64, Vec<u64>) {
        let buckets: Vec<u64> = self
            .connect_buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let count = buckets.iter().sum();
        let sum = self.connect_sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        (sum, count, buckets)
    }

    /// Counts a health state change.
    pub fn record_state_change(&self) {
        self.state_changes.fetch_add(1, Ordering::Relaxed);
    }

    /// Health state changes so far.
    pub fn state_changes(&self) -> u64 {
        self.state_changes.load(Ordering::Relaxed)
    }

    /// Records an active probe's result at `unix_ms`.
    pub fn record_check(&self, ok: bool, unix_ms: u64) {
        let counter = if ok {
            &self.checks_ok
        } else {
            &self.checks_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.last_check_ok.store(ok, Ordering::Relaxed);
        self.last_check_unix_ms.store(unix_ms, Ordering::Relaxed);
    }

    /// Probes that passed and failed.
    pub fn checks(&self) -> (u64, u64) {
        (
            self.checks_ok.load(Ordering::Relaxed),
            self.checks_failed.load(Ordering::Relaxed),
        )
    }

    /// The last probe: (passed, milliseconds since the Unix epoch), if any ran.
    pub fn last_check(&self) -> Option<(bool, u64)> {
        let at = self.last_check_unix_ms.load(Ordering::Relaxed);
        (at != 0).then(|| (self.last_check_ok.load(Ordering::Relaxed), at))
    }
}

impl BackendState {
    /// A fresh state: up, nothing counted.
    pub fn new(addr: SocketAddr) -> Self {
        BackendState {
            addr,
            health: AtomicU8::new(Health::Up as u8),
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            response_ewma_us: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            returned_at_ms: AtomicU64::new(0),
            cap_warned: AtomicBool::new(false),
            stats: BackendStats::default(),
            why: arc_swap::ArcSwapOption::empty(),
            sessions: arc_swap::ArcSwap::from_pointee(tokio_util::sync::CancellationToken::new()),
            retired: AtomicBool::new(false),
            empty_close_streak: AtomicBool::new(false),
        }
    }

    /// The signal that cuts this backend's live connections; a connection takes it once,
    /// when it starts relaying.
    pub fn sessions(&self) -> tokio_util::sync::CancellationToken {
        (*self.sessions.load_full()).clone()
    }

    /// Cuts every live connection for good: a reload removed the backend.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        self.cut_sessions();
    }

    /// Whether a reload removed it and cut its connections.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// Records what kind of failure extends the streak.
    pub(crate) fn note_failure_kind(&self, empty_close: bool) {
        self.empty_close_streak
            .store(empty_close, Ordering::Relaxed);
    }

    /// Whether the current failure streak is made of empty closes.
    pub fn in_empty_close_streak(&self) -> bool {
        self.empty_close_streak.load(Ordering::Relaxed)
    }

    /// Cuts every live connection that took [`BackendState::sessions`] before now.
    pub fn cut_sessions(&self) {
        let old = self
            .sessions
            .swap(Arc::new(tokio_util::sync::CancellationToken::new()));
        old.cancel();
    }

    /// Starts slow start for a backend a reload just added (as if it had come back up).
    pub fn mark_added(&self, now: Instant) {
        self.returned_at_ms
            .store(millis(now).max(1), Ordering::Relaxed);
    }

    /// The share (0.1 to 1.0) of its weight a backend gets `slow_start` after it came back
    /// up or was added: linear from 10% to all of it; 1.0 when not ramping.
    pub fn slow_start_share(&self, slow_start: Duration, now_ms: impl FnOnce() -> u64) -> f64 {
        let returned = self.returned_at_ms.load(Ordering::Relaxed);
        if returned == 0 || slow_start.is_zero() {
            return 1.0;
        }
        let elapsed = now_ms().saturating_sub(returned) as f64;
        let ramp = slow_start.as_millis() as f64;
        if elapsed >= ramp {
            1.0
        } else {
            (elapsed / ramp).max(0.1)
        }
    }

    /// Why the state last changed, if it ever did.
    pub fn why(&self) -> Option<Arc<String>> {
        self.why.load_full()
    }

    /// Records why the state just changed.
    pub(crate) fn set_why(&self, why: String) {
        self.why.store(Some(Arc::new(why)));
    }

    /// The backend's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Current health. (Acquire: an `Ejected` seen here comes with its deadline.)
    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Acquire))
    }

    /// Sets health and returns the previous value.
    pub fn set_health(&self, health: Health) -> Health {
        Health::from_u8(self.health.swap(health as u8, Ordering::Relaxed))
    }

    /// Changes health from `from` to `to` only if it is still `from`; returns whether it
    /// changed. Health checks use this so that they never override an operator's
    /// `draining` or `disabled`.
    pub fn transition(&self, from: Health, to: Health) -> bool {
        self.health
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Whether the backend is in `health` (one load and compare: selection's hot check).
    #[inline]
    pub fn is(&self, health: Health) -> bool {
        self.health.load(Ordering::Relaxed) == health as u8
    }

    /// Whether new connections may go here.
    #[inline]
    pub fn is_usable(&self) -> bool {
        self.health.load(Ordering::Relaxed) == Health::Up as u8
    }

    /// Connections (or UDP flows) currently assigned to this backend.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Connections ever assigned to this backend.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Connect attempts that failed (refused, timed out, unreachable).
    pub fn connect_failures(&self) -> u64 {
        self.connect_failures.load(Ordering::Relaxed)
    }

    /// The moving average of response times (connect or first byte, as the pool's
    /// `least_time` measures), in microseconds; 0 before any sample.
    pub fn response_time_us(&self) -> u64 {
        self.response_ewma_us.load(Ordering::Relaxed)
    }

    /// Folds one measured response time into the moving average (weight 1/4 for the new
    /// sample: reacts within a few connections, ignores a single outlier). The first
    /// sample is taken as is.
    pub fn record_response_time(&self, sample: Duration) {
        let sample = u64::try_from(sample.as_micros()).unwrap_or(u64::MAX).max(1);
        let _ = self
            .response_ewma_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 {
                    sample
                } else {
                    old - old / 4 + sample / 4
                })
            });
    }

    /// Records a failed connect attempt seen by the data path; returns the number of
    /// failures in a row, this one included. Use [`crate::Pool::connect_failed`], which
    /// also decides on ejection.
    pub(crate) fn record_connect_failure(&self) -> u32 {
        self.connect_failures.fetch_add(1, Ordering::Relaxed);
        let previous = self
            .consecutive_failures
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_add(1))
            })
            .unwrap_or(u32::MAX);
        previous.saturating_add(1)
    }

    /// Records a successful connect (or, for UDP, a reply): the failure streak is over.
    /// A load and no write in the common case, so the hot path does not dirty the line.
    #[inline]
    pub(crate) fn record_connect_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            self.cap_warned.store(false, Ordering::Relaxed);
            self.empty_close_streak.store(false, Ordering::Relaxed);
        }
    }

    /// Whether this failure streak still has to say that the ejection cap kept the
    /// backend in (true once per streak).
    pub(crate) fn first_cap_warning(&self) -> bool {
        !self.cap_warned.swap(true, Ordering::Relaxed)
    }

    /// Failed connects since the last successful one.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Takes an up backend out (up -> ejected) for `ejection_time` times the number of
    /// ejections in a row (capped at `max_ejection_time`). An ejection counts as "in a
    /// row" when the backend had come back less than `max_ejection_time` ago. Returns how
    /// long it is out, or `None` if it was not up (someone else changed it first).
    pub(crate) fn eject(&self, now: Instant, settings: &OutlierSettings) -> Option<Duration> {
        if self.health() != Health::Up {
            return None;
        }
        let now_ms = millis(now);
        let returned = self.returned_at_ms.load(Ordering::Relaxed);
        let recent = returned != 0
            && now_ms.saturating_sub(returned) < duration_ms(settings.max_ejection_time);
        let multiplier = if recent {
            self.ejections.load(Ordering::Relaxed).saturating_add(1)
        } else {
            1
        };
        let out = settings
            .ejection_time
            .saturating_mul(multiplier)
            .min(settings.max_ejection_time);
        // The deadline first, then the state (release): whoever sees `Ejected` sees its
        // deadline, so no probe runs before the ejection time is served.
        self.ejected_until_ms
            .store(now_ms.saturating_add(duration_ms(out)), Ordering::Relaxed);
        if !self.transition(Health::Up, Health::Ejected) {
            return None;
        }
        self.ejections.store(multiplier, Ordering::Relaxed);
        Some(out)
    }

    /// Whether an ejected backend has served its ejection time, so probes may bring it
    /// back (or prove it dead). True for a backend that is not ejected.
    pub fn ejection_over(&self, now: Instant) -> bool {
        millis(now) >= self.ejected_until_ms.load(Ordering::Relaxed)
    }

    /// Brings a down or ejected backend back up (probes passed, or a connect succeeded
    /// while the pool had nothing else). Returns the state it left, or `None` when it was
    /// neither down nor ejected (the operator's states are never overridden).
    pub fn mark_up(&self, now: Instant) -> Option<Health> {
        let from = [Health::Down, Health::Ejected]
            .into_iter()
            .find(|&from| self.transition(from, Health::Up))?;
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.returned_at_ms
            .store(millis(now).max(1), Ordering::Relaxed);
        Some(from)
    }

    /// Marks an up or ejected backend down because probes proved it dead. Returns the state
    /// it left, or `None` when it was neither (already down, or the operator's).
    pub fn mark_down(&self) -> Option<Health> {
        [Health::Up, Health::Ejected]
            .into_iter()
            .find(|&from| self.transition(from, Health::Down))
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A backend inside a snapshot: its declared spec and its shared state.
#[derive(Debug, Clone)]
pub struct Backend {
    /// What the operator declared.
    pub spec: BackendSpec,
    /// Shared, mutable state.
    pub state: Arc<BackendState>,
}

/// A selected backend. Counts one active connection for as long as it lives, so
/// load-aware algorithms see real load; dropping it releases the count.
#[derive(Debug)]
pub struct BackendHandle {
    state: Arc<BackendState>,
}

impl BackendHandle {
    pub(crate) fn acquire(state: &Arc<BackendState>) -> Self {
        state.active.fetch_add(1, Ordering::Relaxed);
        state.total.fetch_add(1, Ordering::Relaxed);
        BackendHandle {
            state: Arc::clone(state),
        }
    }

    /// Where to connect.
    pub fn addr(&self) -> SocketAddr {
        self.state.addr
    }

    /// The backend's shared state (for passive health reports).
    pub fn state(&self) -> &Arc<BackendState> {
        &self.state
    }
}

impl Drop for BackendHandle {
    fn drop(&mut self) {
        self.state.active.fetch_sub(1, Ordering::Relaxed);
    }
}
