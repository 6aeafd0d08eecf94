//! In front of TLS services and L7 proxies, with real peers: nginx TLS backends and curl
//! through an SNI listener, PostgreSQL clusters with TLS and psql through `sni_postgres`,
//! HAProxy (send-proxy-v2) -> l4lb (accept_proxy) -> nginx (proxy_protocol), and PROXY v2
//! over UDP both ways. The three deployments run from their examples in `config/`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, UdpSocket};

use crate::harness::*;

/// The example `config/<name>` with its addresses replaced (each must occur).
pub fn example(name: &str, replace: &[(&str, String)]) -> String {
    let path = format!("{}/../../config/{name}", env!("CARGO_MANIFEST_DIR"));
    let mut text = std::fs::read_to_string(&path).unwrap();
    for (from, to) in replace {
        assert!(text.contains(from), "{name} has no {from}");
        text = text.replace(from, to);
    }
    text
}

pub fn run(command: &mut Command) -> String {
    let out = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A test certificate authority and the server certificates it signs, made by openssl.
pub struct Pki {
    dir: tempfile::TempDir,
}

const OPENSSL_CONF: &str = "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = l4lb test\n\
[ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\n\
[leaf]\nbasicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\nextendedKeyUsage = serverAuth\nsubjectAltName = $ENV::SAN\n";

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("openssl.cnf"), OPENSSL_CONF).unwrap();
        let pki = Pki { dir };
        run(pki
            .openssl()
            .args(["req", "-x509", "-extensions", "ca", "-days", "2", "-nodes"])
            .args(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
            .args([
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-subj",
                "/CN=l4lb test CA",
            ]));
        pki
    }

    fn openssl(&self) -> Command {
        let mut c = Command::new("openssl");
        c.current_dir(self.dir.path())
            .env("OPENSSL_CONF", self.dir.path().join("openssl.cnf"))
            .env("SAN", "DNS:unused.test");
        c
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A certificate for `name` with subject alternative names `san` (`DNS:a.test`):
    /// (certificate, key).
    fn issue(&self, name: &str, san: &str) -> (PathBuf, PathBuf) {
        let (key, csr, cert) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        run(self
            .openssl()
            .args(["req", "-new", "-nodes", "-subj", &format!("/CN={name}")])
            .args(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
            .args(["-keyout", &key, "-out", &csr]));
        run(self
            .openssl()
            .env("SAN", san)
            .args(["x509", "-req", "-days", "2", "-in", &csr])
            .args(["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"])
            .args([
                "-extfile",
                "openssl.cnf",
                "-extensions",
                "leaf",
                "-out",
                &cert,
            ]));
        (self.dir.path().join(cert), self.dir.path().join(key))
    }
}

fn curl(ca: &Path, url: &str, resolve: Option<String>) -> String {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "20", "--cacert"]).arg(ca);
    if let Some(resolve) = resolve {
        c.arg("--resolve").arg(resolve);
    }
    run(c.arg(url))
}

