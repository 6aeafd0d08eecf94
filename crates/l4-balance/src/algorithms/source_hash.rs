//! `source_hash`: the hash of the client (by the pool's `hash` key) indexes a
//! weight-proportional slot table, as HAProxy's `balance source` with map-based hashing.
//! While a backend is unusable its clients rehash (see [`super::pick_by_hash`]): they
//! spread over the usable backends by weight and come back with it. Unlike maglev,
//! adding or removing a backend remaps most clients.

use super::{config_order, pick_by_hash, smooth_weighted_schedule, weights};
use crate::backend::Backend;
use crate::flow_key::{FlowKey, HashKey};

#[derive(Debug)]
pub(crate) struct SourceHash {
    slots: Vec<u32>,
    order: Vec<u32>,
    key: HashKey,
}

impl SourceHash {
    pub(crate) fn new(backends: &[Backend], key: HashKey) -> Self {
        SourceHash {
            slots: smooth_weighted_schedule(&weights(backends)),
            order: config_order(backends),
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
        pick_by_hash(
            &self.slots,
            &self.order,
            flow.hash(self.key),
            backends,
            eligible,
        )
    }
}
