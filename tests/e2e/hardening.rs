//! Hardening through the real binary: signals keep their word, panics are never silent,
//! timeouts never fake a clean end, a stuck log reader cannot slow relaying, UDP flows are
//! bounded by `max_flows` and descriptors rather than one local port range, and the
//! largest values `--check` accepts start and serve.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::harness::*;
use crate::netns::Netns;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_within_a_second_whatever_is_open() {
    let echo = echo_backend().await;
    let mut lb = Balancer::start(
        &config(&[echo], "", "").replace("drain_timeout: 5s", "drain_timeout: 60s"),
    );
    let mut live = TcpStream::connect(lb.addr()).await.unwrap();
    live.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    live.read_exact(&mut buf).await.unwrap();
    lb.terminate();
    lb.wait_for_log(|l| l.contains("stopping"));
    let second = Instant::now();
    lb.terminate();
    let status = lb
        .exit_within(Duration::from_secs(1))
        .expect("exited within a second of the second SIGTERM");
    assert!(second.elapsed() < Duration::from_secs(1));
    assert!(status.code().is_some(), "{status:?}");
    drop(live);
}

async fn a_panic_stops_l4lb_non_zero(place: &str, udp: bool) {
    let echo = echo_backend().await;
    let text = if udp {
        format!("workers: 1\nlisteners:\n  - {{ name: u, bind: \"127.0.0.1:0\", protocol: udp, pool: p }}\npools:\n  - name: p\n    backends: [{{ address: \"{echo}\" }}]\n")
    } else {
        config(&[echo], "", "")
    };
    let mut lb = Balancer::start_with(
        &text,
        Launch {
            env: vec![("L4LB_INJECT_PANIC", place.to_string())],
            ..Launch::default()
        },
    );
    if udp {
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(b"x", lb.addr()).await.unwrap();
    } else {
        let _ = TcpStream::connect(lb.addr()).await;
    }
    let panic = lb.wait_for_log(|l| l.contains("panic") && l.contains("L4LB_INJECT_PANIC"));
    assert!(panic.contains("l4lb-worker-"), "names the thread: {panic}");
    let status = lb.exit_within(PATIENCE).expect("l4lb stopped");
    assert_eq!(
        status.code(),
        Some(1),
        "non-zero, for the supervisor: {status:?}"
    );
    assert!(!lb
        .logs_matching(|l| l.contains("a listener loop panicked"))
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_accept_loop_is_reported_and_exits_non_zero() {
    a_panic_stops_l4lb_non_zero("tcp_accept", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_udp_loop_is_reported_and_exits_non_zero() {
    a_panic_stops_l4lb_non_zero("udp_receive", true).await;
}

/// A backend that sends `len` bytes and then waits for the client to close.
async fn flooding_backend(len: usize) -> SocketAddr {
    backend(move |mut s| async move {
        let data = random_bytes(7, len);
        let _ = s.write_all(&data).await;
        let mut sink = [0u8; 64];
        while let Ok(n) = s.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
}

/// Reads until the stream ends; the bytes read and whether it ended cleanly (EOF).
async fn read_to_end(s: &mut TcpStream) -> (usize, std::io::Result<()>) {
    let mut total = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return (total, Ok(())),
            Ok(n) => total += n,
            Err(e) => return (total, Err(e)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_timeout_with_a_stuck_reader_resets_instead_of_closing() {
    const SENT: usize = 32 << 20;
    let flood = flooding_backend(SENT).await;
    let lb = Balancer::start(&config(&[flood], "idle_timeout: 300ms", ""));
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut client = socket.connect(lb.addr()).await.unwrap();
    // Read nothing until l4lb gives up on the connection.
    let closed = lb.wait_for_log(|l| l.contains("connection closed"));
    assert_eq!(
        field(&closed, "end").as_deref(),
        Some("idle_timeout"),
        "{closed}"
    );
    let (got, end) = read_to_end(&mut client).await;
    assert!(got < SENT, "the stream was cut: {got} of {SENT}");
    let error = end.expect_err("a cut stream must not end with a clean FIN");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_timeout_with_bytes_in_flight_resets_the_client() {
    const SENT: usize = 32 << 20;
    let flood = flooding_backend(SENT).await;
    let mut lb = Balancer::start(
        &config(&[flood], "", "").replace("drain_timeout: 5s", "drain_timeout: 300ms"),
    );
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut client = socket.connect(lb.addr()).await.unwrap();
    let mut first = [0u8; 1024];
    client.read_exact(&mut first).await.unwrap();
    lb.terminate();
    lb.wait_for_log(|l| l.contains("drain timeout"));
    lb.exit_within(PATIENCE)
        .expect("stopped after the drain timeout");
    let (got, end) = read_to_end(&mut client).await;
    assert!(got < SENT);
    let error = end.expect_err("a cut stream must not end with a clean FIN");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_log_pipe_does_not_slow_relaying() {
    const CONNECTIONS: usize = 1000;
    const EACH: usize = 100 * 1024; // 100 MiB in all
    let source = flooding_backend(EACH).await;
    let lb = Balancer::start_with(
        &config(&[source], "", ""),
        Launch {
            stop_reading_logs: true,
            ..Launch::default()
        },
    );
    let addr = lb.addr();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for lane in 0..4 {
        tasks.push(tokio::spawn(async move {
            let mut bytes = 0;
            for _ in (lane..CONNECTIONS).step_by(4) {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let mut buf = vec![0u8; EACH];
                s.read_exact(&mut buf).await.unwrap();
                bytes += buf.len();
            }
            bytes
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += tokio::time::timeout(PATIENCE, t)
            .await
            .expect("relaying stalled behind the log pipe")
            .unwrap();
    }
    assert_eq!(total, CONNECTIONS * EACH);
    eprintln!(
        "100 MiB over {CONNECTIONS} connections with stderr unread: {:?}",
        started.elapsed()
    );
}

/// A log writer stuck behind a full stderr pipe does not keep l4lb from exiting: on
/// SIGTERM it drains (nothing is live), waits a second for the writers and leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_log_writer_does_not_keep_l4lb_from_exiting() {
    let named = named_backend("n").await;
    let mut lb = Balancer::start_with(
        &config(&[named], "", "").replace("drain_timeout: 5s", "drain_timeout: 300ms"),
        Launch {
            stop_reading_logs: true,
            ..Launch::default()
        },
    );
    // 2,000 access lines of ~250 bytes: far more than a 64 KiB pipe holds, so the writer
    // ends up blocked in `write` with lines still queued.
    for _ in 0..2000 {
        assert_eq!(fetch(lb.addr()).await.unwrap(), "n");
    }
    let deadline = Instant::now() + PATIENCE;
    while !log_writer_blocked_on_stderr(lb.pid()) {
        assert!(
            Instant::now() < deadline,
            "the log writer never blocked on stderr"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    lb.terminate();
    let status = lb
        .process_exit_within(Duration::from_secs(10))
        .await
        .expect("l4lb still running 10 s after SIGTERM with its log writer stuck");
    assert!(status.success(), "{status:?}");
}

/// Whether l4lb's log writer thread sits in `write(2, ...)`: the kernel's record of the
/// thread's current system call (number 1 on x86_64, first argument fd 2).
fn log_writer_blocked_on_stderr(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|task| {
        let read = |file: &str| std::fs::read_to_string(task.path().join(file)).unwrap_or_default();
        read("comm").trim() == "l4lb-log" && read("syscall").starts_with("1 0x2 ")
    })
}

/// An echo that prefixes its name, on a fixed address (inside a namespace).
async fn named_udp_echo(addr: SocketAddr, name: u8) {
    let socket = UdpSocket::bind(addr).await.unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let mut reply = vec![name];
            reply.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&reply, from).await;
        }
    });
}

/// `clients` flows from fixed ports (outside the narrowed range) to `lb`, one request
/// each, retried a few times: how many got their reply.
async fn flows_answered(lb: SocketAddr, clients: u16) -> usize {
    let mut sockets = Vec::new();
    for i in 0..clients {
        sockets.push(UdpSocket::bind(("127.0.0.1", 20000 + i)).await.unwrap());
    }
    let mut answered = 0;
    let mut buf = [0u8; 64];
    for s in &sockets {
        for _ in 0..3 {
            s.send_to(b"hi", lb).await.unwrap();
            if let Ok(Ok((n, _))) =
                tokio::time::timeout(Duration::from_millis(500), s.recv_from(&mut buf)).await
            {
                assert_eq!(&buf[1..n], b"hi");
                answered += 1;
                break;
            }
        }
    }
    answered
}

fn narrow_port_range(ns: &Netns) {
    assert!(ns.exec(&[
        "sysctl",
        "-q",
        "-w",
        "net.ipv4.ip_local_port_range=40000 40199"
    ]));
}

#[test]
fn udp_flows_share_local_ports_past_a_narrow_port_range() {
    let Some(ns) = Netns::create() else { return };
    narrow_port_range(&ns);
    let backends: Vec<SocketAddr> = (0..3)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], 9000 + i)))
        .collect();
    let text = format!(
        "workers: 1\nlisteners:\n  - {{ name: u, bind: \"127.0.0.1:5300\", protocol: udp, pool: p }}\npools:\n  - name: p\n    backends:\n{}",
        backends
            .iter()
            .map(|b| format!("      - {{ address: \"{b}\" }}\n"))
            .collect::<String>()
    );
    let prefix = ns.prefix();
    let answered = ns.run(move || {
        Box::pin(async move {
            for (i, b) in backends.iter().enumerate() {
                named_udp_echo(*b, b'a' + i as u8).await;
            }
            let _lb = Balancer::start_with(
                &text,
                Launch {
                    prefix,
                    ..Launch::default()
                },
            );
            flows_answered("127.0.0.1:5300".parse().unwrap(), 500).await
        })
    });
    assert_eq!(
        answered, 500,
        "500 flows over 3 backends with 200 local ports"
    );
}

#[test]
fn two_sources_double_the_ports_for_one_backend() {
    let Some(ns) = Netns::create() else { return };
    narrow_port_range(&ns);
    let text = "workers: 1\nlisteners:\n  - { name: u, bind: \"127.0.0.1:5300\", protocol: udp, pool: p }\npools:\n  - name: p\n    source: [127.0.0.2, 127.0.0.3]\n    backends: [ { address: \"127.0.0.1:9000\" } ]\n";
    let prefix = ns.prefix();
    let answered = ns.run(move || {
        Box::pin(async move {
            named_udp_echo("127.0.0.1:9000".parse().unwrap(), b'a').await;
            let _lb = Balancer::start_with(
                text,
                Launch {
                    prefix,
                    ..Launch::default()
                },
            );
            flows_answered("127.0.0.1:5300".parse().unwrap(), 300).await
        })
    });
    assert_eq!(
        answered, 300,
        "300 flows to one backend from two sources of 200 ports"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_new_flow_is_served_on_its_first_datagram() {
    let echo_addr = udp_echo().await;
    let text = format!("workers: 1\nlisteners:\n  - {{ name: u, bind: \"127.0.0.1:0\", protocol: udp, pool: p }}\npools:\n  - name: p\n    backends: [{{ address: \"{echo_addr}\" }}]\n");
    let lb = Balancer::start_with(
        &text,
        Launch {
            prefix: vec!["prlimit".into(), "--nofile=48:48".into()],
            ..Launch::default()
        },
    );
    let mut buf = [0u8; 64];
    let mut clients = Vec::new();
    for i in 0..100u32 {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let msg = i.to_be_bytes();
        s.send_to(&msg, lb.addr()).await.unwrap();
        let (n, _) = tokio::time::timeout(Duration::from_secs(2), s.recv_from(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("flow {i}: its first datagram got no reply"))
            .unwrap();
        assert_eq!(&buf[..n], &msg);
        clients.push(s);
    }
    // The descriptor limit was reached: a flow was evicted for the new one (its end event
    // is waited for, and the test fails without it; the log writer batches lines).
    lb.wait_for_log(|l| l.contains("flow closed") && field(l, "end").as_deref() == Some("evicted"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_values_check_accepts_start_and_serve() {
    let live = named_backend("live").await;
    let text = format!(
        "workers: 256\ndrain_timeout: 1day\nmax_pipes: 1000000\ndefaults: {{ connect_timeout: 5m, idle_timeout: 7days, retries: 16 }}\nlisteners:\n  - {{ name: test, bind: \"127.0.0.1:0\", pool: p, max_connections: 10000000 }}\n  - {{ name: u, bind: \"127.0.0.1:0\", protocol: udp, pool: p, max_flows: 4000000, idle_timeout: 7days }}\npools:\n  - name: p\n    algorithm: maglev\n    table_size: 1000003\n    health: {{ interval: 1h, timeout: 1m, rise: 100, fall: 100 }}\n    passive: {{ failures: 1000, max_ejection_percent: 100, ejection_time: 1h, max_ejection_time: 1h }}\n    backends: [{{ address: \"{live}\", weight: 256 }}]\n"
    );
    let lb = Balancer::start(&text);
    assert_eq!(fetch(lb.addr()).await.unwrap(), "live");
}
