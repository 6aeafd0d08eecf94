//! `l4lb --check`: every kind of bad config exits 1 and names the field.

use std::process::Command;

use crate::harness::binary;

fn check(text: &str) -> (i32, String) {
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
        (&BASE.replace("  - name: web\n    backends:", "  - name: web\n    health: { interval: 1s, rise: 0 }\n    backends:"), "pools[0].health.rise: must be at least 1"),
        (&BASE.replace("  - name: web\n    backends:", "  - name: web\n    health: { interval: 0ms }\n    backends:"), "pools[0].health.interval: must be greater than zero"),
        (&BASE.replace("{ name: web, bind: \"127.0.0.1:8080\", pool: web }", "{ name: web, bind: \"0.0.0.0:5353\", protocol: udp, pool: web }"), "listeners[0].bind: udp listeners need a specific address"),
        ("listeners: [\n", "line"),
    ];
    for (text, expected) in cases {
        let (code, stderr) = check(text);
        assert_eq!(code, 1, "{expected}: {stderr}");
        assert!(
            stderr.contains(expected),
            "expected {expected:?} in:\n{stderr}"
        );
    }
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
