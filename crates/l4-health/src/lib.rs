//! Health checking for l4lb backends: active TCP connect probes and passive failure
//! accounting, feeding backend state into the pool snapshots.
#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]

pub mod probe;
