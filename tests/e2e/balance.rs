//! Selection algorithms through the real binary.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::harness::*;

async fn fetch_from(ip: &str, port: u16, lb: SocketAddr) -> std::io::Result<String> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::new(ip.parse().unwrap(), port))?;
    let mut s = socket.connect(lb).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_follows_weights_1_1_2_over_3000_connections() {
    let a = named_backend("a").await;
    let b = named_backend("b").await;
    let c = named_backend("c").await;
    let lb = Balancer::start(&pool_config(
        "",
        &[(a, 1), (b, 1), (c, 2)],
        "algorithm: round_robin",
    ));
    let addr = lb.addr();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        tasks.push(tokio::spawn(async move {
            let mut seen: HashMap<String, usize> = HashMap::new();
            for _ in 0..375 {
                *seen.entry(fetch(addr).await.unwrap()).or_default() += 1;
            }
            seen
        }));
    }
    let mut total: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *total.entry(k).or_default() += v;
        }
    }
    assert_eq!(total.values().sum::<usize>(), 3000);
    for (name, share) in [("a", 0.25), ("b", 0.25), ("c", 0.5)] {
        let got = total[name] as f64 / 3000.0;
        assert!(
            (got - share).abs() <= 0.01,
            "{name}: {got:.4} vs {share} ({total:?})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_hash_pins_a_client_and_spreads_many() {
    let a = named_backend("a").await;
    let b = named_backend("b").await;
    let c = named_backend("c").await;
    let lb = Balancer::start(&pool_config(
        "",
        &[(a, 1), (b, 1), (c, 1)],
        "algorithm: source_hash",
    ));
    let mut pinned = HashSet::new();
    for _ in 0..30 {
        pinned.insert(fetch_from("127.0.0.2", 0, lb.addr()).await.unwrap());
    }
    assert_eq!(
        pinned.len(),
        1,
        "every connection from 127.0.0.2 on one backend: {pinned:?}"
    );
    let mut per_source: HashMap<IpAddr, String> = HashMap::new();
    for x in 10..110u8 {
        let ip = format!("127.0.0.{x}");
        let first = fetch_from(&ip, 0, lb.addr()).await.unwrap();
        let again = fetch_from(&ip, 0, lb.addr()).await.unwrap();
        assert_eq!(first, again, "{ip} moved");
        per_source.insert(ip.parse().unwrap(), first);
    }
    let used: HashSet<&String> = per_source.values().collect();
    assert_eq!(used.len(), 3, "100 sources cover every backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_agree_under_maglev_five_tuple() {
    let mut backends = Vec::new();
    for name in ["a", "b", "c", "d", "e"] {
        backends.push((named_backend(name).await, 1));
    }
    let config = pool_config("", &backends, "algorithm: maglev\nhash: five_tuple");
    let one = Balancer::start(&config);
    let two = Balancer::start(&config);
    let mut used = HashSet::new();
    for x in 0..60u16 {
        let ip = format!("127.0.1.{}", 1 + x % 50);
        // The first connection picks a source port; the second instance sees the same
        // (source address, source port).
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket
            .bind(SocketAddr::new(ip.parse().unwrap(), 0))
            .unwrap();
        let port = socket.local_addr().unwrap().port();
        let mut s = socket.connect(one.addr()).await.unwrap();
        let mut via_one = String::new();
        s.read_to_string(&mut via_one).await.unwrap();
        let via_two = fetch_from(&ip, port, two.addr()).await.unwrap();
        assert_eq!(via_one, via_two, "{ip}:{port}");
        used.insert(via_one);
    }
    assert!(used.len() >= 4, "flows spread over the backends: {used:?}");
}

/// A backend that sends its name at once and holds the connection until the client closes.
async fn holding_backend(name: &'static str) -> SocketAddr {
    backend(move |mut s| async move {
        let _ = s.write_all(name.as_bytes()).await;
        let mut sink = [0u8; 64];
        while let Ok(n) = s.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
}

async fn open_and_identify(lb: SocketAddr) -> (String, TcpStream) {
    let mut s = TcpStream::connect(lb).await.unwrap();
    let mut name = [0u8; 1];
    s.read_exact(&mut name).await.unwrap();
    (String::from_utf8_lossy(&name).into_owned(), s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_sends_new_connections_where_few_are_open() {
    let a = holding_backend("a").await;
    let b = holding_backend("b").await;
    let c = holding_backend("c").await;
    let lb = Balancer::start(&pool_config(
        "",
        &[(a, 1), (b, 1), (c, 1)],
        "algorithm: least_conn",
    ));
    let mut open: Vec<(String, TcpStream)> = Vec::new();
    for _ in 0..30 {
        open.push(open_and_identify(lb.addr()).await);
    }
    let count = |open: &[(String, TcpStream)], n: &str| open.iter().filter(|(x, _)| x == n).count();
    for n in ["a", "b", "c"] {
        assert_eq!(count(&open, n), 10, "long-lived connections spread evenly");
    }
    // Close five of a's connections: the next five must all go to a.
    let mut closed = 0;
    open.retain(|(n, _)| {
        if n == "a" && closed < 5 {
            closed += 1;
            false
        } else {
            true
        }
    });
    lb.wait_for_logs(5, |l| l.contains("connection closed"));
    for _ in 0..5 {
        let (n, s) = open_and_identify(lb.addr()).await;
        assert_eq!(n, "a");
        open.push((n, s));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_time_first_byte_avoids_a_slow_backend() {
    let fast1 = named_backend("f").await;
    let fast2 = named_backend("g").await;
    // The backend under test answers 50 ms late: the delay is the behaviour measured.
    let slow = backend(|mut s| async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = s.write_all(b"s").await;
        let _ = s.shutdown().await;
        let mut sink = [0u8; 16];
        while let Ok(n) = s.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    let lb = Balancer::start(&pool_config(
        "",
        &[(fast1, 1), (fast2, 1), (slow, 1)],
        "algorithm: least_time\nleast_time: first_byte",
    ));
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..60 {
        *seen.entry(fetch(lb.addr()).await.unwrap()).or_default() += 1;
    }
    let slow_share = seen.get("s").copied().unwrap_or(0);
    assert!(
        slow_share <= 6,
        "slow backend got {slow_share} of 60: {seen:?}"
    );
    assert!(
        seen.get("f").copied().unwrap_or(0) >= 10 && seen.get("g").copied().unwrap_or(0) >= 10,
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_spreads_long_lived_connections() {
    let a = holding_backend("a").await;
    let b = holding_backend("b").await;
    let c = holding_backend("c").await;
    let lb = Balancer::start(&pool_config(
        "",
        &[(a, 1), (b, 1), (c, 1)],
        "algorithm: p2c",
    ));
    let mut open = Vec::new();
    for _ in 0..60 {
        open.push(open_and_identify(lb.addr()).await);
    }
    for n in ["a", "b", "c"] {
        let k = open.iter().filter(|(x, _)| x == n).count();
        assert!((12..=28).contains(&k), "{n}: {k} of 60");
    }
}
