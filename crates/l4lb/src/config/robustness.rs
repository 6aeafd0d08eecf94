//! The parser never panics: random text, random YAML-ish token soup, and random edits of
//! every shipped config all give either a valid config or errors, and a config that
//! passes is within every range.

use proptest::prelude::*;

use super::*;

/// Every config shipped in `config/`, as seeds for mutation.
fn seeds() -> Vec<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config");
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    out.sort();
    assert!(!out.is_empty());
    out
}

/// Pieces that make the parser take its less travelled paths.
const TOKENS: &[&str] = &[
    "0",
    "-1",
    "4294967291",
    "18446744073709551616",
    "1e400",
    "0s",
    "1ns",
    "99999999999d",
    "[]",
    "{}",
    "~",
    "null",
    "true",
    "'",
    "\"",
    "\n",
    ": ",
    "- ",
    "&a",
    "*a",
    "!!binary",
    "<<: *a",
    "\t",
    "::",
    "[::1]:0",
    "0.0.0.0:0",
    "255.255.255.255:65535",
    "udp",
    "maglev",
    "table_size: ",
    "weight: ",
    "backends: ",
    "listeners:",
    "pools:",
    "health: ",
    "passive: ",
    "source: ",
    "\u{feff}",
    "\u{0}",
];

fn check_invariants(config: &Config) {
    assert!(WORKERS.contains(&config.workers));
    assert!(DRAIN_TIMEOUT.contains(&config.drain_timeout));
    for l in &config.listeners {
        assert!(CONNECT_TIMEOUT.contains(&l.connect_timeout));
        assert!(IDLE_TIMEOUT.contains(&l.idle_timeout));
        assert!(RETRIES.contains(&l.retries));
        assert!(MAX_FLOWS.contains(&l.max_flows));
    }
    for p in &config.pools {
        // A discovery pool has no static backends; every other pool has some.
        assert_eq!(p.discovery.is_some(), p.backends.is_empty());
        assert!(p.backends.len() <= MAX_BACKENDS);
        if let Some(d) = &p.discovery {
            assert!(DISCOVERY_INTERVAL.contains(&d.interval));
        }
        assert!(HEALTH_INTERVAL.contains(&p.health.interval));
    }
}

fn parse_never_panics(text: &str) {
    if let Ok(config) = parse(text) {
        check_invariants(&config);
    }
}

#[derive(Debug, Clone)]
enum Edit {
    Delete(usize, usize),
    Insert(usize, usize),
    DuplicateLine(usize),
}

fn apply(seed: &str, edits: &[Edit]) -> String {
    let mut text: Vec<char> = seed.chars().collect();
    for edit in edits {
        let len = text.len().max(1);
        match *edit {
            Edit::Delete(at, n) => {
                let at = at % len;
                let end = (at + n % 16).min(text.len());
                if at < end {
                    text.drain(at..end);
                }
            }
            Edit::Insert(at, token) => {
                let at = at % (text.len() + 1);
                let token: Vec<char> = TOKENS[token % TOKENS.len()].chars().collect();
                text.splice(at..at, token);
            }
            Edit::DuplicateLine(line) => {
                let s: String = text.iter().collect();
                let lines: Vec<&str> = s.lines().collect();
                if !lines.is_empty() {
                    let i = line % lines.len();
                    let mut out: Vec<&str> = lines.clone();
                    out.insert(i, lines[i]);
                    text = out.join("\n").chars().collect();
                }
            }
        }
    }
    text.into_iter().collect()
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<usize>()).prop_map(|(a, n)| Edit::Delete(a, n)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, t)| Edit::Insert(a, t)),
        any::<usize>().prop_map(Edit::DuplicateLine),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    #[test]
    fn mutated_shipped_configs_never_panic(
        seed in any::<usize>(),
        edits in prop::collection::vec(edit(), 1..6),
    ) {
        let seeds = seeds();
        let text = apply(&seeds[seed % seeds.len()], &edits);
        parse_never_panics(&text);
    }

    #[test]
    fn random_text_never_panics(text in ".{0,400}") {
        parse_never_panics(&text);
    }

    #[test]
    fn token_soup_never_panics(tokens in prop::collection::vec(any::<usize>(), 0..60)) {
        let text: String = tokens.iter().map(|t| TOKENS[t % TOKENS.len()]).collect();
        parse_never_panics(&text);
    }
}

#[test]
fn every_seed_parses() {
    for seed in seeds() {
        let config = parse(&seed).unwrap();
        check_invariants(&config);
    }
}

/// The parser as a bolero harness: `cargo test` runs it over its seed corpus (a link to
/// `config/`) and a bounded number of random inputs; `cargo bolero test` fuzzes it.
#[test]
fn config_parser() {
    bolero::check!().for_each(|input: &[u8]| {
        if let Ok(text) = std::str::from_utf8(input) {
            if let Ok(config) = parse(text) {
                assert!(WORKERS.contains(&config.workers));
            }
        }
    });
}