#[test]
fn tls_passthrough_by_sni_reaches_each_nginx_with_its_own_certificate() {
    let pki = Pki::new();
    let sites = [
        ("site-a", "DNS:a.test"),
        ("site-b", "DNS:b.test"),
        ("wildcard", "DNS:*.wild.test,DNS:*.x.wild.test"),
        ("default", "IP:127.0.0.1"),
    ];
    let mut servers = String::new();
    let mut ports = Vec::new();
    for (i, (name, san)) in sites.iter().enumerate() {
        let (cert, key) = pki.issue(name, san);
        let port = peer_port(i as u16 + 1);
        ports.push(port);
        servers.push_str(&format!(
            "  server {{\n    listen 127.0.0.1:{port} ssl;\n    ssl_certificate {};\n    ssl_certificate_key {};\n    location / {{ return 200 \"{name}\\n\"; }}\n  }}\n",
            cert.display(),
            key.display()
        ));
    }
    let _nginx = start_nginx(&servers);
    for port in &ports {
        wait_accepting(([127, 0, 0, 1], *port).into(), "nginx");
    }
    let config = example(
        "tls-sni.yaml",
        &[
            ("127.0.0.1:8443", "127.0.0.1:0".into()),
            ("127.0.0.1:9441", format!("127.0.0.1:{}", ports[0])),
            ("127.0.0.1:9442", format!("127.0.0.1:{}", ports[1])),
            ("127.0.0.1:9443", format!("127.0.0.1:{}", ports[2])),
            ("127.0.0.1:9444", format!("127.0.0.1:{}", ports[3])),
        ],
    );
    let lb = Balancer::start(&config);
    let port = lb.addr().port();
    let via = |host: &str| {
        curl(
            &pki.ca(),
            &format!("https://{host}:{port}/"),
            Some(format!("{host}:{port}:127.0.0.1")),
        )
    };
    // curl verifies each certificate against the name: reaching the wrong nginx fails.
    assert_eq!(via("a.test"), "site-a");
    assert_eq!(via("b.test"), "site-b");
    assert_eq!(via("x.wild.test"), "wildcard");
    assert_eq!(via("deep.x.wild.test"), "wildcard");
    // An IP address in the URL: curl sends no SNI, the listener's pool answers.
    assert_eq!(
        curl(&pki.ca(), &format!("https://127.0.0.1:{port}/"), None),
        "default"
    );
    lb.wait_for_log(|l| {
        l.contains("connection closed")
            && field(l, "sni").as_deref() == Some("a.test")
            && field(l, "pool").as_deref() == Some("site_a")
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hello_written_in_small_pieces_routes_and_arrives_unaltered() {
    let hello = std::fs::read(format!(
        "{}/../l4-core/tests/fixtures/client_hello_pq_grease.bin",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    // Each backend reads the ClientHello and says whether it got it byte for byte.
    let checking = |name: &'static str, expected: Vec<u8>| {
        backend(move |mut s| {
            let expected = expected.clone();
            async move {
                let mut got = vec![0u8; expected.len()];
                let verdict = match s.read_exact(&mut got).await {
                    Ok(_) if got == expected => "intact",
                    _ => "altered",
                };
                let _ = s.write_all(format!("{name} {verdict}").as_bytes()).await;
                let _ = s.shutdown().await;
            }
        })
    };
    let pq = checking("pq", hello.clone()).await;
    let other = checking("default", hello.clone()).await;
    let lb = Balancer::start(&format!(
        "workers: 2\nlisteners:\n  - name: tls\n    bind: 127.0.0.1:0\n    pool: other\n    sni:\n      - {{ match: pq.test, pool: pq }}\npools:\n  - name: pq\n    backends: [ {{ address: \"{pq}\" }} ]\n  - name: other\n    backends: [ {{ address: \"{other}\" }} ]\n"
    ));
    for piece in [1, 7, 100, 700] {
        let mut s = tokio::net::TcpStream::connect(lb.addr()).await.unwrap();
        s.set_nodelay(true).unwrap();
        for chunk in hello.chunks(piece).take(40) {
            s.write_all(chunk).await.unwrap();
            // Paced, so l4lb sees the hello arrive over many segments and peeks.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let sent = (piece * 40).min(hello.len());
        s.write_all(&hello[sent..]).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(PATIENCE, s.read_to_string(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer, "pq intact", "pieces of {piece} bytes");
    }
}

pub fn postgres_program(name: &str) -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path().join("bin").join(name))
                .filter(|p| p.exists())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
        .pop()
        .unwrap_or_else(|| panic!("postgresql is not installed: scripts/test.sh installs it"))
}

/// Runs a PostgreSQL program as the `postgres` user when the tests run as root (the
/// server refuses to run as root).
fn as_postgres(program: &Path) -> Command {
    if nix::unistd::geteuid().is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A PostgreSQL cluster named `name` on `port` with TLS on, its certificate from `pki`.
pub fn start_postgres(pki: &Pki, name: &str, port: u16) -> Peer {
    start_postgres_at(pki, name, "127.0.0.1", port)
}

/// [`start_postgres`] listening on `ip`.
pub fn start_postgres_at(pki: &Pki, name: &str, ip: &str, port: u16) -> Peer {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = pki.issue(name, &format!("DNS:{name}.test"));
    let data = dir.path().join("data");
    for (from, to) in [(&cert, "server.crt"), (&key, "server.key")] {
        std::fs::copy(from, dir.path().join(to)).unwrap();
    }
    if nix::unistd::geteuid().is_root() {
        run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path()));
    }
    run(Command::new("chmod")
        .arg("0600")
        .arg(dir.path().join("server.key")));
    run(as_postgres(&postgres_program("initdb"))
        .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
        .arg(&data)
        .stdout(Stdio::null()));
    let mut command = as_postgres(&postgres_program("postgres"));
    command
        .arg("-D")
        .arg(&data)
        .args(["-p", &port.to_string(), "-k"])
        .arg(dir.path())
        .args([
            "-c",
            &format!("listen_addresses={ip}"),
            "-c",
            "ssl=on",
            "-c",
            "fsync=off",
        ])
        .args(["-c", &format!("cluster_name={name}")])
        .arg("-c")
        .arg(format!(
            "ssl_cert_file={}",
            dir.path().join("server.crt").display()
        ))
        .arg("-c")
        .arg(format!(
            "ssl_key_file={}",
            dir.path().join("server.key").display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut peer = Peer::spawn(&mut command, dir);
    // Ready when it says so (accepting TCP comes earlier, while it still refuses queries).
    let stderr = peer.child().stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("ready to accept connections") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(PATIENCE)
        .unwrap_or_else(|_| panic!("postgres {name} did not become ready"));
    peer
}

pub fn psql(conninfo: &str, sql: &str) -> String {
    run(Command::new(postgres_program("psql"))
        .env("PGCONNECT_TIMEOUT", "20")
        .args([conninfo, "-Atc", sql]))
}

#[test]
fn postgres_clusters_by_sni_with_psql_verify_full() {
    let pki = Pki::new();
    let ports = [peer_port(11), peer_port(12)];
    let _db1 = start_postgres(&pki, "db1", ports[0]);
    let _db2 = start_postgres(&pki, "db2", ports[1]);
    let config = example(
        "postgres-sni.yaml",
        &[
            ("127.0.0.1:6543", "127.0.0.1:0".into()),
            ("127.0.0.1:5441", format!("127.0.0.1:{}", ports[0])),
            ("127.0.0.1:5442", format!("127.0.0.1:{}", ports[1])),
        ],
    );
    let lb = Balancer::start(&config);
    let port = lb.addr().port();
    let ca = pki.ca().display().to_string();
    for name in ["db1", "db2"] {
        // verify-full checks the certificate against host: the right cluster answered.
        let conninfo = format!(
            "host={name}.test hostaddr=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=verify-full sslrootcert={ca}"
        );
        assert_eq!(
            psql(&conninfo, "select current_setting('cluster_name') || ' ' || ssl from pg_stat_ssl where pid = pg_backend_pid()"),
            format!("{name} true")
        );
    }
    // Without TLS, nothing to route by: the listener's pool, relayed untouched.
    let plain = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable");
    assert_eq!(psql(&plain, "show cluster_name"), "db1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_to_l4lb_to_nginx_keeps_the_real_client_through_both_hops() {
    let (_nginx, nginx_addr) = crate::peers::nginx_with_proxy_protocol();
    let config = example(
        "l7-behind-balancer.yaml",
        &[
            ("127.0.0.1:8080", "127.0.0.1:0".into()),
            ("127.0.0.1:9080", nginx_addr.to_string()),
            ("workers: 2", "workers: 2\nadmin: 127.0.0.1:0".into()),
        ],
    );
    let lb = Balancer::start(&config);
    let dir = tempfile::tempdir().unwrap();
    let edge_port = peer_port(21);
    let cfg = format!(
        "global\n  maxconn 200\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend edge\n  bind 127.0.0.1:{edge_port}\n  default_backend tier\n\
         backend tier\n  server l4lb {} send-proxy-v2 source 127.0.0.3\n",
        lb.addr()
    );
    std::fs::write(dir.path().join("haproxy.cfg"), cfg).unwrap();
    let haproxy = program(&["/usr/sbin/haproxy", "/usr/bin/haproxy"], "haproxy");
    let mut command = Command::new(haproxy);
    command
        .arg("-db")
        .arg("-f")
        .arg(dir.path().join("haproxy.cfg"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _haproxy = Peer::spawn(&mut command, dir);
    let edge: SocketAddr = ([127, 0, 0, 1], edge_port).into();
    wait_accepting(edge, "haproxy");
    let (body, port) = crate::peers::ask_through(edge, "127.0.0.5").await;
    assert_eq!(body, format!("127.0.0.5 {port}"));
    // l4lb logs the client the header named, not HAProxy's address.
    let line = lb.wait_for_log(|l| {
        l.contains("connection closed") && l.contains(&format!("source=127.0.0.5:{port}"))
    });
    assert!(line.contains("client=127.0.0.3:"), "{line}");
    // Straight to l4lb from an address outside accept_proxy.from: refused, no byte back.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.7:0".parse().unwrap()).unwrap();
    let mut direct = socket.connect(lb.addr()).await.unwrap();
    let _ = direct.write_all(b"GET / HTTP/1.0\r\n\r\n").await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, direct.read_to_end(&mut got)).await;
    assert!(got.is_empty(), "an untrusted peer got {got:?}");
    let (_, metrics) = http(lb.admin(), "GET", "/metrics", "", None).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("l4lb_listener_rejected_total{")
                && l.contains("reason=\"untrusted\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );
}

/// A UDP backend that records every datagram and answers each with `ack`.
async fn recording_udp_backend() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = tx.send(buf[..n].to_vec());
            let _ = socket.send_to(b"ack", from).await;
        }
    });
    (addr, rx)
}

/// Splits a PROXY v2 datagram as the spec lays it out (written here independently of
/// l4lb's decoder): (source, destination, payload) for an IPv4 DGRAM header.
fn parse_v2_dgram(datagram: &[u8]) -> Option<(SocketAddr, SocketAddr, Vec<u8>)> {
    if datagram.len() < 28 || datagram[..12] != *b"\r\n\r\n\0\r\nQUIT\n" {
        return None;
    }
    assert_eq!(datagram[12], 0x21, "version 2, PROXY");
    assert_eq!(datagram[13], 0x12, "IPv4, DGRAM");
    assert_eq!(u16::from_be_bytes([datagram[14], datagram[15]]), 12);
    let ip = |o: usize| {
        IpAddr::from([
            datagram[o],
            datagram[o + 1],
            datagram[o + 2],
            datagram[o + 3],
        ])
    };
    let port = |o: usize| u16::from_be_bytes([datagram[o], datagram[o + 1]]);
    Some((
        SocketAddr::new(ip(16), port(24)),
        SocketAddr::new(ip(20), port(26)),
        datagram[28..].to_vec(),
    ))
}

async fn next_datagram(received: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) -> Vec<u8> {
    tokio::time::timeout(PATIENCE, received.recv())
        .await
        .expect("a datagram at the backend")
        .unwrap()
}

async fn ask_udp(socket: &UdpSocket, to: SocketAddr, payload: &[u8]) {
    socket.send_to(payload, to).await.unwrap();
    let mut buf = [0u8; 16];
    let (n, from) = tokio::time::timeout(PATIENCE, socket.recv_from(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    assert_eq!((&buf[..n], from), (&b"ack"[..], to));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_backends_learn_the_client_from_proxy_v2_on_the_first_or_every_datagram() {
    for mode in ["first", "every"] {
        let (backend, mut received) = recording_udp_backend().await;
        let lb = Balancer::start(&format!(
            "workers: 2\nlisteners:\n  - {{ name: dns, bind: \"127.0.0.1:0\", protocol: udp, pool: u, proxy_protocol: v2, proxy_protocol_udp: {mode} }}\npools:\n  - name: u\n    backends: [ {{ address: \"{backend}\" }} ]\n"
        ));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let me = client.local_addr().unwrap();
        for payload in [&b"one"[..], b"two", b"three"] {
            ask_udp(&client, lb.addr(), payload).await;
        }
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(next_datagram(&mut received).await);
        }
        for (i, (datagram, payload)) in got.iter().zip([&b"one"[..], b"two", b"three"]).enumerate()
        {
            match parse_v2_dgram(datagram) {
                Some((source, destination, rest)) => {
                    assert!(mode == "every" || i == 0, "{mode}: header on datagram {i}");
                    assert_eq!((source, destination), (me, lb.addr()));
                    assert_eq!(rest, payload);
                }
                None => {
                    assert!(
                        mode == "first" && i > 0,
                        "{mode}: no header on datagram {i}"
                    );
                    assert_eq!(datagram, payload);
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_accept_proxy_takes_the_client_from_each_datagram_of_a_trusted_upstream() {
    let (backend, mut received) = recording_udp_backend().await;
    let lb = Balancer::start(&format!(
        "workers: 1\nadmin: 127.0.0.1:0\nlisteners:\n  - {{ name: dns, bind: \"127.0.0.1:0\", protocol: udp, pool: u, accept_proxy: {{ from: [127.0.0.1/32] }}, proxy_protocol: v2, proxy_protocol_udp: every }}\npools:\n  - name: u\n    backends: [ {{ address: \"{backend}\" }} ]\n"
    ));
    let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // Two clients behind the upstream, each named by its own header.
    for (client, payload) in [
        ("192.0.2.10:5000", &b"q1"[..]),
        ("198.51.100.7:53000", b"q2"),
    ] {
        let client: SocketAddr = client.parse().unwrap();
        let mut datagram = b"\r\n\r\n\0\r\nQUIT\n\x21\x12\x00\x0c".to_vec();
        let IpAddr::V4(ip) = client.ip() else {
            unreachable!()
        };
        datagram.extend_from_slice(&ip.octets());
        datagram.extend_from_slice(&[203, 0, 113, 1]);
        datagram.extend_from_slice(&client.port().to_be_bytes());
        datagram.extend_from_slice(&53u16.to_be_bytes());
        datagram.extend_from_slice(payload);
        // The answer comes back to the upstream that sent it.
        ask_udp(&upstream, lb.addr(), &datagram).await;
        let forwarded = next_datagram(&mut received).await;
        let (source, destination, rest) = parse_v2_dgram(&forwarded).expect("a header onward");
        assert_eq!(source, client);
        assert_eq!(destination, "203.0.113.1:53".parse().unwrap());
        assert_eq!(rest, payload);
    }
    // Without a header from a trusted sender, and from an untrusted sender: dropped.
    upstream.send_to(b"no header", lb.addr()).await.unwrap();
    let stranger = UdpSocket::bind("127.0.0.9:0").await.unwrap();
    stranger
        .send_to(
            b"\r\n\r\n\0\r\nQUIT\n\x21\x12\x00\x0c000000000000x",
            lb.addr(),
        )
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let (_, metrics) = http(lb.admin(), "GET", "/metrics", "", None).await;
        let dropped = |reason: &str| {
            metrics.lines().any(|l| {
                l.starts_with("l4lb_udp_dropped_total{")
                    && l.contains(&format!("reason=\"{reason}\""))
                    && l.ends_with(" 1")
            })
        };
        if dropped("proxy_header") && dropped("untrusted") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        received.try_recv().is_err(),
        "a dropped datagram reached the backend"
    );
}
