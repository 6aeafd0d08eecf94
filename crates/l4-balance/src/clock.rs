//! One monotonic time line for the timestamps kept in backend atomics (ejection deadlines,
//! returns): milliseconds since the first time anything asked. Callers pass `now` in, so
//! tests (and tokio's paused clock, through `Instant::into_std`) decide what time it is.

use std::sync::OnceLock;
use std::time::Instant;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// `now` as milliseconds since the process-wide epoch, at least 1 (0 means "never").
pub(crate) fn millis(now: Instant) -> u64 {
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(now.saturating_duration_since(epoch).as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}
