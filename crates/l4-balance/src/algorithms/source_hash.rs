//! `source_hash`: the hash of the client (by the pool's `hash` key) indexes a
//! weight-proportional slot table, as HAProxy's `balance source` with map-based hashing.
//! While a backend is unusable its clients move deterministically to the next slots;
//! unlike maglev, adding or removing a backend remaps most clients.

use super::{first_eligible_slot, smooth_weighted_schedule, weights};
use crate::backend::Backend;
use crate::flow_key::{FlowKey, HashKey};

#[derive(Debug)]
pub(crate) struct SourceHash {
    slots: Vec<u32>,
    key: HashKey,
}

impl SourceHash {
    pub(crate) fn new(backends: &[Backend], key: HashKey) -> Self {
        SourceHash {
            slots: smooth_weighted_schedule(&weights(backends)),
            key,
        }
    }

    #[inline]
    pub(crate) fn pick<F: Fn(&Backend) -> bool>(
        &self,
        backends: &[Backend],
        flow: &FlowKey,
        eligible: F,
    ) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let start = (flow.hash(self.key) % self.slots.len() as u64) as usize;
        first_eligible_slot(&self.slots, start, backends, eligible)
    }
}
