//! TCP relay behaviour through the real binary.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use crate::harness::*;

const BIG: usize = 64 * 1024 * 1024;

/// Streams 64 MiB each way at once and checks both checksums; returns the log line of the
/// connection's end.
async fn big_transfer(relay: &str) -> String {
    let upload = random_bytes(1, BIG);
    let download = random_bytes(2, BIG);
    let upload_sum = xxh3_64(&upload);
    let download_sum = xxh3_64(&download);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, usize)>(1);
    let download_for_backend = std::sync::Arc::new(download);
    let backend_addr = {
        let download = std::sync::Arc::clone(&download_for_backend);
        backend(move |s| {
            let tx = tx.clone();
            let download = std::sync::Arc::clone(&download);
            async move {
                let (mut r, mut w) = s.into_split();
                let writer = tokio::spawn(async move {
                    w.write_all(&download).await.unwrap();
                    w.shutdown().await.unwrap();
                });
                let mut hasher = Xxh3::new();
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0;
                loop {
                    let n = r.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    total += n;
                }
                writer.await.unwrap();
                tx.send((hasher.digest(), total)).await.unwrap();
            }
        })
        .await
    };
    let lb = Balancer::start(&config(&[backend_addr], &format!("relay: {relay}"), ""));
    let client = TcpStream::connect(lb.addr()).await.unwrap();
    let (mut r, mut w) = client.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&upload).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut hasher = Xxh3::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n;
    }
    writer.await.unwrap();
    assert_eq!(total, BIG, "client received every byte");
    assert_eq!(hasher.digest(), download_sum, "download checksum");
    let (backend_sum, backend_total) = rx.recv().await.unwrap();
    assert_eq!(backend_total, BIG, "backend received every byte");
    assert_eq!(backend_sum, upload_sum, "upload checksum");
    let line = lb.wait_for_log(|l| l.contains("connection closed"));
    assert_eq!(
        field(&line, "bytes_in").as_deref(),
        Some("67108864"),
        "{line}"
    );
    assert_eq!(
        field(&line, "bytes_out").as_deref(),
        Some("67108864"),
        "{line}"
    );
    assert_eq!(field(&line, "end").as_deref(), Some("closed"), "{line}");
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_arrive_intact_with_splice() {
    let line = big_transfer("splice").await;
    let spliced: u64 = field(&line, "spliced_bytes").unwrap().parse().unwrap();
    assert_eq!(spliced, 2 * BIG as u64, "every byte spliced: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_arrive_intact_with_copy() {
    let line = big_transfer("copy").await;
    assert_eq!(
        field(&line, "spliced_bytes").as_deref(),
        Some("0"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_arrive_intact_with_auto_switching_to_splice() {
    let line = big_transfer("auto").await;
    let spliced: u64 = field(&line, "spliced_bytes").unwrap().parse().unwrap();
    assert!(spliced > BIG as u64, "bulk moved to splice: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_copies_small_exchanges() {
    let b = echo_backend().await;
    let lb = Balancer::start(&config(&[b], "", ""));
    let mut c = TcpStream::connect(lb.addr()).await.unwrap();
    for i in 0..20u8 {
        let msg = vec![i; 100 + usize::from(i)];
        c.write_all(&msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
    }
    drop(c);
    let line = lb.wait_for_log(|l| l.contains("connection closed"));
    assert_eq!(
        field(&line, "spliced_bytes").as_deref(),
        Some("0"),
        "{line}"
    );
    // The whole access line, as the generic tracing format wrote it before l4lb formatted
    // it itself: what log shippers parse must not move.
    let shape = regex::Regex::new(concat!(
        r#"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z  INFO "#,
        r#"conn\{listener=test client=127\.0\.0\.1:\d+\}: access: connection closed "#,
        r#"pool=p backend=127\.0\.0\.1:\d+ bytes_in=2190 bytes_out=2190 duration_ms=\d+ "#,
        r#"end="closed" error=None spliced_bytes=0$"#
    ))
    .unwrap();
    assert!(shape.is_match(&line), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_half_close_reaches_backend_while_backend_keeps_sending() {
    let b = backend(|mut s| async move {
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap(); // returns only on the client's FIN
        s.write_all(b"you said: ").await.unwrap();
        s.write_all(&got).await.unwrap();
        s.shutdown().await.unwrap();
    })
    .await;
    let lb = Balancer::start(&config(&[b], "", ""));
    let mut c = TcpStream::connect(lb.addr()).await.unwrap();
    c.write_all(b"hello").await.unwrap();
    c.shutdown().await.unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).await.unwrap();
    assert_eq!(reply, "you said: hello");
    let line = lb.wait_for_log(|l| l.contains("connection closed"));
    assert_eq!(field(&line, "end").as_deref(), Some("closed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_half_close_reaches_client_while_client_keeps_sending() {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1);
    let b = backend(move |mut s| {
        let tx = tx.clone();
        async move {
            s.write_all(b"220 banner, then I stop talking\r\n")
                .await
                .unwrap();
            s.shutdown().await.unwrap(); // our FIN; we still read
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            tx.send(got).await.unwrap();
        }
    })
    .await;
    let lb = Balancer::start(&config(&[b], "", ""));
    let mut c = TcpStream::connect(lb.addr()).await.unwrap();
    let mut banner = String::new();
    c.read_to_string(&mut banner).await.unwrap(); // EOF: the backend's FIN arrived
    assert_eq!(banner, "220 banner, then I stop talking\r\n");
    c.write_all(b"still talking after your FIN").await.unwrap();
    c.shutdown().await.unwrap();
    assert_eq!(rx.recv().await.unwrap(), b"still talking after your FIN");
}

/// Sends `bytes` and the FIN in one segment, as a peer that writes its last bytes and
/// closes at once often does (`MSG_MORE` holds the bytes until the shutdown pushes both).
fn send_last(s: &TcpStream, bytes: &[u8]) {
    let sock = socket2::SockRef::from(s);
    let sent = sock.send_with_flags(bytes, nix::libc::MSG_MORE).unwrap();
    assert_eq!(sent, bytes.len());
    sock.shutdown(std::net::Shutdown::Write).unwrap();
}

/// Segments the socket from `local` to `peer` has received (`ss`, from TCP_INFO). Runs `ss`
/// synchronously: a few milliseconds, on a test runtime with two worker threads.
fn segs_in(local: SocketAddr, peer: SocketAddr) -> u64 {
    let out = std::process::Command::new("ss")
        .args(["-Htin", "src", &local.to_string(), "dst", &peer.to_string()])
        .output()
        .expect("ss (iproute2) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let found = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("segs_in:"))
        .unwrap_or_else(|| panic!("no segs_in for {local} -> {peer} in: {text}"));
    found.parse().unwrap()
}

/// A peer's last bytes and its FIN leave l4lb in one segment, as they came (HAProxy does
/// the same): the receiver gets the end with the data, in one wake-up, with one ACK. Each
/// direction is checked against the same exchange without l4lb in between; the receiving
/// socket is measured while it still has its own FIN to send (a closed one has no TCP_INFO).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_bytes_and_fin_leave_in_one_segment() {
    // Upward: the client's first bytes go alone; once the backend has them, l4lb has read
    // them and waits on the client's socket, and the last bytes and FIN go in one segment.
    // (Sent at once, they could meet l4lb's first read of a freshly accepted socket, which
    // tokio takes as readable before its event loop has seen anything, FIN included.)
    let (tx, mut received_up) = tokio::sync::mpsc::channel::<u64>(2);
    let (first_tx, mut first_arrived) = tokio::sync::mpsc::channel::<()>(2);
    let up = backend(move |mut s| {
        let (tx, first_tx) = (tx.clone(), first_tx.clone());
        async move {
            let mut first = [0u8; 5];
            s.read_exact(&mut first).await.unwrap();
            first_tx.send(()).await.unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.unwrap();
            assert_eq!((&first[..], &rest[..]), (&b"last "[..], &b"request"[..]));
            let (local, peer) = (s.local_addr().unwrap(), s.peer_addr().unwrap());
            tx.send(segs_in(local, peer)).await.unwrap();
        }
    })
    .await;
    async fn send_up(to: SocketAddr, first_arrived: &mut tokio::sync::mpsc::Receiver<()>) {
        let mut c = TcpStream::connect(to).await.unwrap();
        c.write_all(b"last ").await.unwrap();
        first_arrived.recv().await.unwrap();
        send_last(&c, b"request");
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
    // Downward: the backend sends its last bytes and FIN at once; the client reports.
    let down = backend(|mut s| async move {
        send_last(&s, b"last response");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
    })
    .await;
    let receive_down = |from: SocketAddr| async move {
        let mut c = TcpStream::connect(from).await.unwrap();
        let (local, peer) = (c.local_addr().unwrap(), c.peer_addr().unwrap());
        let mut response = Vec::new();
        c.read_to_end(&mut response).await.unwrap();
        assert_eq!(response, b"last response");
        segs_in(local, peer)
    };

    send_up(up, &mut first_arrived).await;
    let direct_up = received_up.recv().await.unwrap();
    let direct_down = receive_down(down).await;
    let lb_up = Balancer::start(&config(&[up], "", ""));
    let lb_down = Balancer::start(&config(&[down], "", ""));
    send_up(lb_up.addr(), &mut first_arrived).await;
    let proxied_up = received_up.recv().await.unwrap();
    let proxied_down = receive_down(lb_down.addr()).await;
    assert_eq!(
        (proxied_up, proxied_down),
        (direct_up, direct_down),
        "segments received by (the backend, the client) through l4lb vs direct"
    );
    for lb in [&lb_up, &lb_down] {
        let line = lb.wait_for_log(|l| l.contains("connection closed"));
        assert_eq!(field(&line, "end").as_deref(), Some("closed"), "{line}");
    }
}

/// A backend that writes 8 MiB and closes, to a client with a small receive buffer: l4lb
/// has the FIN long before its client has taken the bytes before it, and must pass on
/// every byte first and the end after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_gets_every_byte_then_the_end() {
    const SIZE: usize = 8 * 1024 * 1024;
    let body = std::sync::Arc::new(random_bytes(7, SIZE));
    let sum = xxh3_64(&body);
    let b = backend(move |mut s| {
        let body = std::sync::Arc::clone(&body);
        async move {
            s.write_all(&body).await.unwrap();
            s.shutdown().await.unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.unwrap();
        }
    })
    .await;
    let lb = Balancer::start(&config(&[b], "relay: copy", ""));
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut c = socket.connect(lb.addr()).await.unwrap();
    let mut got = Vec::with_capacity(SIZE);
    let mut buf = [0u8; 4096];
    loop {
        let n = c.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!((got.len(), xxh3_64(&got)), (SIZE, sum));
    drop(c);
    let line = lb.wait_for_log(|l| l.contains("connection closed"));
    assert_eq!(field(&line, "end").as_deref(), Some("closed"), "{line}");
    assert_eq!(field(&line, "bytes_out"), Some(SIZE.to_string()), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_speaks_first() {
    let b = backend(|mut s| async move {
        s.write_all(b"* OK server greeting\r\n").await.unwrap();
        let mut cmd = [0u8; 6];
        s.read_exact(&mut cmd).await.unwrap();
        assert_eq!(&cmd, b"QUIT\r\n");
        s.write_all(b"BYE\r\n").await.unwrap();
    })
    .await;
    let lb = Balancer::start(&config(&[b], "", ""));
    let mut c = TcpStream::connect(lb.addr()).await.unwrap();
    let mut greeting = [0u8; 22];
    c.read_exact(&mut greeting).await.unwrap(); // nothing sent yet by the client
    assert_eq!(&greeting, b"* OK server greeting\r\n");
    c.write_all(b"QUIT\r\n").await.unwrap();
    let mut rest = String::new();
    c.read_to_string(&mut rest).await.unwrap();
    assert_eq!(rest, "BYE\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_closes_first() {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1);
    let b = backend(move |mut s| {
        let tx = tx.clone();
        async move {
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            tx.send(got).await.unwrap();
        }
    })
    .await;
    let lb = Balancer::start(&config(&[b], "", ""));
    let mut c = TcpStream::connect(lb.addr()).await.unwrap();
    c.write_all(b"fire and forget").await.unwrap();
    drop(c);
    assert_eq!(rx.recv().await.unwrap(), b"fire and forget");
    let line = lb.wait_for_log(|l| l.contains("connection closed"));
    assert_eq!(field(&line, "bytes_in").as_deref(), Some("15"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_reset_mid_stream_resets_the_client() {
    let b = backend(|s| async move {
        let mut s = s;
        s.write_all(&[7u8; 1000]).await.unwrap();
        let mut first = [0u8; 4];
        s.read_exact(&mut first).await.unwrap();
        // Abort: zero linger turns close into a RST.
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
    })
    .await;
    let lb = Balancer::start(&config(&[b], "", ""));
    let mut c = TcpStream::connect(lb.addr()).await.unwrap();
    let mut first = [0u8; 1000];
    c.read_exact(&mut first).await.unwrap();
    c.write_all(b"ping").await.unwrap();
    let mut rest = Vec::new();
    let err = c
        .read_to_end(&mut rest)
        .await
        .expect_err("a reset, not a clean end of stream");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    let line = lb.wait_for_log(|l| l.contains("connection closed"));
    assert_eq!(
        field(&line, "end").as_deref(),
        Some("backend_reset"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_resets_the_backend() {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::ErrorKind>(1);
    let b = backend(move |mut s| {
        let tx = tx.clone();
        async move {
            s.write_all(b"hi").await.unwrap();
            let mut rest = Vec::new();
            let kind = match s.read_to_end(&mut rest).await {
                Ok(_) => std::io::ErrorKind::UnexpectedEof,
                Err(e) => e.kind(),
            };
            tx.send(kind).await.unwrap();
        }
    })
    .await;
    let lb = Balancer::start(&config(&[b], "", ""));
    let mut c = TcpStream::connect(lb.addr()).await.unwrap();
    let mut hi = [0u8; 2];
    c.read_exact(&mut hi).await.unwrap();
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    assert_eq!(
        rx.recv().await.unwrap(),
        std::io::ErrorKind::ConnectionReset
    );
    let line = lb.wait_for_log(|l| l.contains("connection closed"));
    assert_eq!(
        field(&line, "end").as_deref(),
        Some("client_reset"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_backend_is_retried_on_the_next_one() {
    let a = named_backend("a").await;
    let c = named_backend("c").await;
    let dead = dead_addr();
    let lb = Balancer::start(&config(&[a, dead, c], "", ""));
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..200 {
        let name = fetch(lb.addr()).await.expect("every connection succeeds");
        *seen.entry(name).or_default() += 1;
    }
    assert_eq!(seen.values().sum::<usize>(), 200);
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        seen["a"] >= 60 && seen["c"] >= 60,
        "both live backends share: {seen:?}"
    );
    assert!(!lb
        .logs_matching(|l| l.contains("backend connect failed"))
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_alternate_over_backends() {
    let names = ["a", "b", "c"];
    let mut addrs = Vec::new();
    for n in names {
        addrs.push(named_backend(n).await);
    }
    let lb = Balancer::start(&config(&addrs, "", "workers: 1").replace("workers: 2\n", ""));
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(fetch(lb.addr()).await.unwrap());
    }
    assert_eq!(got, ["a", "b", "c", "a", "b", "c"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_backends_down_closes_the_client_at_once() {
    let lb = Balancer::start(&config(&[dead_addr(), dead_addr()], "", ""));
    let result = fetch(lb.addr()).await;
    assert!(matches!(result.as_deref(), Ok("") | Err(_)), "{result:?}");
    lb.wait_for_log(|l| l.contains("no backend reachable"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections_relay_and_leave_no_fd_behind() {
    raise_nofile();
    let b = echo_backend().await;
    let lb = Balancer::start(&config(&[b], "", ""));
    let (sockets_before, _) = lb.open_fds();
    let addr = lb.addr();
    // Open all 1000 first so they are truly concurrent, then talk on each.
    let mut conns = Vec::new();
    for _ in 0..1000 {
        conns.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut tasks = Vec::new();
    for (i, mut c) in conns.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let msg = random_bytes(i as u64 + 10, 4096);
            c.write_all(&msg).await.unwrap();
            c.shutdown().await.unwrap();
            let mut back = Vec::new();
            c.read_to_end(&mut back).await.unwrap();
            assert_eq!(xxh3_64(&back), xxh3_64(&msg));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    lb.wait_for_logs(1000, |l| l.contains("connection closed"));
    let closed_cleanly = lb.logs_matching(|l| {
        l.contains("connection closed") && field(l, "end").as_deref() == Some("closed")
    });
    assert_eq!(closed_cleanly.len(), 1000);
    let (sockets_after, pipes_after) = lb.open_fds();
    assert_eq!(
        sockets_after, sockets_before,
        "every relayed socket was closed"
    );
    // Pipes are pooled per worker (at most 256 each), never one per connection left over.
    assert!(pipes_after <= 2 * 2 * 256, "{pipes_after} pipe fds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_idle_timeout() {
    let b = echo_backend().await;
    let lb = Balancer::start(&config(&[b], "idle_timeout: 300ms", ""));
    let mut c = TcpStream::connect(lb.addr()).await.unwrap();
    c.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    c.read_exact(&mut one).await.unwrap();
    let mut rest = Vec::new();
    let started = std::time::Instant::now();
    let _ = c.read_to_end(&mut rest).await; // the balancer ends it
    assert!(started.elapsed() < Duration::from_secs(10));
    let line = lb.wait_for_log(|l| l.contains("connection closed"));
    assert_eq!(
        field(&line, "end").as_deref(),
        Some("idle_timeout"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_sources_are_refused_and_allowed_ones_pass() {
    let b = named_backend("ok").await;
    let lb = Balancer::start(&config(&[b], "allow: [127.0.0.0/8]\ndeny: [127.0.0.2]", ""));
    let from = |ip: &str| {
        let socket = TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::new(ip.parse().unwrap(), 0))
            .unwrap();
        socket
    };
    let mut denied = from("127.0.0.2").connect(lb.addr()).await.unwrap();
    let mut out = String::new();
    let _ = denied.read_to_string(&mut out).await;
    assert_eq!(out, "");
    let mut allowed = from("127.0.0.3").connect(lb.addr()).await.unwrap();
    allowed.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v1_tells_the_backend_the_client_address() {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(1);
    let b = backend(move |mut s| {
        let tx = tx.clone();
        async move {
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            tx.send(String::from_utf8(got).unwrap()).await.unwrap();
        }
    })
    .await;
    let lb = Balancer::start(&config(&[b], "proxy_protocol: v1", ""));
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.5:0".parse().unwrap()).unwrap();
    let mut c = socket.connect(lb.addr()).await.unwrap();
    let port = c.local_addr().unwrap().port();
    c.write_all(b"payload").await.unwrap();
    c.shutdown().await.unwrap();
    let got = rx.recv().await.unwrap();
    assert_eq!(
        got,
        format!(
            "PROXY TCP4 127.0.0.5 127.0.0.1 {port} {}\r\npayload",
            lb.addr().port()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_and_drains_live_connections() {
    let b = echo_backend().await;
    let mut lb = Balancer::start(&config(&[b], "", ""));
    let mut live = TcpStream::connect(lb.addr()).await.unwrap();
    live.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    live.read_exact(&mut buf).await.unwrap();
    lb.terminate();
    lb.wait_for_log(|l| l.contains("stopping"));
    // The live connection keeps working during the drain.
    live.write_all(b"during").await.unwrap();
    live.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"during");
    live.shutdown().await.unwrap();
    let mut rest = Vec::new();
    live.read_to_end(&mut rest).await.unwrap();
    let status = lb.wait_exit();
    assert!(status.success(), "{status:?}");
    // Nothing listens any more.
    assert!(TcpStream::connect(lb.addr()).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_bounds_the_wait_on_a_black_holed_backend() {
    let (_hole, _filler, hole) = black_hole();
    let live = named_backend("live").await;
    let cfg =
        config(&[hole, live], "connect_timeout: 400ms", "").replace("workers: 2\n", "workers: 1\n");
    let lb = Balancer::start(&cfg);
    let started = std::time::Instant::now();
    let got = fetch(lb.addr()).await.unwrap();
    let waited = started.elapsed();
    assert_eq!(got, "live");
    assert!(
        waited >= Duration::from_millis(400),
        "the black hole was tried first: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(3),
        "one connect_timeout, not the kernel's SYN retries: {waited:?}"
    );
    let line = lb.wait_for_log(|l| l.contains("backend connect failed"));
    assert!(line.contains("connect timeout"), "{line}");
}
