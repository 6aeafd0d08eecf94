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
        "admin: 127.0.0.1:0\nshutdown_delay: 3s",
    ));
    let (status, _) = http(lb.admin(), "GET", "/ready", "", None).await;
    assert_eq!(status, 200);
    let signalled = Instant::now();
    lb.terminate();
    // Not ready at once (routers and load balancers stop sending): l4lb logs the delay
    // once /ready has turned ...
    lb.wait_for_log(|l| l.contains("not ready: still accepting"));
    let (status, _) = http(lb.admin(), "GET", "/ready", "", None).await;
    assert_eq!(status, 503);
    // ... but a client that still arrives during the delay is served.
    assert_eq!(echo_through(lb.addr(), b"late").await.unwrap(), b"late");
    assert!(
        signalled.elapsed() < Duration::from_millis(1500),
        "the test was too slow to check within the delay"
    );
    lb.wait_for_log(|l| l.contains("stopping: no new connections"));
    assert!(signalled.elapsed() >= Duration::from_secs(3));
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
    let (code, stderr) = crate::check::check(&text);
    assert_eq!(code, 0, "{stderr}");
}

/// dnsmasq on 127.0.0.1:`port` answering from the hosts file `hosts` (reread on SIGHUP)
/// and `extra` options.
fn dnsmasq_with_hosts(hosts: &std::path::Path, port: u16, extra: &[String]) -> Peer {
    let mut dnsmasq = Command::new(crate::udp::which("dnsmasq"));
    dnsmasq
        .args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
        ])
        .args(["--listen-address=127.0.0.1", "--user=root", "--pid-file"])
        .arg(format!("--port={port}"))
        .arg(format!("--addn-hosts={}", hosts.display()))
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    Peer::spawn(&mut dnsmasq, tempfile::tempdir().unwrap())
}

/// A backend on `addr` that writes `name`, then echoes.
async fn named_at(addr: SocketAddr, name: &'static str) {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(name.as_bytes()).await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
}

/// The names of the backends `count` new connections reach.
async fn reached(lb: SocketAddr, count: usize) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for _ in 0..count {
        let mut s = TcpStream::connect(lb).await.unwrap();
        let mut name = [0u8; 2];
        tokio::time::timeout(PATIENCE, s.read_exact(&mut name))
            .await
            .unwrap()
            .unwrap();
        names.insert(String::from_utf8_lossy(&name).to_string());
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_discovery_follows_the_records_and_keeps_the_last_set_when_dns_fails() {
    let port = peer_port(41);
    for (ip, name) in [
        ([127, 0, 0, 2], "b2"),
        ([127, 0, 0, 3], "b3"),
        ([127, 0, 0, 4], "b4"),
    ] {
        named_at(SocketAddr::from((ip, port)), name).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.2 svc.l4lb.test\n127.0.0.3 svc.l4lb.test\n").unwrap();
    let dns_port = peer_port(42);
    let dig = crate::udp::which("dig");
    let dnsmasq = dnsmasq_with_hosts(&hosts, dns_port, &[]);
    let answers = |dig: &str| {
        let out = Command::new(dig)
            .args(["+short", "+tries=1", "+time=1", "-p", &dns_port.to_string()])
            .args(["@127.0.0.1", "svc.l4lb.test", "A"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let deadline = Instant::now() + PATIENCE;
    while !answers(&dig).contains("127.0.0.3") {
        assert!(Instant::now() < deadline, "dnsmasq never answered");
    }
    let lb = Balancer::start(&format!(
        "workers: 1\nlisteners:\n  - {{ name: t, bind: \"127.0.0.1:0\", pool: p }}\npools:\n  - name: p\n    discovery: {{ dns: svc.l4lb.test, type: a, port: {port}, interval: 200ms, resolver: \"127.0.0.1:{dns_port}\" }}\n"
    ));
    lb.wait_for_log(|l| l.contains("discovery: backends changed") && l.contains("backends=2"));
    let names: Vec<String> = reached(lb.addr(), 8).await.into_iter().collect();
    assert_eq!(names, ["b2", "b3"]);
    // A live session on b3, which the records are about to drop.
    let mut session = loop {
        let mut s = TcpStream::connect(lb.addr()).await.unwrap();
        let mut name = [0u8; 2];
        s.read_exact(&mut name).await.unwrap();
        if &name == b"b3" {
            break s;
        }
    };
    // The records change: b3 leaves, b4 comes; dnsmasq rereads on SIGHUP.
    std::fs::write(&hosts, "127.0.0.2 svc.l4lb.test\n127.0.0.4 svc.l4lb.test\n").unwrap();
    let pid = nix::unistd::Pid::from_raw(dnsmasq.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    lb.wait_for_log(|l| l.contains("discovery: backends changed") && l.contains("127.0.0.4"));
    let names: Vec<String> = reached(lb.addr(), 8).await.into_iter().collect();
    assert_eq!(names, ["b2", "b4"]);
    // The removed backend's live session goes on.
    session.write_all(b"still").await.unwrap();
    let mut back = [0u8; 5];
    session.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still");
    // DNS goes away: the last good set stays.
    drop(dnsmasq);
    lb.wait_for_log(|l| l.contains("discovery failed: keeping the last good set"));
    let names: Vec<String> = reached(lb.addr(), 8).await.into_iter().collect();
    assert_eq!(names, ["b2", "b4"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_discovery_takes_ports_weights_and_backups_from_srv_records() {
    let ports = [peer_port(43), peer_port(44), peer_port(45)];
    for (port, name) in ports.iter().zip(["s1", "s2", "s3"]) {
        named_at(SocketAddr::from(([127, 0, 0, 1], *port)), name).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 t.l4lb.test\n").unwrap();
    let dns_port = peer_port(46);
    // Priority 0 with weights 10 and 30; priority 1 is a backup.
    let srv = [(ports[0], 0, 10), (ports[1], 0, 30), (ports[2], 1, 10)].map(
        |(port, priority, weight)| {
            format!("--srv-host=_db._tcp.l4lb.test,t.l4lb.test,{port},{priority},{weight}")
        },
    );
    let _dnsmasq = dnsmasq_with_hosts(&hosts, dns_port, &srv);
    let lb = Balancer::start(&format!(
        "workers: 1\nlisteners:\n  - {{ name: t, bind: \"127.0.0.1:0\", pool: p }}\npools:\n  - name: p\n    discovery: {{ dns: _db._tcp.l4lb.test, type: srv, interval: 200ms, resolver: \"127.0.0.1:{dns_port}\" }}\n"
    ));
    lb.wait_for_log(|l| l.contains("discovery: backends changed") && l.contains("backends=3"));
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..40 {
        let mut s = TcpStream::connect(lb.addr()).await.unwrap();
        let mut name = [0u8; 2];
        s.read_exact(&mut name).await.unwrap();
        *counts
            .entry(String::from_utf8_lossy(&name).to_string())
            .or_insert(0) += 1;
    }
    // Smooth weighted round robin over 10:30; the backup gets nothing.
    assert_eq!(counts.get("s1"), Some(&10), "{counts:?}");
    assert_eq!(counts.get("s2"), Some(&30), "{counts:?}");
    assert_eq!(counts.get("s3"), None, "{counts:?}");
}
