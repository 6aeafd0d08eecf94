//! An ECMP tier for real, in network namespaces this test creates (addresses from the
//! documentation ranges only): a router running BIRD 2 with multipath, two l4lb nodes that
//! announce the VIP over BGP while their `/ready` says so (BIRD driven by
//! `deploy/bgp/announce-while-ready.sh`), backends and a client in their own namespaces.
//! The BIRD configs are the ones in `deploy/bgp/`.
//!
//!   client 203.0.113.2 -- 203.0.113.1 router 198.51.100.1 -- .2 node1 (VIP 198.51.100.100)
//!                                            198.51.100.5 -- .6 node2 (VIP 198.51.100.100)
//!                                            192.0.2.1 -- 192.0.2.10, .11 backends

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UdpSocket};

use crate::harness::*;
use crate::netns::Netns;

const VIP: &str = "198.51.100.100";

fn ip(args: &[&str]) {
    let ok = Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "ip {}", args.join(" "));
}

/// A veth pair from `a` (address `a_addr`) to `b` (address `b_addr`).
fn link(tag: &str, a: &Netns, a_addr: &str, b: &Netns, b_addr: &str) {
    let id = std::process::id() % 10_000;
    let (ea, eb) = (format!("e{id}{tag}a"), format!("e{id}{tag}b"));
    ip(&["link", "add", &ea, "type", "veth", "peer", "name", &eb]);
    ip(&["link", "set", &ea, "netns", &a.name]);
    ip(&["link", "set", &eb, "netns", &b.name]);
    for (ns, dev, addr) in [(a, &ea, a_addr), (b, &eb, b_addr)] {
        ip(&["-n", &ns.name, "addr", "add", addr, "dev", dev]);
        ip(&["-n", &ns.name, "link", "set", dev, "up"]);
    }
}

fn in_ns(ns: &Netns, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name, program]);
    c
}

fn vip_next_hops(router: &Netns) -> usize {
    let out = Command::new("ip")
        .args(["-n", &router.name, "route", "show", VIP])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let hops = text.matches("nexthop via").count();
    if hops == 0 && text.contains(" via ") {
        1
    } else {
        hops
    }
}

fn wait_next_hops(router: &Netns, want: usize) {
    let deadline = Instant::now() + PATIENCE;
    while vip_next_hops(router) != want {
        assert!(
            Instant::now() < deadline,
            "the router never had {want} next hops for the VIP"
        );
        std::thread::yield_now();
    }
}

const BACKENDS: &str = r#"
import socket, threading
def tcp():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("192.0.2.10", 9000)); s.listen(256)
    while True:
        c, a = s.accept(); c.sendall(a[0].encode()); c.close()
def udp(ip):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((ip, 9001))
    while True:
        d, a = u.recvfrom(2048); u.sendto(f"{ip} {a[0]}".encode(), a)
threading.Thread(target=tcp, daemon=True).start()
threading.Thread(target=udp, args=("192.0.2.11",), daemon=True).start()
udp("192.0.2.10")
"#;

const NODE_CONFIG: &str = r#"workers: 1
admin: 127.0.0.1:9900
shutdown_delay: 3s
drain_timeout: 5s
listeners:
  - { name: web, bind: "198.51.100.100:80", pool: web }
  - { name: dns, bind: "198.51.100.100:53", protocol: udp, pool: dns }
pools:
  - name: web
    backends: [ { address: "192.0.2.10:9000" } ]
  - name: dns
    algorithm: maglev
    backends: [ { address: "192.0.2.10:9001" }, { address: "192.0.2.11:9001" } ]
"#;

/// One TCP connection to the VIP from the client: the node that carried it.
async fn node_of_connection() -> std::io::Result<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect((VIP, 80)))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))??;
    let mut who = String::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_string(&mut who))
        .await
        .map_err(|_| std::io::Error::other("no answer"))??;
    Ok(who)
}

/// One datagram of the client's fixed UDP flow: (backend, node).
async fn udp_flow(socket: &UdpSocket) -> (String, String) {
    let vip: SocketAddr = format!("{VIP}:53").parse().unwrap();
    for _ in 0..20 {
        socket.send_to(b"q", vip).await.unwrap();
        let mut buf = [0u8; 128];
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(500), socket.recv_from(&mut buf)).await
        {
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            let (backend, node) = text.split_once(' ').unwrap();
            return (backend.to_string(), node.to_string());
        }
    }
    panic!("the UDP flow got no answer");
}

