//! UDP load balancing through the real binary.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use crate::harness::*;

/// Longest wait for one reply before the client counts it lost and retries.
const REPLY_WAIT: Duration = Duration::from_millis(500);

/// A UDP backend that answers every datagram with `name` followed by the datagram.
struct UdpBackend {
    addr: SocketAddr,
    task: Option<JoinHandle<()>>,
}

impl UdpBackend {
    async fn start(name: &'static str) -> UdpBackend {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let mut reply = name.as_bytes().to_vec();
                reply.extend_from_slice(&buf[..n]);
                let _ = socket.send_to(&reply, from).await;
            }
        });
        UdpBackend {
            addr,
            task: Some(task),
        }
    }

    /// Closes the socket: datagrams to it now draw ICMP port unreachable.
    async fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

/// A backend that echoes datagrams unchanged.
async fn udp_echo() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                return;
            };
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    addr
}

fn udp_config(backends: &[SocketAddr], listener_extra: &str, pool_extra: &str) -> String {
    let mut s = String::from("workers: 2\nlisteners:\n  - name: udp\n    bind: 127.0.0.1:0\n    protocol: udp\n    pool: p\n");
    for line in listener_extra.lines().filter(|l| !l.trim().is_empty()) {
        s.push_str(&format!("    {}\n", line.trim()));
    }
    s.push_str("pools:\n  - name: p\n");
    for line in pool_extra.lines().filter(|l| !l.trim().is_empty()) {
        s.push_str(&format!("    {}\n", line.trim()));
    }
    s.push_str("    backends:\n");
    for b in backends {
        s.push_str(&format!("      - {{ address: \"{b}\" }}\n"));
    }
    s
}

async fn client_on(ip: &str) -> UdpSocket {
    UdpSocket::bind(SocketAddr::new(ip.parse().unwrap(), 0))
        .await
        .unwrap()
}

