use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
}

impl Health {
    fn from_u8(v: u8) -> Health {
        match v {
            0 => Health::Up,
            1 => Health::Down,
            2 => Health::Draining,
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
        }
    }

    /// The backend's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Current health.
    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Relaxed))
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
            .compare_exchange(from as u8, to as u8, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// Whether new connections may go here.
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

    /// Records a failed connect attempt seen by the data path.
    pub fn record_connect_failure(&self) {
        self.connect_failures.fetch_add(1, Ordering::Relaxed);
    }
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
