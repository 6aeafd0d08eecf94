//! A test hook: `L4LB_INJECT_PANIC=tcp_accept` (or `udp_receive`) makes the first
//! connection accepted (datagram batch received) on each worker panic, so the end-to-end
//! tests can check that a panicking loop is reported and stops l4lb with a non-zero exit
//! instead of silently leaving a listener dead. Read once per loop start; never set in
//! production.

/// Whether the panic at `place` is requested.
pub(crate) fn panic_requested(place: &str) -> bool {
    std::env::var("L4LB_INJECT_PANIC").is_ok_and(|v| v == place)
}
