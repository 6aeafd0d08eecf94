//! The l4lb data path: listeners, admission, the TCP relay (zero-copy `splice(2)` with a
//! userspace-copy fallback) and PROXY protocol. It knows nothing about YAML: the binary
//! builds the typed settings here from its config.
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]
#![deny(unsafe_code)]

pub mod admission;
pub mod client_hello;
pub mod connect;
mod fault;
pub mod flow;
pub mod listener;
pub mod log_addr;
mod pipe_pool;
pub mod postgres;
pub mod preread;
pub mod proxy_protocol;
pub mod relay;
pub mod sni_routes;
pub mod source_limit;
#[allow(unsafe_code)]
pub mod sys;
pub mod tcp;
#[cfg(test)]
mod test_sockets;
pub mod udp;
mod udp_ports;

/// The `tracing` target of the one event each connection or UDP flow ends with: the access
/// log, which the binary routes to its own sink (`log.access`) whatever the log level.
pub const ACCESS_LOG: &str = "access";

/// Adds `n` to a statistics counter (relaxed: counters are read at scrape time only).
#[inline]
pub(crate) fn bump(counter: &std::sync::atomic::AtomicU64, n: u64) {
    counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
}
