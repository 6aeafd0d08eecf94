//! Failover through the real binary: a lost backend's share spreads over the survivors by
//! weight for every kind of algorithm, hashing algorithms move only the lost backend's
//! clients (and bring them back), and passive detection can neither empty a pool nor keep
//! clients out once backends are back.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpSocket;

use crate::harness::*;

/// `count` connections one after another; every one must be served. Returns the count
/// per backend name.
async fn spread(lb: SocketAddr, count: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for i in 0..count {
        let name = who(lb)
            .await
            .unwrap_or_else(|e| panic!("client {i} failed: {e}"));
        *seen.entry(name).or_default() += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_a_dead_backends_share_evenly() {
    let a = Killable::start("a").await;
    let mut b = Killable::start("b").await;
    let c = Killable::start("c").await;
    b.kill().await;
    let lb = Balancer::start(&pool_config(
        "defaults: { connect_timeout: 500ms }",
        &[(a.addr, 1), (b.addr, 1), (c.addr, 1)],
        "",
    ));
    let seen = spread(lb.addr(), 300).await;
    assert_eq!(seen.get("b"), None);
    let on_a = seen.get("a").copied().unwrap_or(0);
    assert!((130..=170).contains(&on_a), "150 ± 20 each: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_without_its_heavy_backend_splits_evenly() {
    let a = Killable::start("a").await;
    let b = Killable::start("b").await;
    let mut c = Killable::start("c").await;
    c.kill().await;
    let lb = Balancer::start(&pool_config(
        "defaults: { connect_timeout: 500ms }",
        &[(a.addr, 1), (b.addr, 1), (c.addr, 2)],
        "",
    ));
    let seen = spread(lb.addr(), 300).await;
    let on_a = seen.get("a").copied().unwrap_or(0);
    assert!((135..=165).contains(&on_a), "even ± 10%: {seen:?}");
}

/// The client address of the `i`th test client: 127.1.x.y, one per client.
fn client_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250) as u8 + 1))
}

/// Connects from `ip` and reads the backend's one-letter name.
async fn who_from(lb: SocketAddr, ip: IpAddr) -> std::io::Result<String> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(ip, 0))?;
    let mut s = socket.connect(lb).await?;
    let mut name = [0u8; 1];
    s.read_exact(&mut name).await?;
    Ok(String::from_utf8_lossy(&name).into_owned())
}

async fn placements(lb: SocketAddr, clients: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(clients);
    for i in 0..clients {
        out.push(
            who_from(lb, client_ip(i))
                .await
                .expect("every client is served"),
        );
    }
    out
}

/// 900 client addresses (the issue asks 300; more keeps the 40/60 bound far from chance
/// whatever ports the backends get).
const CLIENTS: usize = 900;

