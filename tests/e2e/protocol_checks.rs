//! Health checks that speak the protocol, against real peers: a Redis primary/replica
//! pair whose roles swap, PostgreSQL behind Patroni-style role endpoints on a side port,
//! and dnsmasq resolvers that stop or pause; each from its example in `config/`.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use std::io::{Read, Write};
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::edge::{example, psql, run, start_postgres_at, Pki};
use crate::harness::*;
use crate::udp::{dig_once, start_dnsmasq, which};

fn start_redis(port: u16) -> Peer {
    let redis = program(
        &["/usr/bin/redis-server", "/usr/sbin/redis-server"],
        "redis-server",
    );
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(redis);
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let peer = Peer::spawn(&mut command, dir);
    wait_accepting(([127, 0, 0, 1], port).into(), "redis");
    peer
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    run(Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args))
}

/// Six new connections through l4lb write (a replica would answer READONLY) and reach the
/// Redis on `port`.
fn writes_reach(lb_port: u16, port: u16) {
    for i in 0..6 {
        assert_eq!(redis_cli(lb_port, &["SET", &format!("k{i}"), "v"]), "OK");
        assert_eq!(
            redis_cli(lb_port, &["CONFIG", "GET", "port"]),
            format!("port\n{port}")
        );
    }
}

#[test]
fn redis_primary_check_follows_a_role_swap() {
    let (a, b) = (peer_port(31), peer_port(32));
    let _ra = start_redis(a);
    let _rb = start_redis(b);
    redis_cli(b, &["REPLICAOF", "127.0.0.1", &a.to_string()]);
    let lb = Balancer::start(&example(
        "redis-primary.yaml",
        &[
            ("127.0.0.1:6380", "127.0.0.1:0".into()),
            ("127.0.0.1:6381", format!("127.0.0.1:{a}")),
            ("127.0.0.1:6382", format!("127.0.0.1:{b}")),
            ("interval: 1s", "interval: 100ms".into()),
            ("fall: 2", "fall: 1".into()),
        ],
    ));
    let lb_port = lb.addr().port();
    let (addr_a, addr_b): (std::net::SocketAddr, std::net::SocketAddr) =
        (([127, 0, 0, 1], a).into(), ([127, 0, 0, 1], b).into());
    lb.wait_for_log(|l| state_change(l, addr_b, "down"));
    // Every new connection reaches the primary: writes succeed, and it is `a`.
    writes_reach(lb_port, a);
    // A client session on the primary, open across the swap.
    let mut session = std::net::TcpStream::connect(lb.addr()).unwrap();
    session.set_read_timeout(Some(PATIENCE)).unwrap();
    session.write_all(b"PING\r\n").unwrap();
    let mut pong = [0u8; 7];
    session.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"+PONG\r\n");
    // Swap the roles: `b` becomes the primary, `a` its replica.
    redis_cli(b, &["REPLICAOF", "NO", "ONE"]);
    redis_cli(a, &["REPLICAOF", "127.0.0.1", &b.to_string()]);
    lb.wait_for_log(|l| state_change(l, addr_a, "down"));
    // on_down: close: the old primary's session is reset at once, not left writing to a
    // replica.
    let mut rest = [0u8; 16];
    let cut = session.read(&mut rest);
    assert!(
        matches!(&cut, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{cut:?}"
    );
    lb.wait_for_log(|l| state_change(l, addr_b, "up"));
    writes_reach(lb_port, b);
}

