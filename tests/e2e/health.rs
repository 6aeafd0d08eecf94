//! Health checking and failover through the real binary. Probe intervals are short
//! (100 ms) so the waits here are a few probe intervals at most; every wait is on a log line.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

fn health_config(backends: &[(SocketAddr, bool)], health: &str) -> String {
    let mut s = format!(
        "workers: 2\ndefaults: {{ connect_timeout: 500ms }}\nlisteners:\n  - name: test\n    bind: 127.0.0.1:0\n    pool: p\npools:\n  - name: p\n    health: {health}\n    passive: {{ ejection_time: 100ms }}\n    backends:\n"
    );
    for (addr, backup) in backends {
        s.push_str(&format!(
            "      - {{ address: \"{addr}\", backup: {backup} }}\n"
        ));
    }
    s
}

/// Taken out of rotation: down by probes, or ejected by passive detection.
fn removed(line: &str, backend: SocketAddr) -> bool {
    state_change(line, backend, "down") || state_change(line, backend, "ejected")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_dies_mid_stream_and_no_client_notices() {
    let a = Killable::start("a").await;
    let mut b = Killable::start("b").await;
    let c = Killable::start("c").await;
    let lb = Balancer::start(&health_config(
        &[(a.addr, false), (b.addr, false), (c.addr, false)],
        "{ interval: 100ms, timeout: 100ms, rise: 2, fall: 3 }",
    ));
    let addr = lb.addr();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for i in 0..500 {
        if i == 100 {
            b.kill().await;
        }
        let name = who(addr).await.expect("no client connection fails");
        *seen.entry(name).or_default() += 1;
    }
    assert!(seen["b"] >= 20, "b served until it died: {seen:?}");
    let down = lb.wait_for_log(|l| removed(l, b.addr));
    // After detection nothing is sent to the dead backend.
    let lines = lb.logs_matching(|_| true);
    let at = lines.iter().position(|l| *l == down).unwrap();
    let b_addr = b.addr.to_string();
    let late_tries = lines[at + 1..]
        .iter()
        .filter(|l| {
            l.contains("backend connect failed") && field(l, "backend").as_deref() == Some(&b_addr)
        })
        .count();
    assert_eq!(
        late_tries, 0,
        "connects to the dead backend after it was marked down"
    );

    // Back after `rise` probes.
    b.restart().await;
    let up = lb.wait_for_log(|l| state_change(l, b.addr, "up"));
    assert!(up.contains("2/2 probes ok"), "{up}");
    let mut back = 0;
    for _ in 0..30 {
        if who(addr).await.unwrap() == "b" {
            back += 1;
        }
    }
    assert!(back >= 5, "traffic returned to b: {back}/30");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_syns_are_marked_down_but_a_silent_server_is_not() {
    let (_hole, _filler, hole) = black_hole();
    // Accepts every connection and never says a word: a connect probe cannot tell.
    let silent = backend(|s| async move {
        let mut s = s;
        let mut buf = [0u8; 16];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    let lb = Balancer::start(&health_config(
        &[(hole, false), (silent, false)],
        "{ interval: 100ms, timeout: 100ms, rise: 2, fall: 2 }",
    ));
    let down = lb.wait_for_log(|l| state_change(l, hole, "down"));
    assert!(down.contains("timeout after 100ms"), "{down}");
    assert!(lb
        .logs_matching(|l| state_change(l, silent, "down"))
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_takes_over_and_hands_back_without_touching_live_connections() {
    let mut primary = Killable::start("p").await;
    primary.kill().await;
    let backup = Killable::start("k").await;
    let lb = Balancer::start(&health_config(
        &[(primary.addr, false), (backup.addr, true)],
        "{ interval: 100ms, timeout: 100ms, rise: 2, fall: 3 }",
    ));
    let mut live = Vec::new();
    for _ in 0..5 {
        let mut s = TcpStream::connect(lb.addr()).await.unwrap();
        let mut name = [0u8; 1];
        s.read_exact(&mut name).await.unwrap();
        assert_eq!(&name, b"k", "the primary is dead: the backup serves");
        live.push(s);
    }
    for _ in 0..20 {
        assert_eq!(who(lb.addr()).await.unwrap(), "k");
    }
    lb.wait_for_log(|l| removed(l, primary.addr));
    primary.restart().await;
    lb.wait_for_log(|l| state_change(l, primary.addr, "up"));
    for _ in 0..10 {
        assert_eq!(
            who(lb.addr()).await.unwrap(),
            "p",
            "new connections go back to the primary"
        );
    }
    for (i, s) in live.iter_mut().enumerate() {
        let msg = format!("still here {i}");
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(
            back,
            msg.as_bytes(),
            "the backup's live connection is untouched"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_down_closes_clients_at_once_and_says_so_once() {
    let lb = Balancer::start(&health_config(
        &[(dead_addr(), false), (dead_addr(), false)],
        "{ interval: 100ms, timeout: 100ms, rise: 2, fall: 2 }",
    ));
    lb.wait_for_log(|l| l.contains("pool has no usable backend"));
    for _ in 0..20 {
        let started = Instant::now();
        let result = who(lb.addr()).await;
        assert!(result.is_err(), "closed without a byte");
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    assert_eq!(
        lb.logs_matching(|l| l.contains("pool has no usable backend"))
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detection_times() {
    // Passive: probes every 10 s cannot be what notices; connect failures do.
    let a = Killable::start("a").await;
    let mut b = Killable::start("b").await;
    let lb = Balancer::start(&health_config(
        &[(a.addr, false), (b.addr, false)],
        "{ interval: 10s, timeout: 1s, rise: 2, fall: 3 }",
    ));
    b.kill().await;
    let died = Instant::now();
    while lb.logs_matching(|l| removed(l, b.addr)).is_empty() {
        assert_eq!(who(lb.addr()).await.unwrap(), "a");
        assert!(
            died.elapsed() < Duration::from_secs(5),
            "passive detection did not happen"
        );
    }
    let passive = died.elapsed();
    eprintln!("passive detection: {passive:?}");
    assert!(passive < Duration::from_millis(500), "{passive:?}");
    drop(lb);

    // Active: no traffic at all; interval 100ms x fall 3 + timeout 100ms.
    let c = Killable::start("c").await;
    let mut d = Killable::start("d").await;
    let lb = Balancer::start(&health_config(
        &[(c.addr, false), (d.addr, false)],
        "{ interval: 100ms, timeout: 100ms, rise: 2, fall: 3 }",
    ));
    d.kill().await;
    let died = Instant::now();
    lb.wait_for_log(|l| state_change(l, d.addr, "down"));
    let active = died.elapsed();
    eprintln!("active detection: {active:?}");
    // interval x fall + timeout, plus 10% jitter per interval.
    assert!(active < Duration::from_millis(450), "{active:?}");
}
