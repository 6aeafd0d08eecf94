//! Admission: who may connect (CIDR allow/deny lists) and how many at once.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ipnet::IpNet;

/// Source address rules, checked deny first: a client is admitted when it matches no
/// `deny` entry and, if `allow` is not empty, at least one `allow` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessList {
    /// Networks allowed; empty means everyone.
    pub allow: Vec<IpNet>,
    /// Networks refused, even if also allowed.
    pub deny: Vec<IpNet>,
}

impl AccessList {
    /// Whether `ip` may connect. IPv4-mapped IPv6 clients are matched as IPv4.
    pub fn admits(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        if self.deny.iter().any(|net| net.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|net| net.contains(&ip))
    }
}

/// A cap on concurrent connections shared by every worker of a listener.
#[derive(Debug)]
pub struct ConnectionLimit {
    /// Changed in place by a reload, so the count of live connections carries over.
    max: AtomicUsize,
    active: AtomicUsize,
}

/// One admitted connection; releases its slot when dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    limit: Arc<ConnectionLimit>,
}

impl ConnectionLimit {
    /// A limit of `max` concurrent connections.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(ConnectionLimit {
            max: AtomicUsize::new(max),
            active: AtomicUsize::new(0),
        })
    }

    /// Takes a slot, or `None` when the limit is reached.
    pub fn try_acquire(self: &Arc<Self>) -> Option<ConnectionSlot> {
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max.load(Ordering::Relaxed)).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionSlot {
                limit: Arc::clone(self),
            })
    }

    /// Sets a new limit (a reload); connections over it are not closed, new ones are
    /// refused until the count is under it.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// Connections currently admitted.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.limit.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_wins_over_allow() {
        let acl = AccessList {
            allow: vec!["127.0.0.0/8".parse().unwrap()],
            deny: vec!["127.0.0.9/32".parse().unwrap()],
        };
        assert!(acl.admits("127.0.0.2".parse().unwrap()));
        assert!(!acl.admits("127.0.0.9".parse().unwrap()));
        assert!(!acl.admits("10.0.0.1".parse().unwrap()));
        assert!(acl.admits("::ffff:127.0.0.3".parse().unwrap()));
        assert!(AccessList::default().admits("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn limit_counts_slots() {
        let limit = ConnectionLimit::new(2);
        let a = limit.try_acquire().unwrap();
        let _b = limit.try_acquire().unwrap();
        assert!(limit.try_acquire().is_none());
        drop(a);
        assert!(limit.try_acquire().is_some());
    }
}