/// A Patroni-style REST endpoint on `ip:port`: `GET /primary` answers 200 while `primary`
/// is set, 503 otherwise.
async fn role_endpoint(ip: &str, port: u16, primary: Arc<AtomicBool>) {
    let listener = tokio::net::TcpListener::bind((ip, port)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let primary = Arc::clone(&primary);
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let n = s.read(&mut request).await.unwrap_or(0);
                let asks_primary = request[..n].starts_with(b"GET /primary ");
                let status = if asks_primary && primary.load(Ordering::SeqCst) {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                let _ = s
                    .write_all(format!("HTTP/1.0 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patroni_style_http_check_sends_psql_to_the_primary() {
    let pki = Pki::new();
    let (pg_port, api_port) = (peer_port(33), peer_port(34));
    let nodes = [("node1", "127.0.0.2"), ("node2", "127.0.0.3")];
    let roles = [
        Arc::new(AtomicBool::new(true)),
        Arc::new(AtomicBool::new(false)),
    ];
    let mut servers = Vec::new();
    for ((name, ip), role) in nodes.iter().zip(&roles) {
        role_endpoint(ip, api_port, Arc::clone(role)).await;
        let pki = &pki;
        servers.push(tokio::task::block_in_place(|| {
            start_postgres_at(pki, name, ip, pg_port)
        }));
    }
    let lb = Balancer::start(&example(
        "patroni.yaml",
        &[
            ("127.0.0.1:5000", "127.0.0.1:0".into()),
            ("127.0.0.2:5432", format!("127.0.0.2:{pg_port}")),
            ("127.0.0.3:5432", format!("127.0.0.3:{pg_port}")),
            ("      - { address: 127.0.0.4:5432 }\n", String::new()),
            ("port: 8008", format!("port: {api_port}")),
            ("interval: 1s", "interval: 100ms".into()),
            ("fall: 2", "fall: 1".into()),
        ],
    ));
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable",
        lb.addr().port()
    );
    let node = |ip: [u8; 4]| std::net::SocketAddr::from((ip, pg_port));
    lb.wait_for_log(|l| state_change(l, node([127, 0, 0, 3]), "down"));
    for _ in 0..4 {
        let who = tokio::task::block_in_place(|| psql(&conninfo, "show cluster_name"));
        assert_eq!(who, "node1");
    }
    // Failover: node2 is promoted, node1 demoted.
    roles[0].store(false, Ordering::SeqCst);
    roles[1].store(true, Ordering::SeqCst);
    lb.wait_for_log(|l| state_change(l, node([127, 0, 0, 2]), "down"));
    lb.wait_for_log(|l| state_change(l, node([127, 0, 0, 3]), "up"));
    for _ in 0..4 {
        let who = tokio::task::block_in_place(|| psql(&conninfo, "show cluster_name"));
        assert_eq!(who, "node2");
    }
}

#[test]
fn dns_check_takes_out_a_stopped_and_a_paused_resolver() {
    let dig = which("dig");
    let (healthy, healthy_port) = start_dnsmasq(&dig);
    let (stopped, stopped_port) = start_dnsmasq(&dig);
    let (paused, paused_port) = start_dnsmasq(&dig);
    let lb = Balancer::start(&example(
        "dns-checked.yaml",
        &[
            ("127.0.0.1:5353", "127.0.0.1:0".into()),
            ("127.0.0.1:5301", format!("127.0.0.1:{healthy_port}")),
            ("127.0.0.1:5302", format!("127.0.0.1:{stopped_port}")),
            ("127.0.0.1:5303", format!("127.0.0.1:{paused_port}")),
            ("interval: 1s", "interval: 100ms".into()),
            ("timeout: 500ms", "timeout: 300ms".into()),
            ("fall: 2", "fall: 1".into()),
        ],
    ));
    drop(stopped);
    // SIGSTOP: the port stays open (no ICMP unreachable), nothing answers.
    let paused_pid = nix::unistd::Pid::from_raw(paused.0.id() as i32);
    nix::sys::signal::kill(paused_pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    for port in [stopped_port, paused_port] {
        lb.wait_for_log(|l| state_change(l, ([127, 0, 0, 1], port).into(), "down"));
    }
    // Each dig is a new flow (a new source port): all answered, by the healthy one.
    let lb_port = lb.addr().port();
    for _ in 0..6 {
        assert_eq!(dig_once(&dig, lb_port, 1), "192.0.2.7");
    }
    let _ = nix::sys::signal::kill(paused_pid, nix::sys::signal::Signal::SIGCONT);
    drop(paused);
    drop(healthy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_accepts_and_closes_at_once_is_ejected_by_passive_detection() {
    // Accepts, then closes without a byte (a dead application behind a live socket).
    let dies = backend(|s| async move { drop(s) }).await;
    let good = named_backend("good").await;
    let lb = Balancer::start(&format!(
        "workers: 1\nlisteners:\n  - {{ name: t, bind: \"127.0.0.1:0\", pool: p }}\npools:\n  - name: p\n    passive: {{ failures: 3, ejection_time: 60s }}\n    backends:\n      - {{ address: \"{dies}\" }}\n      - {{ address: \"{good}\" }}\n"
    ));
    // Round robin: every other connection meets the dying backend until it is ejected.
    for _ in 0..6 {
        let _ = fetch(lb.addr()).await;
    }
    let line = lb.wait_for_log(|l| state_change(l, dies, "ejected"));
    assert!(line.contains("closed before any byte"), "{line}");
    for _ in 0..10 {
        assert_eq!(fetch(lb.addr()).await.unwrap(), "good");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_gives_a_returning_backend_a_rising_share() {
    let a = Killable::start("a").await;
    let mut b = Killable::start("b").await;
    let lb = Balancer::start(&format!(
        "workers: 1\nlisteners:\n  - {{ name: t, bind: \"127.0.0.1:0\", pool: p }}\npools:\n  - name: p\n    slow_start: 4s\n    health: {{ interval: 100ms, timeout: 500ms, rise: 1, fall: 1 }}\n    backends:\n      - {{ address: \"{}\" }}\n      - {{ address: \"{}\" }}\n",
        a.addr, b.addr
    ));
    b.kill().await;
    lb.wait_for_log(|l| state_change(l, b.addr, "down"));
    b.restart().await;
    lb.wait_for_log(|l| state_change(l, b.addr, "up"));
    // Eight windows of half a second each (bounded in count too): b's share of new
    // connections in each.
    let mut shares = Vec::new();
    for _ in 0..9 {
        let window = std::time::Instant::now();
        let (mut total, mut to_b) = (0u32, 0u32);
        while window.elapsed() < std::time::Duration::from_millis(500) && total < 5_000 {
            if let Ok(name) = who(lb.addr()).await {
                total += 1;
                to_b += u32::from(name == "b");
            }
        }
        assert!(total >= 20, "too few connections to measure: {total}");
        shares.push(f64::from(to_b) / f64::from(total));
    }
    let text = format!("{shares:.2?}");
    eprintln!("slow start shares: {text}");
    // Round robin over equal weights ends at a half; it starts near 10% of that.
    assert!(shares[0] < 0.25, "first window: {text}");
    assert!(shares[4] > shares[0], "no ramp: {text}");
    assert!(
        shares[8] > 0.4,
        "not at full weight after slow_start: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_removed_by_reload_has_its_sessions_reset_after_close_after() {
    let a = Killable::start("a").await;
    let b = Killable::start("b").await;
    let config = |backends: &[SocketAddr]| {
        let mut c = String::from("workers: 1\nlisteners:\n  - { name: t, bind: \"127.0.0.1:0\", pool: p }\npools:\n  - name: p\n    on_down: close\n    close_after: 300ms\n    backends:\n");
        for addr in backends {
            c.push_str(&format!("      - {{ address: \"{addr}\" }}\n"));
        }
        c
    };
    let lb = Balancer::start(&config(&[a.addr, b.addr]));
    // Round robin: the first connection lands on a, the second on b.
    let mut sessions = Vec::new();
    for expected in ["a", "b"] {
        let mut s = tokio::net::TcpStream::connect(lb.addr()).await.unwrap();
        let mut name = [0u8; 1];
        s.read_exact(&mut name).await.unwrap();
        assert_eq!(&name, expected.as_bytes());
        sessions.push(s);
    }
    let reloaded = std::time::Instant::now();
    lb.reload(&config(&[a.addr]));
    // b's session is reset once close_after has passed; a's goes on echoing.
    let mut on_b = sessions.pop().unwrap();
    let mut buf = [0u8; 8];
    let cut = tokio::time::timeout(PATIENCE, on_b.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(&cut, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{cut:?}"
    );
    assert!(reloaded.elapsed() >= std::time::Duration::from_millis(300));
    let on_a = &mut sessions[0];
    on_a.write_all(b"still").await.unwrap();
    on_a.read_exact(&mut buf[..5]).await.unwrap();
    assert_eq!(&buf[..5], b"still");
}
