//! Selection algorithms. Each one is built once per snapshot (all its tables precomputed)
//! and then picks with shared, lock-free state only.

mod round_robin;

use crate::backend::Backend;
use crate::flow_key::FlowKey;

pub(crate) use round_robin::RoundRobin;

/// How a pool spreads new connections over its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// Smooth weighted round robin, as nginx does it.
    #[default]
    RoundRobin,
}

impl Algorithm {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round_robin",
        }
    }
}

/// An algorithm's precomputed state for one tier (primaries or backups) of a snapshot.
#[derive(Debug)]
pub(crate) enum TierSelector {
    RoundRobin(RoundRobin),
}

impl TierSelector {
    pub(crate) fn build(algorithm: Algorithm, backends: &[Backend]) -> Self {
        match algorithm {
            Algorithm::RoundRobin => TierSelector::RoundRobin(RoundRobin::new(backends)),
        }
    }

    /// Picks the index of a backend for which `eligible` holds, or `None` when there is none.
    pub(crate) fn pick(
        &self,
        backends: &[Backend],
        _key: &FlowKey,
        eligible: &dyn Fn(&Backend) -> bool,
    ) -> Option<usize> {
        match self {
            TierSelector::RoundRobin(rr) => rr.pick(backends, eligible),
        }
    }
}