#[test]
fn an_ecmp_tier_announced_over_bgp_spreads_and_drains_a_node() {
    let bird = ["/usr/sbin/bird", "/usr/bin/bird"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or_else(|| panic!("bird is not installed: scripts/test.sh installs it (bird2)"));
    let Some(router) = Netns::create() else {
        return;
    };
    let (Some(node1), Some(node2), Some(backends), Some(client)) = (
        Netns::create(),
        Netns::create(),
        Netns::create(),
        Netns::create(),
    ) else {
        return;
    };
    link("1", &router, "198.51.100.1/30", &node1, "198.51.100.2/30");
    link("2", &router, "198.51.100.5/30", &node2, "198.51.100.6/30");
    link("c", &router, "203.0.113.1/24", &client, "203.0.113.2/24");
    link("b", &router, "192.0.2.1/24", &backends, "192.0.2.10/24");
    ip(&[
        "-n",
        &backends.name,
        "addr",
        "add",
        "192.0.2.11/24",
        "dev",
        &format!("e{}bb", std::process::id() % 10_000),
    ]);
    for (ns, gw) in [
        (&node1, "198.51.100.1"),
        (&node2, "198.51.100.5"),
        (&client, "203.0.113.1"),
        (&backends, "192.0.2.1"),
    ] {
        ip(&["-n", &ns.name, "route", "add", "default", "via", gw]);
    }
    for node in [&node1, &node2] {
        ip(&[
            "-n",
            &node.name,
            "addr",
            "add",
            &format!("{VIP}/32"),
            "dev",
            "lo",
        ]);
    }
    assert!(router.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]));
    // Hash flows on addresses and ports, so one client's connections spread over nodes.
    assert!(router.exec(&["sysctl", "-qw", "net.ipv4.fib_multipath_hash_policy=1"]));

    let dir = tempfile::tempdir().unwrap();
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/bgp");
    let python = program(&["/usr/bin/python3", "/usr/local/bin/python3"], "python3");
    let mut peers = Vec::new();
    let mut cmd = in_ns(&backends, &python.display().to_string());
    cmd.args(["-c", BACKENDS])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    peers.push(Peer::spawn(&mut cmd, tempfile::tempdir().unwrap()));
    let socket = |name: &str| dir.path().join(format!("{name}.ctl")).display().to_string();
    for (ns, conf, name) in [
        (&router, "bird-router.conf", "router"),
        (&node1, "bird-node1.conf", "node1"),
        (&node2, "bird-node2.conf", "node2"),
    ] {
        let mut cmd = in_ns(ns, bird);
        cmd.args(["-f", "-c", &format!("{deploy}/{conf}"), "-s", &socket(name)])
            .args([
                "-P",
                &dir.path().join(format!("{name}.pid")).display().to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        peers.push(Peer::spawn(&mut cmd, tempfile::tempdir().unwrap()));
    }
    let mut lbs = Vec::new();
    for (ns, name) in [(&node1, "node1"), (&node2, "node2")] {
        lbs.push(Balancer::start_with(
            NODE_CONFIG,
            Launch {
                prefix: ns.prefix(),
                ..Launch::default()
            },
        ));
        let mut cmd = in_ns(ns, "sh");
        cmd.arg(format!("{deploy}/announce-while-ready.sh"))
            .args(["http://127.0.0.1:9900", &socket(name)])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        peers.push(Peer::spawn(&mut cmd, tempfile::tempdir().unwrap()));
    }
    // Both nodes ready and announcing: the router holds two next hops for the VIP.
    wait_next_hops(&router, 2);

    // Connections from many client ports reach both nodes; a UDP flow answers.
    let (nodes, first) = client.run(|| {
        Box::pin(async {
            let deadline = Instant::now() + PATIENCE;
            while node_of_connection().await.is_err() {
                assert!(Instant::now() < deadline, "nothing answers on the VIP");
            }
            let mut nodes = BTreeSet::new();
            for _ in 0..64 {
                nodes.insert(node_of_connection().await.unwrap());
            }
            let flow = UdpSocket::bind("203.0.113.2:40053").await.unwrap();
            (nodes, udp_flow(&flow).await)
        })
    });
    assert_eq!(
        nodes,
        BTreeSet::from(["198.51.100.2".to_string(), "198.51.100.6".to_string()])
    );
    let (flow_backend, flow_node) = first;

    // SIGTERM on the node that carries the UDP flow: /ready turns 503, BIRD withdraws the
    // VIP while shutdown_delay keeps that node accepting; no new connection fails.
    let leaving = if flow_node == "198.51.100.2" { 0 } else { 1 };
    lbs[leaving].terminate();
    let router_name = router.name.clone();
    let (switching, failures, served, after) = client.run(move || {
        Box::pin(async move {
            let started = Instant::now();
            let one_hop = || {
                let out = Command::new("ip")
                    .args(["-n", &router_name, "route", "show", VIP])
                    .output()
                    .unwrap();
                !String::from_utf8_lossy(&out.stdout).contains("nexthop via")
            };
            // Until the route is withdrawn: connections keep going; one whose handshake
            // straddles the route change can break (a TCP connection cannot move between
            // nodes), so these are only counted.
            let (mut switching, mut served) = ((0, 0), 0);
            while !one_hop() {
                assert!(
                    started.elapsed() < PATIENCE,
                    "the route was never withdrawn"
                );
                match node_of_connection().await {
                    Ok(_) => switching.0 += 1,
                    Err(_) => switching.1 += 1,
                }
            }
            // From then on, through the end of shutdown_delay (3 s) and past it: none may
            // fail. Bounded in count and time.
            let mut failures = 0;
            while started.elapsed() < Duration::from_secs(5) && served + failures < 50_000 {
                match node_of_connection().await {
                    Ok(_) => served += 1,
                    Err(_) => failures += 1,
                }
            }
            let flow = UdpSocket::bind("203.0.113.2:40053").await.unwrap();
            (switching, failures, served, udp_flow(&flow).await)
        })
    });
    eprintln!(
        "ecmp drain: {} connections while the route changed ({} broke), then {served} after it, {failures} failed",
        switching.0 + switching.1,
        switching.1
    );
    assert_eq!(
        vip_next_hops(&router),
        1,
        "the leaving node's route was withdrawn"
    );
    assert_eq!(failures, 0, "{served} served, {failures} failed");
    // While the route changed, the leaving node still accepted (shutdown_delay): without
    // it, every connection hashed there would be refused. At most one may break because its
    // handshake straddled the change itself.
    assert!(switching.1 <= 1, "{switching:?}");
    // The leaving node stopped accepting during that window (after its delay).
    lbs[leaving].wait_for_log(|l| l.contains("stopping: no new connections"));
    // The UDP flow now crosses the other node and keeps its backend (maglev on the same
    // 5-tuple with the same config on every node).
    let (backend_after, node_after) = after;
    assert_ne!(node_after, flow_node);
    assert_eq!(backend_after, flow_backend);
    assert!(lbs[leaving]
        .exit_within(PATIENCE)
        .is_some_and(|s| s.success()));
}
