//! Passive health as an outlier detector (Envoy's design, kept lock-free): the data path
//! reports each connect's result; `failures` in a row eject an up backend for a growing
//! time, but never more than `max_ejection_percent` of a tier at once, so an outage that
//! overloads the neighbours cannot cascade until the pool is empty. Probes bring an
//! ejected backend back once its time is served (or prove it dead: then it is `down`,
//! which no longer counts against the cap).

use std::time::Duration;

use crate::backend::{Backend, Health};

/// Passive detection settings of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierSettings {
    /// Failed connects in a row (a success resets the count) that eject a backend.
    pub failures: u32,
    /// At most this share (0..=100) of a tier's backends ejected at once; at least one
    /// when not 0. 0 turns passive ejection off.
    pub max_ejection_percent: u8,
    /// The first ejection's length; each ejection in a row adds as much again.
    pub ejection_time: Duration,
    /// The longest ejection; also how long a backend must stay up for the next ejection to
    /// start over at `ejection_time`.
    pub max_ejection_time: Duration,
    /// Whether a backend that accepts and then closes or resets before a byte moved
    /// either way counts as a failed connect (an accept-then-die backend).
    pub empty_close_fails: bool,
}

impl Default for OutlierSettings {
    fn default() -> Self {
        OutlierSettings {
            failures: 3,
            max_ejection_percent: 50,
            ejection_time: Duration::from_secs(2),
            max_ejection_time: Duration::from_secs(60),
            empty_close_fails: true,
        }
    }
}

impl OutlierSettings {
    /// How many of `tier_size` backends may be ejected at once.
    pub fn ejection_cap(&self, tier_size: usize) -> usize {
        if self.max_ejection_percent == 0 || tier_size == 0 {
            return 0;
        }
        (tier_size * usize::from(self.max_ejection_percent.min(100)) / 100).max(1)
    }

    /// Whether one more backend of `tier` may be ejected now.
    pub(crate) fn may_eject(&self, tier: &[Backend]) -> bool {
        let ejected = tier
            .iter()
            .filter(|b| b.state.health() == Health::Ejected)
            .count();
        ejected < self.ejection_cap(tier.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_is_a_share_of_the_tier_but_at_least_one() {
        let s = OutlierSettings::default();
        assert_eq!(s.ejection_cap(1), 1);
        assert_eq!(s.ejection_cap(3), 1);
        assert_eq!(s.ejection_cap(4), 2);
        assert_eq!(s.ejection_cap(10), 5);
        let all = OutlierSettings {
            max_ejection_percent: 100,
            ..s
        };
        assert_eq!(all.ejection_cap(7), 7);
        let off = OutlierSettings {
            max_ejection_percent: 0,
            ..s
        };
        assert_eq!(off.ejection_cap(10), 0);
    }
}
