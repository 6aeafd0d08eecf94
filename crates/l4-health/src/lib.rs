//! Health checking for l4lb backends: active TCP connect probes and passive failure
//! accounting, feeding backend state (`up` / `down`) into the pools' shared
//! `BackendState`, which every snapshot reads. Nothing here is on the data path except
//! [`Passive::connect_failed`], which the data path calls after a failed connect.
#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]

pub mod check;
mod checker;
pub mod probe;
mod tracker;

use std::time::Duration;

pub use check::{Check, Expect};
pub use checker::{spawn_checks, Checker};
pub use tracker::{Tracker, Verdict};

/// Health settings of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    /// Probe every backend this often (±10% jitter).
    pub interval: Duration,
    /// Each probe's limit.
    pub timeout: Duration,
    /// Consecutive successful probes that bring a down backend up.
    pub rise: u32,
    /// Consecutive failed probes that take an up backend down.
    pub fall: u32,
    /// Probe this port instead of the service port.
    pub port: Option<u16>,
    /// What a probe does.
    pub check: Check,
    /// Whether up backends are probed too. Without a `health:` section only down and
    /// ejected backends are probed (to bring them back); passive detection takes them out.
    pub active: bool,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            port: None,
            check: Check::TcpConnect,
            active: false,
        }
    }
}

/// A pool of one backend (127.0.0.1:1) and its state, for the unit tests.
#[cfg(test)]
pub(crate) fn test_pool() -> (
    std::sync::Arc<l4_balance::Pool>,
    std::sync::Arc<l4_balance::BackendState>,
) {
    use l4_balance::{Algorithm, BackendSpec, Pool, PoolSnapshot};
    let addr: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    let spec = BackendSpec {
        addr,
        weight: 1,
        backup: false,
    };
    let pool = std::sync::Arc::new(Pool::new(
        "p",
        PoolSnapshot::build(Algorithm::RoundRobin, &[spec], |_| None).unwrap(),
    ));
    let state = pool.backend_state(addr).unwrap();
    (pool, state)
}
