//! The rise/fall state machine of one backend's active checks: pure, no time, no I/O.

/// What a probe result did to the backend's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No change.
    Same,
    /// `rise` consecutive successes: the backend is up.
    Up,
    /// `fall` consecutive failures: the backend is down.
    Down,
}

/// Counts consecutive probe results against `rise` and `fall`.
#[derive(Debug, Clone)]
pub struct Tracker {
    rise: u32,
    fall: u32,
    up: bool,
    streak: u32,
}

impl Tracker {
    /// A tracker for a backend that is currently `up` (or not).
    pub fn new(rise: u32, fall: u32, up: bool) -> Self {
        Tracker {
            rise: rise.max(1),
            fall: fall.max(1),
            up,
            streak: 0,
        }
    }

    /// Whether the tracker considers the backend up.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Consecutive results pointing to the other state.
    pub fn streak(&self) -> u32 {
        self.streak
    }

    /// Resets to `up` after a change made elsewhere (passive detection, the operator).
    pub fn reset(&mut self, up: bool) {
        if self.up != up {
            self.up = up;
            self.streak = 0;
        }
    }

    /// Feeds one probe result.
    pub fn observe(&mut self, ok: bool) -> Verdict {
        if ok == self.up {
            self.streak = 0;
            return Verdict::Same;
        }
        self.streak += 1;
        let needed = if self.up { self.fall } else { self.rise };
        if self.streak < needed {
            return Verdict::Same;
        }
        self.up = ok;
        self.streak = 0;
        if ok {
            Verdict::Up
        } else {
            Verdict::Down
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fall_needs_consecutive_failures() {
        let mut t = Tracker::new(2, 3, true);
        assert_eq!(t.observe(false), Verdict::Same);
        assert_eq!(t.observe(false), Verdict::Same);
        assert_eq!(t.observe(true), Verdict::Same); // streak broken
        assert_eq!(t.observe(false), Verdict::Same);
        assert_eq!(t.observe(false), Verdict::Same);
        assert_eq!(t.observe(false), Verdict::Down);
        assert!(!t.is_up());
    }

    #[test]
    fn rise_needs_consecutive_successes() {
        let mut t = Tracker::new(2, 3, false);
        assert_eq!(t.observe(true), Verdict::Same);
        assert_eq!(t.observe(false), Verdict::Same);
        assert_eq!(t.observe(true), Verdict::Same);
        assert_eq!(t.observe(true), Verdict::Up);
        assert_eq!(t.observe(true), Verdict::Same);
    }

    #[test]
    fn reset_follows_outside_changes() {
        let mut t = Tracker::new(1, 1, true);
        t.reset(false);
        assert!(!t.is_up());
        assert_eq!(t.observe(true), Verdict::Up);
    }
}
