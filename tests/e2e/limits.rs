//! Per-source limits through the real binary: concurrent connections, new connections per
//! second (TCP) and new flows per second (UDP), each per source address.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

use crate::harness::*;

/// Connects from `ip` and reads the backend's one-letter name; `None` if l4lb closed the
/// connection without one (refused).
async fn name_from(lb: SocketAddr, ip: &str) -> (Option<String>, TcpStream) {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(ip.parse().unwrap(), 0))
        .unwrap();
    let mut s = socket.connect(lb).await.unwrap();
    let mut name = [0u8; 1];
    let got = match s.read(&mut name).await {
        Ok(1) => Some(String::from_utf8_lossy(&name).into_owned()),
        _ => None,
    };
    (got, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_eleventh_connection_of_one_source_is_refused_while_others_connect() {
    let a = Killable::start("a").await;
    let lb = Balancer::start(&config(&[a.addr], "max_connections_per_source: 10", ""));
    let mut held = Vec::new();
    for _ in 0..10 {
        let (name, s) = name_from(lb.addr(), "127.0.0.2").await;
        assert_eq!(name.as_deref(), Some("a"));
        held.push(s);
    }
    let (eleventh, _) = name_from(lb.addr(), "127.0.0.2").await;
    assert_eq!(eleventh, None, "the 11th from one source is refused");
    let (other, _other) = name_from(lb.addr(), "127.0.0.3").await;
    assert_eq!(other.as_deref(), Some("a"), "another source still connects");
    // One ends: that source may connect again (once l4lb has seen the close).
    drop(held.pop());
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (again, s) = name_from(lb.addr(), "127.0.0.2").await;
        if again.is_some() {
            held.push(s);
            break;
        }
        assert!(Instant::now() < deadline, "the slot never came back");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_per_second_are_limited_per_source() {
    let a = Killable::start("a").await;
    let lb = Balancer::start(&config(
        &[a.addr],
        "max_new_connections_per_second_per_source: 5",
        "",
    ));
    let mut served = 0;
    for _ in 0..20 {
        if name_from(lb.addr(), "127.0.0.4").await.0.is_some() {
            served += 1;
        }
    }
    // 20 attempts in well under a second: 5 served, 10 if they straddled two seconds.
    assert!((5..=10).contains(&served), "{served} of 20 served");
    assert_eq!(
        name_from(lb.addr(), "127.0.0.5").await.0.as_deref(),
        Some("a")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_udp_flows_per_second_are_limited_per_source() {
    let echo_addr = udp_echo().await;
    let lb = Balancer::start(&format!(
        "workers: 1\nlisteners:\n  - {{ name: u, bind: \"127.0.0.1:0\", protocol: udp, pool: p, max_new_flows_per_second_per_source: 3 }}\npools:\n  - name: p\n    backends: [ {{ address: \"{echo_addr}\" }} ]\n"
    ));
    // Ten new flows (ten source ports) from one address, sent before any reply is awaited.
    let mut clients = Vec::new();
    for _ in 0..10 {
        let s = UdpSocket::bind("127.0.0.6:0").await.unwrap();
        s.send_to(b"hi", lb.addr()).await.unwrap();
        clients.push(s);
    }
    let mut answered = 0;
    let mut buf = [0u8; 16];
    for s in &clients {
        if let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(300), s.recv_from(&mut buf)).await
        {
            answered += 1;
        }
    }
    assert!(
        (3..=6).contains(&answered),
        "{answered} of 10 new flows answered"
    );
    let other = UdpSocket::bind("127.0.0.7:0").await.unwrap();
    other.send_to(b"hi", lb.addr()).await.unwrap();
    let got = tokio::time::timeout(PATIENCE, other.recv_from(&mut buf)).await;
    assert!(matches!(got, Ok(Ok(_))), "another source still opens flows");
}
