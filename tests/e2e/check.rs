//! `l4lb --check`: every kind of bad config exits 1 and names the field.

use std::process::Command;

use crate::harness::binary;

/// Runs `l4lb --check` on `text`: (exit code, stderr).
pub fn check(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(binary())
        .arg("--check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Each config is refused by `--check` (exit 1) with its expected message.
fn assert_refused<T: AsRef<str>>(cases: &[(T, &str)]) {
    for (text, expected) in cases {
        let (code, stderr) = check(text.as_ref());
        assert_eq!(code, 1, "{expected}: {stderr}");
        assert!(
            stderr.contains(expected),
            "expected {expected:?} in:\n{stderr}"
        );
    }
}

const BASE: &str = "listeners:\n  - { name: web, bind: \"127.0.0.1:8080\", pool: web }\npools:\n  - name: web\n    backends:\n      - { address: \"127.0.0.1:8081\" }\n";

#[test]
fn each_kind_of_bad_config_exits_1_naming_the_field() {
    let cases: &[(&str, &str)] = &[
        (
            &BASE.replace("127.0.0.1:8081", "10.0.0.1"),
            "pools[0].backends[0].address: invalid socket address \"10.0.0.1\"",
        ),
        (&BASE.replace("pool: web }", "pool: web, colour: red }"), "unknown field `colour`"),
        (&format!("{BASE}  - name: web\n    backends: [{{ address: \"127.0.0.1:1\" }}]\n"), "pools[1].name: duplicate pool name"),
        (&BASE.replace("pool: web }", "pool: nope }"), "listeners[0].pool: no pool named \"nope\""),
        (&BASE.replace("      - { address: \"127.0.0.1:8081\" }\n", "      []\n"), "pools[0].backends: a pool needs at least one backend"),
        (&format!("defaults: {{ connect_timeout: 0s }}\n{BASE}"), "defaults.connect_timeout: must be greater than zero"),
        (&format!("defaults: {{ idle_timeout: 10 minutes-ish }}\n{BASE}"), "defaults.idle_timeout: invalid duration"),
        (&BASE.replace("bind: \"127.0.0.1:8080\"", "bind: \"localhost\""), "listeners[0].bind: invalid socket address"),
        (&BASE.replace("name: web, bind", "name: web, allow: [300.0.0.0/8], bind"), "listeners[0].allow[0]: invalid network"),
        (&format!("{BASE}  - name: web2\n    algorithm: fastest\n    backends: [{{ address: \"127.0.0.1:1\" }}]\n"), "pools[1].algorithm: unknown algorithm"),
        (&BASE.replace("  - name: web\n    backends:", "  - name: web\n    hash: src_ip\n    backends:"), "pools[0].hash: hash applies to source_hash and maglev, not round_robin"),
        (&BASE.replace("  - name: web\n    backends:", "  - name: web\n    algorithm: maglev\n    table_size: 65536\n    backends:"), "pools[0].table_size: 65536 is not prime"),
        (&BASE.replace("  - name: web\n    backends:", "  - name: web\n    algorithm: source_hash\n    hash: dst_ip\n    backends:"), "pools[0].hash: unknown hash key \"dst_ip\""),
        (&BASE.replace("  - name: web\n    backends:", "  - name: web\n    algorithm: least_time\n    least_time: last_byte\n    backends:"), "pools[0].least_time: unknown measure \"last_byte\""),
        (&BASE.replace("  - name: web\n    backends:", "  - name: web\n    health: { interval: 1s, rise: 0 }\n    backends:"), "pools[0].health.rise: 0 is outside 1..=100"),
        (&BASE.replace("  - name: web\n    backends:", "  - name: web\n    health: { interval: 0ms }\n    backends:"), "pools[0].health.interval: must be greater than zero"),
        (&BASE.replace("{ name: web, bind: \"127.0.0.1:8080\", pool: web }", "{ name: web, bind: \"0.0.0.0:5353\", protocol: udp, pool: web }"), "listeners[0].bind: udp listeners need a specific address"),
        ("listeners: [\n", "line"),
    ];
    assert_refused(cases);
}

/// Values that once passed `--check` and then hung the start (a 16 GiB maglev table),
/// panicked every connection (a deadline past the end of time) or aborted an allocation.
#[test]
fn extreme_values_are_refused_with_their_range() {
    let pool = |extra: &str| {
        BASE.replace(
            "  - name: web\n    backends:",
            &format!("  - name: web\n{extra}\n    backends:"),
        )
    };
    let listener = |extra: &str| BASE.replace("pool: web }", &format!("pool: web, {extra} }}"));
    let cases: &[(String, &str)] = &[
        (
            pool("    algorithm: maglev\n    table_size: 4294967291"),
            "pools[0].table_size: 4294967291 is outside 2..=1000003",
        ),
        (
            format!("workers: 100000\n{BASE}"),
            "workers: 100000 is outside 1..=256",
        ),
        (
            format!("max_pipes: 100000000\n{BASE}"),
            "max_pipes: 100000000 is outside 0..=1000000",
        ),
        (
            format!("drain_timeout: 1000000d\n{BASE}"),
            "drain_timeout: 1000000d is above the maximum 1day",
        ),
        (
            format!("defaults: {{ retries: 1000 }}\n{BASE}"),
            "defaults.retries: 1000 is outside 0..=16",
        ),
        (
            listener("idle_timeout: 100000000000s"),
            "listeners[0].idle_timeout: 100000000000s is above the maximum 7days",
        ),
        (
            listener("connect_timeout: 1h"),
            "listeners[0].connect_timeout: 1h is above the maximum 5m",
        ),
        (
            listener("max_connections: 100000000000"),
            "listeners[0].max_connections: 100000000000 is outside 1..=10000000",
        ),
        (
            BASE.replace(
                "pool: web }",
                "pool: web, protocol: udp, max_flows: 18446744073709551615 }",
            ),
            "listeners[0].max_flows: 18446744073709551615 is outside 1..=4000000",
        ),
        (
            pool("    health: { interval: 1ms }"),
            "pools[0].health.interval: 1ms is below the minimum 10ms",
        ),
        (
            pool("    health: { fall: 4000000000 }"),
            "pools[0].health.fall: 4000000000 is outside 1..=100",
        ),
        (
            pool("    passive: { ejection_time: 2h }"),
            "pools[0].passive.ejection_time: 2h is above the maximum 1h",
        ),
        (
            pool("    source: [0.0.0.0]"),
            "pools[0].source[0]: 0.0.0.0 is not a local unicast address",
        ),
        (
            format!("log: {{ access: stderr, format: xml }}\n{BASE}"),
            "log.format: unknown format \"xml\" (expected text or json)",
        ),
        (
            format!("admin: 127.0.0.1:9900\nadmin_token: short\n{BASE}"),
            "admin_token: must be at least 16 characters",
        ),
        (
            listener("max_connections_per_source: 0"),
            "listeners[0].max_connections_per_source: 0 is outside 1..=10000000",
        ),
        (
            listener("max_new_flows_per_second_per_source: 5"),
            "listeners[0].max_new_flows_per_second_per_source: max_new_flows_per_second_per_source applies to udp listeners only",
        ),
        (
            BASE.replace("name: web, bind", "name: \"web/1\", bind"),
            "listeners[0].name: \"web/1\" is not a name",
        ),
        (
            format!("admin: \"localhost:9900\"\n{BASE}"),
            "admin: invalid socket address \"localhost:9900\"",
        ),
        (
            pool("    source: [\"::1\"]"),
            "pools[0].backends[0].address: 127.0.0.1:8081 is IPv4 but the pool has no IPv4 source",
        ),
    ];
    assert_refused(cases);
}

#[test]
fn the_largest_values_in_range_pass() {
    let text = BASE
        .replace("pool: web }", "pool: web, max_connections: 10000000, idle_timeout: 7days, connect_timeout: 5m, retries: 16 }")
        .replace("  - name: web\n    backends:", "  - name: web\n    algorithm: maglev\n    table_size: 1000003\n    health: { interval: 1h, timeout: 1m, rise: 100, fall: 100 }\n    passive: { failures: 1000, max_ejection_percent: 100, ejection_time: 1h, max_ejection_time: 1h }\n    source: [127.0.0.1]\n    backends:");
    let (code, stderr) = check(&format!(
        "workers: 256\ndrain_timeout: 1day\nmax_pipes: 1000000\n{text}"
    ));
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn several_errors_are_all_reported() {
    let text = BASE
        .replace("127.0.0.1:8081", "nope")
        .replace("pool: web }", "pool: web, max_connections: 0 }");
    let (code, stderr) = check(&text);
    assert_eq!(code, 1);
    assert!(stderr.contains("listeners[0].max_connections"), "{stderr}");
    assert!(stderr.contains("pools[0].backends[0].address"), "{stderr}");
    assert!(stderr.contains("2 error(s)"), "{stderr}");
}

#[test]
fn every_shipped_config_passes_check() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = Command::new(binary())
                .arg("--check")
                .arg("--config")
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 1);
}
