//! The SNI routing table of a listener: exact names first, then `*.suffix` wildcards (the
//! longest suffix wins; a wildcard matches any depth below it but not the bare suffix),
//! then the listener's own pool. Names are compared lowercase, without a trailing dot.

use std::collections::HashMap;

/// Routes from server names to targets of type `T` (an index into the listener's targets).
#[derive(Debug, Clone)]
pub struct SniRoutes<T> {
    exact: HashMap<Box<str>, T>,
    /// `(".suffix", target)`, longest suffix first.
    wildcards: Vec<(Box<str>, T)>,
}

/// Why a pattern is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// Not a host name or `*.` followed by one.
    #[error("{0:?} is not a host name or a wildcard like *.example.com")]
    Invalid(String),
    /// The same pattern twice.
    #[error("{0:?} is routed twice")]
    Duplicate(String),
}

impl<T> Default for SniRoutes<T> {
    fn default() -> Self {
        SniRoutes {
            exact: HashMap::new(),
            wildcards: Vec::new(),
        }
    }
}

impl<T> SniRoutes<T> {
    /// Adds a route for `pattern` (`a.example.com` or `*.example.com`).
    pub fn add(&mut self, pattern: &str, target: T) -> Result<(), PatternError> {
        let lower = pattern.trim_end_matches('.').to_ascii_lowercase();
        let (wildcard, name) = match lower.strip_prefix("*.") {
            Some(suffix) => (true, suffix),
            None => (false, lower.as_str()),
        };
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !valid {
            return Err(PatternError::Invalid(pattern.to_string()));
        }
        if wildcard {
            let suffix: Box<str> = format!(".{name}").into();
            if self.wildcards.iter().any(|(s, _)| *s == suffix) {
                return Err(PatternError::Duplicate(pattern.to_string()));
            }
            self.wildcards.push((suffix, target));
            self.wildcards
                .sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        } else if self.exact.insert(name.into(), target).is_some() {
            return Err(PatternError::Duplicate(pattern.to_string()));
        }
        Ok(())
    }

    /// The target for a (normalised) server name, if a route matches.
    pub fn route(&self, name: &str) -> Option<&T> {
        self.exact.get(name).or_else(|| {
            self.wildcards
                .iter()
                .find(|(suffix, _)| name.len() > suffix.len() && name.ends_with(&**suffix))
                .map(|(_, target)| target)
        })
    }

    /// Whether no route is set.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcards.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_then_longest_wildcard() {
        let mut routes = SniRoutes::default();
        routes.add("a.test", 1).unwrap();
        routes.add("*.test", 2).unwrap();
        routes.add("*.wild.test", 3).unwrap();
        routes.add("Exact.Wild.Test.", 4).unwrap();
        assert_eq!(routes.route("a.test"), Some(&1));
        assert_eq!(routes.route("b.test"), Some(&2));
        assert_eq!(routes.route("x.wild.test"), Some(&3));
        assert_eq!(routes.route("y.x.wild.test"), Some(&3));
        assert_eq!(routes.route("exact.wild.test"), Some(&4));
        assert_eq!(routes.route("wild.test"), Some(&2));
        assert_eq!(routes.route("test"), None);
        assert_eq!(routes.route("other.example"), None);
    }

    #[test]
    fn refuses_bad_and_duplicate_patterns() {
        let mut routes = SniRoutes::default();
        for bad in [
            "",
            "*",
            "*.",
            "a..b",
            "a b",
            "*.*.x",
            "x.*.y",
            "1.2.3.4:443",
        ] {
            assert!(routes.add(bad, 0).is_err(), "{bad:?}");
        }
        routes.add("a.test", 0).unwrap();
        assert_eq!(
            routes.add("A.TEST", 1),
            Err(PatternError::Duplicate("A.TEST".into()))
        );
        routes.add("*.a.test", 0).unwrap();
        assert!(routes.add("*.a.test.", 1).is_err());
    }
}
