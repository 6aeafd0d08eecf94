//! Running several l4lb (part of issue 14): leaving the route before stopping
//! (`shutdown_delay`), binding a VIP that is not local yet (`freebind`), and the
//! deployment units in `deploy/`.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;
use crate::netns::Netns;

async fn echo_through(addr: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(payload).await?;
    s.shutdown().await?;
    let mut back = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut back))
        .await
        .map_err(|_| std::io::Error::other("no answer"))??;
    Ok(back)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_delay_keeps_serving_while_not_ready_then_drains() {
    let echo = echo_backend().await;
    let mut lb = Balancer::start(&config(
        &[echo],
        "",
        "admin: 127.0.0.1:0\nshutdown_delay: 1500ms",
    ));
    let (status, _) = http(lb.admin(), "GET", "/ready", "", None).await;
    assert_eq!(status, 200);
    let signalled = Instant::now();
    lb.terminate();
    // Not ready at once (routers and load balancers stop sending) ...
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, _) = http(lb.admin(), "GET", "/ready", "", None).await;
        if status == 503 {
            break;
        }
        assert!(Instant::now() < deadline, "/ready never turned 503");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ... but a client that still arrives during the delay is served.
    assert_eq!(echo_through(lb.addr(), b"late").await.unwrap(), b"late");
    assert!(
        signalled.elapsed() < Duration::from_millis(1500),
        "the test was too slow to check within the delay"
    );
    lb.wait_for_log(|l| l.contains("stopping: no new connections"));
    assert!(signalled.elapsed() >= Duration::from_millis(1500));
    assert!(lb.exit_within(PATIENCE).is_some_and(|s| s.success()));
    assert!(TcpStream::connect(lb.addr()).await.is_err());
}

#[test]
fn freebind_binds_a_vip_that_is_not_local_yet() {
    let Some(ns) = Netns::create() else { return };
    let vip = "192.0.2.80:8080";
    let config = |freebind: bool| {
        format!(
            "workers: 1\nlisteners:\n  - {{ name: vip, bind: \"{vip}\", pool: p, freebind: {freebind} }}\npools:\n  - name: p\n    backends: [ {{ address: \"127.0.0.1:9000\" }} ]\n"
        )
    };
    // Without freebind, an address that is not on an interface cannot be bound.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l4lb.yaml");
    std::fs::write(&path, config(false)).unwrap();
    let mut prefix = ns.prefix();
    let program = prefix.remove(0);
    let out = Command::new(program)
        .args(&prefix)
        .arg(binary())
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot listen on 192.0.2.80:8080"),
        "{stderr}"
    );
    // With it, l4lb starts before the address exists, and serves once it is added.
    let text = config(true);
    let launch_prefix = ns.prefix();
    let name = ns.name.clone();
    let answered = ns.run(move || {
        Box::pin(async move {
            let backend = tokio::net::TcpListener::bind("127.0.0.1:9000")
                .await
                .unwrap();
            tokio::spawn(async move {
                while let Ok((mut s, _)) = backend.accept().await {
                    tokio::spawn(async move {
                        let (mut r, mut w) = s.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    });
                }
            });
            let _lb = Balancer::start_with(
                &text,
                Launch {
                    prefix: launch_prefix,
                    ..Launch::default()
                },
            );
            assert!(Command::new("ip")
                .args(["-n", &name, "addr", "add", "192.0.2.80/32", "dev", "lo"])
                .status()
                .unwrap()
                .success());
            echo_through(vip.parse().unwrap(), b"vip").await.unwrap()
        })
    });
    assert_eq!(answered, b"vip");
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let Some(analyze) = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        panic!("systemd-analyze is not installed: scripts/test.sh installs it (systemd)");
    };
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/l4lb.service"
    ))
    .unwrap();
    // The unit as installed, with the paths of this checkout: verify checks that the
    // programs it runs exist and are executable.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("l4lb.yaml");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/l4lb.yaml"),
        &config,
    )
    .unwrap();
    let unit = unit
        .replace("/usr/local/bin/l4lb", &binary().display().to_string())
        .replace("/etc/l4lb/l4lb.yaml", &config.display().to_string());
    let path = dir.path().join("l4lb.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Warnings about the unit itself (unknown keys, bad values) name the file.
    let about_unit: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("l4lb.service"))
        .collect();
    assert!(about_unit.is_empty(), "{about_unit:#?}");
}

#[test]
fn the_kubernetes_example_config_passes_check() {
    let manifest = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/kubernetes/l4lb.yaml"
    ))
    .unwrap();
    // The ConfigMap's `l4lb.yaml: |` block, its indentation removed.
    let mut lines = manifest
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("l4lb.yaml: |"));
    lines.next().expect("a l4lb.yaml key in the ConfigMap");
    let block: Vec<&str> = lines
        .take_while(|l| l.starts_with("    ") || l.is_empty())
        .collect();
    assert!(block.len() > 5);
    let text: String = block
        .iter()
        .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l4lb.yaml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(binary())
        .arg("--check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
