//! Backend sets and backend selection for l4lb.
//!
//! Everything selection reads lives in one immutable [`PoolSnapshot`], published through a
//! single `ArcSwap` per [`Pool`], so a reader never sees a half-updated pool. What changes
//! per connection (active connections, health) lives in shared [`BackendState`] atomics that
//! snapshots point at, so a health flip never rebuilds a snapshot and no selection takes a lock.
#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]

mod algorithms;
mod backend;
mod clock;
mod flow_key;
mod outlier;
mod pool;
mod snapshot;

pub use algorithms::{build_maglev_table, is_prime, Algorithm, TimeMetric, DEFAULT_TABLE_SIZE};
pub use backend::{
    Backend, BackendHandle, BackendSpec, BackendState, BackendStats, FailureReason, Health,
    CONNECT_BUCKETS, MAX_WEIGHT,
};
pub use flow_key::{FlowKey, HashKey, Protocol};
pub use outlier::OutlierSettings;
pub use pool::Pool;
pub use snapshot::{OnDown, PoolError, PoolSnapshot};
