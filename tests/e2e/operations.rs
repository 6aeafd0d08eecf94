//! Operating l4lb through the real binary: reloads that never touch a live connection,
//! the admin endpoint and `l4lb ctl`, metrics checked by promtool and against what was
//! sent, readiness for load balancers and BGP daemons.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::harness::*;

/// A config with an admin endpoint, listeners (name, pool) and pools (name, backends).
fn ops_config(
    workers: usize,
    listeners: &[(&str, &str)],
    pools: &[(&str, &[SocketAddr])],
    extra: &str,
) -> String {
    let mut s =
        format!("workers: {workers}\ndrain_timeout: 5s\nadmin: 127.0.0.1:0\n{extra}\nlisteners:\n");
    for (name, pool) in listeners {
        s.push_str(&format!(
            "  - {{ name: {name}, bind: \"127.0.0.1:0\", pool: {pool} }}\n"
        ));
    }
    s.push_str("pools:\n");
    for (name, backends) in pools {
        s.push_str(&format!("  - name: {name}\n    backends:\n"));
        for b in *backends {
            s.push_str(&format!("      - {{ address: \"{b}\" }}\n"));
        }
    }
    s
}

/// Rewrites the listener binds of `config` to the addresses `lb` already has, so a
/// reload keeps them (port 0 would mean "a new port": a rebind).
fn keep_ports(lb: &Balancer, config: &str, names: &[&str]) -> String {
    let mut out = String::new();
    for line in config.lines() {
        let kept = names.iter().find_map(|name| {
            line.contains(&format!("name: {name},"))
                .then(|| line.replace("127.0.0.1:0", &lb.listener(name).to_string()))
        });
        out.push_str(&kept.unwrap_or_else(|| line.to_string()));
        out.push('\n');
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_transfer_survives_five_reloads_byte_exact() {
    let echo = echo_backend().await;
    let other = echo_backend().await;
    let base = ops_config(2, &[("test", "p")], &[("p", &[echo])], "");
    let lb = Balancer::start(&base);
    let base = keep_ports(&lb, &base, &["test"]);
    let addr = lb.addr();
    let transfer = tokio::spawn(async move {
        let s = TcpStream::connect(addr).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let data = random_bytes(42, 64 * 1024);
        let reader = tokio::spawn(async move {
            let mut hash = 0u64;
            let mut total = 0usize;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = r.read(&mut buf).await.unwrap();
                if n == 0 {
                    return (total, hash);
                }
                for &b in &buf[..n] {
                    hash = hash.wrapping_mul(0x100_0000_01b3) ^ u64::from(b);
                }
                total += n;
            }
        });
        // 20 seconds at a steady pace, one 64 KiB chunk every 20 ms.
        let started = Instant::now();
        let mut every = tokio::time::interval(Duration::from_millis(20));
        let mut sent = 0usize;
        let mut hash = 0u64;
        while started.elapsed() < Duration::from_secs(20) {
            every.tick().await;
            w.write_all(&data).await.unwrap();
            for &b in &data {
                hash = hash.wrapping_mul(0x100_0000_01b3) ^ u64::from(b);
            }
            sent += data.len();
        }
        w.shutdown().await.unwrap();
        let (got, got_hash) = reader.await.unwrap();
        (sent, hash, got, got_hash)
    });
    // Five reloads while it runs: a backend added, a weight, a timeout, workers, a pool.
    let changes = [
        base.replace(
            &format!("      - {{ address: \"{echo}\" }}\n"),
            &format!("      - {{ address: \"{echo}\" }}\n      - {{ address: \"{other}\" }}\n"),
        ),
        base.replace(
            &format!("{{ address: \"{echo}\" }}"),
            &format!("{{ address: \"{echo}\", weight: 5 }}"),
        ),
        base.replace(
            "drain_timeout: 5s",
            "drain_timeout: 7s\ndefaults: { idle_timeout: 1h }",
        ),
        base.replace("workers: 2", "workers: 3"),
        format!("{base}  - name: spare\n    backends: [ {{ address: \"{other}\" }} ]\n"),
    ];
    // One reload every 3 seconds of the transfer.
    let mut pace = tokio::time::interval(Duration::from_secs(3));
    for config in &changes {
        pace.tick().await;
        let outcome = lb.reload(config);
        assert!(outcome.contains("config reloaded"), "{outcome}");
    }
    let (sent, hash, got, got_hash) = transfer.await.unwrap();
    assert!(sent > 10 << 20, "a real transfer: {sent} bytes");
    assert_eq!(
        (got, got_hash),
        (sent, hash),
        "byte-exact through five reloads"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_backends_and_listeners_without_touching_live_ones() {
    let a = Killable::start("a").await;
    let b = Killable::start("b").await;
    let config = ops_config(2, &[("main", "p"), ("side", "p")], &[("p", &[a.addr])], "");
    let lb = Balancer::start(&config);
    let side = lb.listener("side");
    let mut live = TcpStream::connect(side).await.unwrap();
    let mut name = [0u8; 1];
    live.read_exact(&mut name).await.unwrap();
    assert_eq!(&name, b"a");

    // b replaces a; the side listener goes.
    let next = keep_ports(
        &lb,
        &ops_config(2, &[("main", "p")], &[("p", &[b.addr])], ""),
        &["main"],
    );
    let outcome = lb.reload(&next);
    assert!(
        outcome.contains("listeners_removed\":[\"side\"]"),
        "{outcome}"
    );
    for _ in 0..20 {
        assert_eq!(
            who(lb.listener("main")).await.unwrap(),
            "b",
            "the added backend serves, the removed one gets nothing"
        );
    }
    // The live connection through the removed listener, to the removed backend, goes on.
    live.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    live.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here");
    assert!(
        TcpStream::connect(side).await.is_err(),
        "the removed listener no longer accepts"
    );
}

fn worker_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.starts_with("l4lb-worker-"))
        })
        .count()
}