/// Sends `payload` and waits for one reply, retrying a few times (UDP may lose a
/// datagram while a backend is being replaced).
async fn ask(socket: &UdpSocket, to: SocketAddr, payload: &[u8], tries: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 65536];
    for _ in 0..tries {
        socket.send_to(payload, to).await.unwrap();
        if let Ok(Ok((n, from))) =
            tokio::time::timeout(REPLY_WAIT, socket.recv_from(&mut buf)).await
        {
            assert_eq!(from, to, "replies come from the listener's address");
            return Some(buf[..n].to_vec());
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_fifty_exchanges_each_stay_on_their_backend() {
    let backends = [
        UdpBackend::start("a").await,
        UdpBackend::start("b").await,
        UdpBackend::start("c").await,
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let lb = Balancer::start(&udp_config(&addrs, "", ""));
    let target = lb.addr();
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        tasks.push(tokio::spawn(async move {
            let socket = client_on(&format!("127.0.2.{}", 1 + i % 100)).await;
            let mut backend = None;
            for j in 0..50u32 {
                let request = format!("client {i} request {j}");
                let reply = ask(&socket, target, request.as_bytes(), 5)
                    .await
                    .expect("a reply");
                let (name, body) = reply.split_at(1);
                assert_eq!(
                    body,
                    request.as_bytes(),
                    "the reply is for this client's request"
                );
                let name = name[0];
                assert_eq!(
                    *backend.get_or_insert(name),
                    name,
                    "the flow stayed on one backend"
                );
            }
            backend.unwrap()
        }));
    }
    let mut used = HashSet::new();
    for t in tasks {
        used.insert(t.await.unwrap());
    }
    assert_eq!(used.len(), 3, "maglev spread 200 flows over every backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_pass_whole_and_in_order() {
    let echo = udp_echo().await;
    let lb = Balancer::start(&udp_config(&[echo], "", ""));
    let socket = client_on("127.0.0.1").await;
    for size in [0usize, 1, 1472, 9000, 65507] {
        let payload = random_bytes(size as u64 + 1, size);
        let reply = ask(&socket, lb.addr(), &payload, 3).await.expect("a reply");
        assert_eq!(reply, payload, "{size}-byte datagram unchanged");
    }
    // 100 numbered datagrams in a burst come back in order, none merged or split.
    for n in 0..100u32 {
        socket.send_to(&n.to_be_bytes(), lb.addr()).await.unwrap();
    }
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while got.len() < 100 {
        match tokio::time::timeout(REPLY_WAIT, socket.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => {
                assert_eq!(n, 4);
                got.push(u32::from_be_bytes(buf[..4].try_into().unwrap()));
            }
            _ => break,
        }
    }
    assert!(got.len() >= 95, "loopback lost {} of 100", 100 - got.len());
    assert!(got.windows(2).all(|w| w[0] < w[1]), "reordered: {got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_move_off_a_killed_backend_on_their_next_datagram() {
    let a = UdpBackend::start("a").await;
    let mut b = UdpBackend::start("b").await;
    let lb = Balancer::start(&udp_config(
        &[a.addr, b.addr],
        "",
        "health: { interval: 100ms, timeout: 50ms, rise: 2, fall: 2 }",
    ));
    let mut clients = Vec::new();
    for i in 0..40 {
        let socket = client_on(&format!("127.0.3.{}", 1 + i)).await;
        let reply = ask(&socket, lb.addr(), b"hello", 3).await.unwrap();
        clients.push((socket, reply[0]));
    }
    assert!(clients.iter().any(|(_, n)| *n == b'b'), "some flows on b");
    b.kill().await;
    lb.wait_for_log(|l| {
        l.contains("backend state changed")
            && field(l, "backend").as_deref() == Some(&b.addr.to_string())
            && field(l, "to").as_deref() == Some("down")
    });
    for (socket, _) in &clients {
        let reply = ask(socket, lb.addr(), b"again", 3)
            .await
            .expect("served after failover");
        assert_eq!(reply[0], b'a', "every flow now goes to the live backend");
    }
    // The log writer batches lines: wait for the flow's end event rather than expecting it
    // written the moment the reply came back.
    let moved = lb.wait_for_log(|l| {
        l.contains("flow closed") && field(l, "end").as_deref() == Some("backend_down")
    });
    assert!(moved.contains(&b.addr.to_string()), "{moved}");
}

/// UDP sockets of process `pid` connected to `peer` (its flow sockets to that backend):
/// the socket inodes of its descriptors, looked up in the namespace's UDP table.
fn sockets_connected_to(pid: u32, peer: SocketAddr) -> usize {
    let SocketAddr::V4(peer) = peer else {
        panic!("IPv4 only")
    };
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(peer.ip().octets()),
        peer.port()
    );
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|t| {
            t.to_string_lossy()
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .map(String::from)
        })
        .collect();
    std::fs::read_to_string(format!("/proc/{pid}/net/udp"))
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.len() > 9 && cols[2] == want && inodes.contains(cols[9])
        })
        .count()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_flows_caps_the_table_under_a_flood_of_clients() {
    raise_nofile();
    let echo = udp_echo().await;
    let lb = Balancer::start(&udp_config(
        &[echo],
        "max_flows: 1000\nidle_timeout: 60s",
        "",
    ));
    let target = lb.addr();
    let rss_empty = rss_kib(lb.pid());
    // Warm up: the first 1000 flows fill the table; memory after that is the bound.
    let flood = |from: u32, to: u32| async move {
        let mut answered = 0;
        for i in from..to {
            let socket = client_on(&format!("127.0.{}.{}", 10 + i / 250, 1 + i % 250)).await;
            if ask(&socket, target, b"hi", 2).await.as_deref() == Some(b"hi") {
                answered += 1;
            }
        }
        answered
    };
    assert_eq!(flood(0, 1000).await, 1000);
    let rss_full = rss_kib(lb.pid());
    assert_eq!(
        flood(1000, 5000).await,
        4000,
        "new clients are served by evicting old flows"
    );
    // An evicted flow's socket closes when its reply task is dropped, a moment after the
    // eviction: wait (bounded) for the count to settle under the cap.
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let flows = sockets_connected_to(lb.pid(), echo);
        if flows <= 1000 {
            assert!(flows >= 900, "the table stays full: {flows}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{flows} backend sockets open for max_flows 1000"
        );
        tokio::task::yield_now().await;
    }
    let rss_after = rss_kib(lb.pid());
    eprintln!("rss with no flow: {rss_empty} KiB, with 1000 flows: {rss_full} KiB; after 5000 clients: {rss_after} KiB");
    assert!(
        rss_after <= rss_full + 4096,
        "memory grew past the cap: {rss_full} -> {rss_after} KiB"
    );
    // At least 4,000 evictions, each logged (the writer batches: waited for, not assumed).
    let evicted = lb.wait_for_logs(4000, |l| {
        l.contains("flow closed") && field(l, "end").as_deref() == Some("evicted")
    });
    assert!(evicted.len() >= 4000, "{} evictions", evicted.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_flows_expire() {
    let echo = udp_echo().await;
    let lb = Balancer::start(&udp_config(&[echo], "idle_timeout: 200ms", ""));
    let socket = client_on("127.0.0.1").await;
    assert_eq!(
        ask(&socket, lb.addr(), b"x", 3).await.as_deref(),
        Some(&b"x"[..])
    );
    let line = lb.wait_for_log(|l| l.contains("flow closed"));
    assert_eq!(
        field(&line, "end").as_deref(),
        Some("idle_timeout"),
        "{line}"
    );
    assert_eq!(field(&line, "datagrams_in").as_deref(), Some("1"));
    assert_eq!(field(&line, "datagrams_out").as_deref(), Some("1"));
}

/// A dnsmasq process, killed when dropped.
pub struct Dnsmasq(pub std::process::Child);

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn dig_once(dig: &str, port: u16, tries: u32) -> String {
    let out = std::process::Command::new(dig)
        .args([
            "+short",
            &format!("+tries={tries}"),
            "+time=1",
            "-p",
            &port.to_string(),
        ])
        .args(["@127.0.0.1", "www.l4lb.test", "A"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Starts dnsmasq and waits until it answers directly (a readiness check, bounded); one
/// that exits at start (its port taken meanwhile) is started again on another port.
pub fn start_dnsmasq(dig: &str) -> (Dnsmasq, u16) {
    let dnsmasq = which("dnsmasq");
    let deadline = std::time::Instant::now() + PATIENCE;
    for attempt in 0.. {
        let port = peer_port(attempt);
        let mut server = Dnsmasq(
            std::process::Command::new(&dnsmasq)
                .args([
                    "--keep-in-foreground",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                    "--listen-address=127.0.0.1",
                    "--user=root",
                    "--pid-file",
                    &format!("--port={port}"),
                    "--address=/l4lb.test/192.0.2.7",
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("start dnsmasq"),
        );
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "dnsmasq never answered"
            );
            if server.0.try_wait().unwrap().is_some() {
                break; // exited: try another port
            }
            if dig_once(dig, port, 1) == "192.0.2.7" {
                return (server, port);
            }
        }
    }
    unreachable!("the loop returns or panics")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_resolves_through_l4lb_from_dnsmasq() {
    let dig = which("dig");
    let (server, port) = tokio::task::spawn_blocking({
        let dig = dig.clone();
        move || start_dnsmasq(&dig)
    })
    .await
    .unwrap();
    let dns: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let lb = Balancer::start(&udp_config(&[dns], "", ""));
    let lb_port = lb.addr().port();
    let answer = tokio::task::spawn_blocking(move || dig_once(&dig, lb_port, 3))
        .await
        .unwrap();
    drop(server);
    assert_eq!(answer, "192.0.2.7", "dig through l4lb said {answer:?}");
    drop(lb);
}

pub fn which(program: &str) -> String {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin"] {
        let path = format!("{dir}/{program}");
        if std::path::Path::new(&path).exists() {
            return path;
        }
    }
    panic!("{program} is not installed: scripts/test.sh installs it (apt-get install dnsmasq-base dnsutils)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_sources_get_nothing() {
    let echo = udp_echo().await;
    let lb = Balancer::start(&udp_config(&[echo], "deny: [127.0.0.9]", ""));
    let denied = client_on("127.0.0.9").await;
    assert!(ask(&denied, lb.addr(), b"x", 1).await.is_none());
    let allowed = client_on("127.0.0.8").await;
    assert!(ask(&allowed, lb.addr(), b"x", 3).await.is_some());
}