async fn hashing_moves_only_the_lost_clients(algorithm: &str) {
    let a = Killable::start("a").await;
    let mut b = Killable::start("b").await;
    let c = Killable::start("c").await;
    let lb = Balancer::start(&pool_config("defaults: { connect_timeout: 500ms }", 
        &[(a.addr, 1), (b.addr, 1), (c.addr, 1)],
        &format!(
            "algorithm: {algorithm}\nhash: src_ip\nhealth: {{ interval: 100ms, timeout: 1s, rise: 1, fall: 3 }}\npassive: {{ ejection_time: 100ms }}"
        ),
    ));
    let before = placements(lb.addr(), CLIENTS).await;
    let on_b = before.iter().filter(|n| *n == "b").count();
    assert!(on_b > CLIENTS / 5, "b has its share: {on_b}");

    b.kill().await;
    let during = placements(lb.addr(), CLIENTS).await;
    let mut moved = HashMap::new();
    for (was, now) in before.iter().zip(&during) {
        if was == "b" {
            assert_ne!(now, "b");
            *moved.entry(now.clone()).or_insert(0usize) += 1;
        } else {
            assert_eq!(was, now, "{algorithm}: a client of a live backend moved");
        }
    }
    let to_a = moved.get("a").copied().unwrap_or(0);
    assert!(
        to_a * 10 >= on_b * 4 && to_a * 10 <= on_b * 6,
        "{algorithm}: b's {on_b} clients split no worse than 40/60: {moved:?}"
    );

    b.restart().await;
    lb.wait_for_log(|l| {
        l.contains("backend state changed")
            && field(l, "backend").as_deref() == Some(&b.addr.to_string())
            && field(l, "to").as_deref() == Some("up")
    });
    let after = placements(lb.addr(), CLIENTS).await;
    assert_eq!(
        before, after,
        "{algorithm}: every client is back where it was"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maglev_moves_only_the_lost_clients_and_brings_them_back() {
    hashing_moves_only_the_lost_clients("maglev").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_hash_moves_only_the_lost_clients_and_brings_them_back() {
    hashing_moves_only_the_lost_clients("source_hash").await;
}

/// Every backend stops for a second, during which clients keep arriving and fail; the
/// first client after the restart is served at once, with no wait for a probe.
async fn outage_of_every_backend(count: usize) {
    let mut backends = Vec::new();
    for name in ["a", "b", "c"].into_iter().take(count) {
        backends.push(Killable::start(name).await);
    }
    let weights: Vec<(SocketAddr, u32)> = backends.iter().map(|k| (k.addr, 1)).collect();
    // Probes every 10 s: they cannot be what brings the pool back.
    let lb = Balancer::start(&pool_config(
        "defaults: { connect_timeout: 500ms }",
        &weights,
        "health: { interval: 10s, timeout: 1s }",
    ));
    spread(lb.addr(), 10).await;
    for k in &mut backends {
        k.kill().await;
    }
    let outage = Instant::now();
    let mut failed = 0;
    while outage.elapsed() < Duration::from_secs(1) {
        if who(lb.addr()).await.is_err() {
            failed += 1;
        }
    }
    assert!(failed > 0, "the outage was seen");
    let ejected = lb.logs_matching(|l| field(l, "to").as_deref() == Some("ejected"));
    assert!(
        ejected.len() <= 1,
        "the cap (50%, at least one) holds: {ejected:?}"
    );
    for k in &mut backends {
        k.restart().await;
    }
    let restarted = Instant::now();
    let name = who(lb.addr())
        .await
        .expect("served right after the restart");
    assert!(!name.is_empty());
    assert!(restarted.elapsed() < Duration::from_millis(200));
    spread(lb.addr(), 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_whole_pool_outage_the_next_client_is_served() {
    outage_of_every_backend(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_one_ejected_backend_fails_open() {
    outage_of_every_backend(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_detection_ejects_no_more_than_its_cap() {
    let a = Killable::start("a").await;
    let b = Killable::start("b").await;
    let mut c = Killable::start("c").await;
    let mut d = Killable::start("d").await;
    c.kill().await;
    d.kill().await;
    let lb = Balancer::start(&pool_config(
        "defaults: { connect_timeout: 500ms }",
        &[(a.addr, 1), (b.addr, 1), (c.addr, 1), (d.addr, 1)],
        "passive: { failures: 3, max_ejection_percent: 25, ejection_time: 30s }",
    ));
    let seen = spread(lb.addr(), 200).await;
    assert_eq!(seen.len(), 2, "only a and b serve: {seen:?}");
    let ejected = lb.logs_matching(|l| field(l, "to").as_deref() == Some("ejected"));
    assert_eq!(ejected.len(), 1, "25% of 4 is one: {ejected:?}");
    lb.wait_for_log(|l| l.contains("the pool's ejection cap is reached"));
    let still_up = if ejected[0].contains(&c.addr.to_string()) {
        d.addr
    } else {
        c.addr
    };
    assert!(lb
        .logs_matching(|l| l.contains("backend state changed")
            && field(l, "backend").as_deref() == Some(&still_up.to_string()))
        .is_empty());
}