/// Run in a namespace of its own with `net.ipv4.tcp_migrate_req=1`, as README asks for
/// deployments that change `workers` by reload: the kernel then moves the connections
/// queued on a retired worker's socket to another worker's instead of resetting them.
#[test]
fn a_changed_worker_count_takes_effect_with_no_failed_connection() {
    let Some(ns) = crate::netns::Netns::create() else {
        return;
    };
    assert!(ns.exec(&["sysctl", "-q", "-w", "net.ipv4.tcp_migrate_req=1"]));
    let prefix = ns.prefix();
    ns.run(move || Box::pin(workers_change(prefix)));
}

async fn workers_change(prefix: Vec<String>) {
    let a = Killable::start("a").await;
    let base = ops_config(2, &[("test", "p")], &[("p", &[a.addr])], "");
    let lb = Balancer::start_with(
        &base,
        Launch {
            prefix,
            ..Launch::default()
        },
    );
    let base = keep_ports(&lb, &base, &["test"]);
    let addr = lb.addr();
    let stop = tokio_util::sync::CancellationToken::new();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let clients = {
        let (stop, served) = (stop.clone(), served.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                who(addr)
                    .await
                    .expect("no connection fails while workers change");
                served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    let count = || served.load(std::sync::atomic::Ordering::Relaxed);
    for workers in [2, 4, 1, 3, 1] {
        if workers != 2 {
            let outcome = lb.reload(&base.replace("workers: 2", &format!("workers: {workers}")));
            assert!(outcome.contains("config reloaded"), "{outcome}");
        }
        // A thread names itself when it first runs: wait for the names, bounded.
        let deadline = Instant::now() + PATIENCE;
        while worker_threads(lb.pid()) != workers {
            assert!(Instant::now() < deadline, "{workers} workers never ran");
            tokio::task::yield_now().await;
        }
        let (status, body) = http(lb.admin(), "GET", "/status", "", None).await;
        assert_eq!(status, 200);
        assert!(body.contains(&format!("\"workers\":{workers}")), "{body}");
        // Serve a while with this count (clients through the change, and after it).
        let target = count() + 30;
        while count() < target {
            assert!(!clients.is_finished(), "a client failed");
            tokio::task::yield_now().await;
        }
    }
    stop.cancel();
    clients.await.expect("no client failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_reload_keeps_the_old_config_and_says_why() {
    let a = Killable::start("a").await;
    let config = ops_config(2, &[("test", "p")], &[("p", &[a.addr])], "");
    let lb = Balancer::start(&config);
    let admin = lb.admin();
    let outcome = lb.reload("listeners: [\n");
    assert!(outcome.contains("reload refused"), "{outcome}");
    assert_eq!(who(lb.addr()).await.unwrap(), "a", "the old config serves");

    std::fs::write(
        lb.config_path(),
        config.replace("pool: p }", "pool: nope }"),
    )
    .unwrap();
    let (status, body) = http(admin, "POST", "/reload", "", None).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("listeners[0].pool: no pool named \\\"nope\\\""),
        "{body}"
    );

    std::fs::write(
        lb.config_path(),
        config.replace("workers: 2", "workers: 100000"),
    )
    .unwrap();
    let (status, body) = http(admin, "POST", "/reload", "", None).await;
    assert_eq!(status, 400);
    assert!(
        body.contains("workers: 100000 is outside 1..=256"),
        "{body}"
    );
    // The log line is written off the control thread: it may follow the HTTP reply.
    lb.wait_for_log(|l| l.contains("reload refused") && l.contains("workers: 100000"));
    assert_eq!(who(lb.addr()).await.unwrap(), "a");
}

/// The value of the sample `name{labels}` in a metrics text.
fn sample(text: &str, name_and_labels: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or_else(|| panic!("no sample {name_and_labels} in:\n{text}")) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_count_what_was_sent() {
    let echo = echo_backend().await;
    let udp_addr = udp_echo().await;
    let config = format!(
        "workers: 2\nadmin: 127.0.0.1:0\nlisteners:\n  - {{ name: test, bind: \"127.0.0.1:0\", pool: p }}\n  - {{ name: dns, bind: \"127.0.0.1:0\", protocol: udp, pool: u }}\npools:\n  - name: p\n    backends: [ {{ address: \"{echo}\" }} ]\n  - name: u\n    backends: [ {{ address: \"{udp_addr}\" }} ]\n"
    );
    let lb = Balancer::start(&config);
    const CONNECTIONS: usize = 7;
    const EACH: usize = 10_000;
    for i in 0..CONNECTIONS {
        let mut s = TcpStream::connect(lb.listener("test")).await.unwrap();
        let data = random_bytes(i as u64, EACH);
        s.write_all(&data).await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, data);
    }
    lb.wait_for_logs(CONNECTIONS, |l| l.contains("connection closed"));
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = [0u8; 64];
    for i in 0..5u8 {
        client.send_to(&[i; 10], lb.listener("dns")).await.unwrap();
        let (n, _) = tokio::time::timeout(PATIENCE, client.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 10);
    }
    let (status, text) = http(lb.admin(), "GET", "/metrics", "", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        sample(&text, "l4lb_listener_connections_total{listener=\"test\"}"),
        CONNECTIONS as u64
    );
    assert_eq!(
        sample(
            &text,
            "l4lb_bytes_total{listener=\"test\",direction=\"in\"}"
        ),
        (CONNECTIONS * EACH) as u64
    );
    assert_eq!(
        sample(
            &text,
            "l4lb_bytes_total{listener=\"test\",direction=\"out\"}"
        ),
        (CONNECTIONS * EACH) as u64
    );
    assert_eq!(
        sample(
            &text,
            &format!("l4lb_backend_connections_total{{pool=\"p\",backend=\"{echo}\"}}")
        ),
        CONNECTIONS as u64
    );
    assert_eq!(
        sample(
            &text,
            &format!("l4lb_backend_connect_seconds_count{{pool=\"p\",backend=\"{echo}\"}}")
        ),
        CONNECTIONS as u64
    );
    assert_eq!(
        sample(
            &text,
            "l4lb_udp_datagrams_total{listener=\"dns\",direction=\"in\"}"
        ),
        5
    );
    assert_eq!(
        sample(
            &text,
            "l4lb_udp_datagrams_total{listener=\"dns\",direction=\"out\"}"
        ),
        5
    );
    assert_eq!(sample(&text, "l4lb_udp_flows_total{listener=\"dns\"}"), 1);
    assert_eq!(
        sample(
            &text,
            &format!("l4lb_backend_up{{pool=\"p\",backend=\"{echo}\"}}")
        ),
        1
    );
    assert_eq!(
        sample(&text, "l4lb_config_reloads_total{result=\"success\"}"),
        0
    );

    // Every metric the shipped Grafana dashboard queries exists.
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../config/grafana-l4lb.json"
    ))
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("l4lb_") {
                    let family = word.trim_end_matches("_bucket");
                    assert!(
                        text.contains(&format!("\n{family}")),
                        "the dashboard queries {word}, which /metrics lacks"
                    );
                    queried += 1;
                }
            }
        }
    }
    assert!(queried >= 15, "the dashboard covers the metrics: {queried}");

    let promtool = ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect(
            "promtool is not installed: scripts/test.sh installs it (apt-get install prometheus)",
        );
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ctl(lb: &Balancer, args: &[&str]) -> (bool, String) {
    let out = Command::new(binary())
        .arg("--config")
        .arg(lb.config_path())
        .args(["ctl", "--admin", &lb.admin().to_string()])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_through_the_api_and_ctl_keeps_live_connections() {
    let a = Killable::start("a").await;
    let b = Killable::start("b").await;
    let lb = Balancer::start(&ops_config(
        2,
        &[("test", "p")],
        &[("p", &[a.addr, b.addr])],
        "",
    ));
    // A live connection on a.
    let mut live = loop {
        let mut s = TcpStream::connect(lb.addr()).await.unwrap();
        let mut name = [0u8; 1];
        s.read_exact(&mut name).await.unwrap();
        if &name == b"a" {
            break s;
        }
    };
    let (status, body) = http(
        lb.admin(),
        "POST",
        &format!("/pools/p/backends/{}/drain", a.addr),
        "",
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for _ in 0..20 {
        assert_eq!(
            who(lb.addr()).await.unwrap(),
            "b",
            "a drained backend gets no new connection"
        );
    }
    live.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    live.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping", "its live connection continues");
    // The operator's state survives a reload for a backend that stays.
    let same = std::fs::read_to_string(lb.config_path()).unwrap();
    let outcome = lb.reload(&keep_ports(&lb, &same, &["test"]));
    assert!(outcome.contains("config reloaded"), "{outcome}");
    for _ in 0..10 {
        assert_eq!(
            who(lb.addr()).await.unwrap(),
            "b",
            "still drained after a reload"
        );
    }

    let (ok, table) = ctl(&lb, &["status"]);
    assert!(ok);
    let row = table
        .lines()
        .find(|l| l.contains(&a.addr.to_string()))
        .unwrap();
    assert!(row.contains("draining"), "{table}");
    let (_, status) = http(lb.admin(), "GET", "/status", "", None).await;
    assert!(
        status.contains("\"why\":\"operator (drain from 127.0.0.1:"),
        "says why: {status}"
    );
    let (ok, _) = ctl(&lb, &["enable", "p", &a.addr.to_string()]);
    assert!(ok);
    let (ok, _) = ctl(&lb, &["drain", "p", &b.addr.to_string()]);
    assert!(ok);
    for _ in 0..10 {
        assert_eq!(
            who(lb.addr()).await.unwrap(),
            "a",
            "enabled again, and b drained by ctl"
        );
    }
    let (ok, _) = ctl(&lb, &["weight", "p", &b.addr.to_string(), "300"]);
    assert!(!ok, "weights stay in 1..=256");
    let (ok, _) = ctl(&lb, &["enable", "p", "127.0.0.1:1"]);
    assert!(!ok, "an unknown backend is an error");
    let mut seen: HashMap<String, usize> = HashMap::new();
    ctl(&lb, &["enable", "p", &b.addr.to_string()]);
    ctl(&lb, &["weight", "p", &b.addr.to_string(), "3"]);
    for _ in 0..40 {
        *seen.entry(who(lb.addr()).await.unwrap()).or_default() += 1;
    }
    assert_eq!(seen["b"], 30, "weight 3:1 through ctl: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_off_loopback_needs_a_token_and_the_token_is_checked() {
    let a = Killable::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(
        &path,
        ops_config(1, &[("test", "p")], &[("p", &[a.addr])], "")
            .replace("admin: 127.0.0.1:0", "admin: 0.0.0.0:0"),
    )
    .unwrap();
    let out = Command::new(binary())
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "refuses to start");
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("admin: 0.0.0.0:0 is not a loopback address: set admin_token"));

    let token = "s3cret-token-for-tests";
    let lb = Balancer::start(&ops_config(
        1,
        &[("test", "p")],
        &[("p", &[a.addr])],
        &format!("admin_token: {token}"),
    ));
    assert_eq!(http(lb.admin(), "GET", "/status", "", None).await.0, 401);
    // Probes need no token: orchestrators and routing daemons poll them bare.
    assert_eq!(http(lb.admin(), "GET", "/ready", "", None).await.0, 200);
    assert_eq!(http(lb.admin(), "GET", "/live", "", None).await.0, 200);
    assert_eq!(
        http(
            lb.admin(),
            "GET",
            "/status",
            "",
            Some("wrong-token-wrong-token")
        )
        .await
        .0,
        401
    );
    assert_eq!(
        http(lb.admin(), "GET", "/status", "", Some(token)).await.0,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_turns_503_at_sigterm_while_connections_drain() {
    let echo = echo_backend().await;
    let lb = Balancer::start(&ops_config(1, &[("test", "p")], &[("p", &[echo])], ""));
    let admin = lb.admin();
    assert_eq!(http(admin, "GET", "/ready", "", None).await.0, 200);
    assert_eq!(http(admin, "GET", "/live", "", None).await.0, 200);
    let mut live = TcpStream::connect(lb.addr()).await.unwrap();
    live.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    live.read_exact(&mut one).await.unwrap();
    lb.terminate();
    lb.wait_for_log(|l| l.contains("stopping"));
    assert_eq!(
        http(admin, "GET", "/ready", "", None).await.0,
        503,
        "not ready once stopping"
    );
    assert_eq!(
        http(admin, "GET", "/live", "", None).await.0,
        200,
        "still alive while draining"
    );
    let (status, body) = http(admin, "POST", "/reload", "", None).await;
    assert_eq!(
        status, 400,
        "nothing starts serving again once stopping: {body}"
    );
    assert!(body.contains("stopping"), "{body}");
    drop(live);
}

/// Waits (bounded) until `path` holds `lines` lines, and returns them.
async fn file_lines(path: &std::path::Path, lines: usize) -> Vec<String> {
    let deadline = Instant::now() + PATIENCE;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let got: Vec<String> = text.lines().map(String::from).collect();
        if got.len() >= lines {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{} has {} of {lines} lines",
            path.display(),
            got.len()
        );
        tick.tick().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_goes_to_its_file_as_json_and_reopens_on_sigusr1() {
    let a = Killable::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let lb = Balancer::start(&ops_config(
        1,
        &[("test", "p")],
        &[("p", &[a.addr])],
        &format!("log: {{ access: \"{}\", format: json }}", path.display()),
    ));
    for _ in 0..3 {
        assert_eq!(who(lb.addr()).await.unwrap(), "a");
    }
    let lines = file_lines(&path, 3).await;
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(v["fields"]["message"], "connection closed", "{line}");
        assert_eq!(v["fields"]["backend"], a.addr.to_string(), "{line}");
        assert_eq!(v["fields"]["bytes_out"], 1, "{line}");
        assert_eq!(v["spans"][0]["listener"], "test", "{line}");
    }
    assert!(
        lb.logs_matching(|l| l.contains("connection closed"))
            .is_empty(),
        "the access log is not on stderr"
    );
    // logrotate: move the file, signal, and the next line goes to a new file.
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    use nix::sys::signal::{kill, Signal};
    kill(nix::unistd::Pid::from_raw(lb.pid() as i32), Signal::SIGUSR1).unwrap();
    lb.wait_for_log(|l| l.contains("SIGUSR1"));
    assert_eq!(who(lb.addr()).await.unwrap(), "a");
    assert_eq!(
        file_lines(&path, 1).await.len(),
        1,
        "a fresh file after SIGUSR1"
    );
    assert_eq!(
        std::fs::read_to_string(&rotated).unwrap().lines().count(),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_can_be_off() {
    let a = Killable::start("a").await;
    let lb = Balancer::start(&ops_config(
        1,
        &[("test", "p")],
        &[("p", &[a.addr])],
        "log: { access: off }",
    ));
    for _ in 0..3 {
        assert_eq!(who(lb.addr()).await.unwrap(), "a");
    }
    // The status counts them, the log does not name them.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (_, body) = http(lb.admin(), "GET", "/status", "", None).await;
        if body.contains("\"total\":3") {
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        tokio::task::yield_now().await;
    }
    assert!(lb
        .logs_matching(|l| l.contains("connection closed"))
        .is_empty());
}

/// A UDP echo on 127.0.0.1 that prefixes its name.
async fn udp_named(name: u8) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let mut reply = vec![name];
            reply.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&reply, from).await;
        }
    });
    addr
}

async fn ask_udp(client: &UdpSocket, to: SocketAddr) -> Vec<u8> {
    let mut buf = [0u8; 64];
    client.send_to(b"x", to).await.unwrap();
    let (n, _) = tokio::time::timeout(PATIENCE, client.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    buf[..n].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_flow_moves_off_a_backend_the_reload_removed() {
    let a = udp_named(b'a').await;
    let b = udp_named(b'b').await;
    let config = |backend: SocketAddr, bind: &str| {
        format!("workers: 1\nlisteners:\n  - {{ name: u, bind: \"{bind}\", protocol: udp, pool: p }}\npools:\n  - name: p\n    backends: [ {{ address: \"{backend}\" }} ]\n")
    };
    let lb = Balancer::start(&config(a, "127.0.0.1:0"));
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert_eq!(ask_udp(&client, lb.addr()).await, b"ax");
    let outcome = lb.reload(&config(b, &lb.addr().to_string()));
    assert!(outcome.contains("config reloaded"), "{outcome}");
    assert_eq!(
        ask_udp(&client, lb.addr()).await,
        b"bx",
        "the same client's next datagram goes to the new backend"
    );
}
