//! Checks that speak the protocol: send bytes (TCP or a datagram), and judge the reply.
//! A TCP connect proves only that a kernel accepts; a Redis replica, a PostgreSQL standby,
//! a hung application and a resolver that never answers all pass it.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use regex::bytes::Regex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{timeout_at, Instant};

use crate::probe::{tcp_connect, udp_port, ProbeError};

/// The most reply bytes a check reads before judging (a Redis `INFO replication` is
/// well under 1 KiB; an HTTP status line under 100 bytes).
const MAX_REPLY: usize = 16 * 1024;

/// What a probe does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Open and close a TCP connection.
    TcpConnect,
    /// Send an empty datagram; fail on ICMP port unreachable.
    UdpPort,
    /// Connect, send `send` (may be empty: a server that speaks first), judge the reply.
    Tcp {
        /// Bytes written after connecting.
        send: Vec<u8>,
        /// What the reply must be.
        expect: Expect,
    },
    /// Send one datagram and judge the datagrams that come back.
    Udp {
        /// The datagram.
        send: Vec<u8>,
        /// What a reply must be.
        expect: Expect,
    },
    /// Send a DNS query for `name` (type A, a fresh id each time); pass on a well-formed
    /// reply to it that says NOERROR or NXDOMAIN (the resolver answers), fail on
    /// SERVFAIL, REFUSED or silence.
    Dns {
        /// The name asked for.
        name: String,
    },
}

/// What a reply must be.
#[derive(Debug, Clone)]
pub enum Expect {
    /// Any byte at all.
    Anything,
    /// Contains these bytes.
    Contains(Vec<u8>),
    /// Matches this regular expression (bytes; `(?-u)` for raw bytes).
    Regex(Regex),
    /// Starts with one of these bytes.
    FirstByte(Vec<u8>),
    /// An HTTP status line with a code in one of these ranges.
    HttpStatus(Vec<(u16, u16)>),
}

impl PartialEq for Expect {
    /// Two expectations are the same if they are written the same (a reload compares
    /// pool configs to know whether their checks must restart).
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Expect::Anything, Expect::Anything) => true,
            (Expect::Contains(a), Expect::Contains(b)) => a == b,
            (Expect::Regex(a), Expect::Regex(b)) => a.as_str() == b.as_str(),
            (Expect::FirstByte(a), Expect::FirstByte(b)) => a == b,
            (Expect::HttpStatus(a), Expect::HttpStatus(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Expect {}

/// How a reply so far is judged.
#[derive(Debug, PartialEq, Eq)]
enum Judged {
    Pass,
    Fail(String),
    /// Not decided yet: read more (at the end of input, this fails).
    More,
}

impl Expect {
    fn judge(&self, reply: &[u8]) -> Judged {
        match self {
            Expect::Anything if reply.is_empty() => Judged::More,
            Expect::Anything => Judged::Pass,
            Expect::Contains(needle) => {
                // Only the newest bytes can complete a match: look at the tail they could
                // touch (bounded work per read).
                let from = reply.len().saturating_sub(needle.len() + 4096);
                if reply[from..]
                    .windows(needle.len().max(1))
                    .any(|w| w == needle.as_slice())
                {
                    Judged::Pass
                } else {
                    Judged::More
                }
            }
            Expect::Regex(re) => {
                if re.is_match(reply) {
                    Judged::Pass
                } else {
                    Judged::More
                }
            }
            Expect::FirstByte(allowed) => match reply.first() {
                None => Judged::More,
                Some(b) if allowed.contains(b) => Judged::Pass,
                Some(b) => Judged::Fail(format!("first reply byte {:?}", char::from(*b))),
            },
            Expect::HttpStatus(ranges) => {
                let Some(end) = reply.windows(2).position(|w| w == b"\r\n") else {
                    return Judged::More;
                };
                let line = String::from_utf8_lossy(&reply[..end]);
                let code = line
                    .strip_prefix("HTTP/1.")
                    .and_then(|rest| rest.get(2..5))
                    .and_then(|c| c.parse::<u16>().ok());
                match code {
                    Some(code) if ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&code)) => {
                        Judged::Pass
                    }
                    Some(code) => Judged::Fail(format!("HTTP status {code}")),
                    None => Judged::Fail(format!("not an HTTP status line: {line:?}")),
                }
            }
        }
    }

    /// What is missing, for the log, when the reply ended without a verdict.
    fn describe(&self) -> String {
        match self {
            Expect::Anything => "a reply".into(),
            Expect::Contains(needle) => format!("{:?}", String::from_utf8_lossy(needle)),
            Expect::Regex(re) => format!("/{}/", re.as_str()),
            Expect::FirstByte(bytes) => {
                format!("a first byte in {:?}", String::from_utf8_lossy(bytes))
            }
            Expect::HttpStatus(_) => "an HTTP status line".into(),
        }
    }
}

impl Check {
    /// Whether it asks the service something (not only whether a port is open).
    pub fn speaks_protocol(&self) -> bool {
        !matches!(self, Check::TcpConnect | Check::UdpPort)
    }

    /// Probes `addr` once, within `timeout` in all.
    pub async fn probe(&self, addr: SocketAddr, timeout: Duration) -> Result<(), ProbeError> {
        match self {
            Check::TcpConnect => tcp_connect(addr, timeout).await,
            Check::UdpPort => udp_port(addr, timeout).await,
            Check::Tcp { send, expect } => tcp_exchange(addr, timeout, send, expect).await,
            Check::Udp { send, expect } => {
                udp_exchange(addr, timeout, send, |reply| expect.judge(reply)).await
            }
            Check::Dns { name } => {
                let id = fastrand::u16(..);
                let query = dns_query(id, name);
                udp_exchange(addr, timeout, &query, |reply| judge_dns(id, reply)).await
            }
        }
    }
}

fn refused_or(e: io::Error) -> ProbeError {
    if e.kind() == io::ErrorKind::ConnectionRefused {
        ProbeError::Refused
    } else {
        ProbeError::Io(e)
    }
}

async fn tcp_exchange(
    addr: SocketAddr,
    timeout: Duration,
    send: &[u8],
    expect: &Expect,
) -> Result<(), ProbeError> {
    let deadline = Instant::now() + timeout;
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.map_err(refused_or)?;
        if !send.is_empty() {
            stream.write_all(send).await?;
        }
        let mut reply = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(ProbeError::Unexpected(format!(
                    "closed before {}",
                    expect.describe()
                )));
            }
            reply.extend_from_slice(&chunk[..n]);
            match expect.judge(&reply) {
                Judged::Pass => return Ok(()),
                Judged::Fail(why) => return Err(ProbeError::Unexpected(why)),
                Judged::More if reply.len() >= MAX_REPLY => {
                    return Err(ProbeError::Unexpected(format!(
                        "no {} in {MAX_REPLY} bytes",
                        expect.describe()
                    )))
                }
                Judged::More => {}
            }
        }
    };
    match timeout_at(deadline, exchange).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError::Timeout(timeout)),
    }
}

async fn udp_exchange(
    addr: SocketAddr,
    timeout: Duration,
    send: &[u8],
    judge: impl Fn(&[u8]) -> Judged,
) -> Result<(), ProbeError> {
    let deadline = Instant::now() + timeout;
    let any: std::net::IpAddr = if addr.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = UdpSocket::bind(SocketAddr::new(any, 0)).await?;
    socket.connect(addr).await?;
    socket.send(send).await.map_err(refused_or)?;
    let mut buf = vec![0u8; 65536];
    loop {
        let n = match timeout_at(deadline, socket.recv(&mut buf)).await {
            Err(_) => return Err(ProbeError::Timeout(timeout)),
            Ok(result) => result.map_err(refused_or)?,
        };
        // Each datagram is judged alone; one that is not the answer (a stray, a reply to
        // an earlier probe) is skipped.
        match judge(&buf[..n]) {
            Judged::Pass => return Ok(()),
            Judged::Fail(why) => return Err(ProbeError::Unexpected(why)),
            Judged::More => {}
        }
    }
}

/// A DNS query (RFC 1035 4.1): recursion desired, one question, type A, class IN.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        // Labels are validated by the config (1..=63 bytes).
        q.push(label.len().min(63) as u8);
        q.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
    }
    q.push(0);
    q.extend_from_slice(&[0, 1, 0, 1]);
    q
}

fn judge_dns(id: u16, reply: &[u8]) -> Judged {
    if reply.len() < 12 || reply[..2] != id.to_be_bytes() || reply[2] & 0x80 == 0 {
        return Judged::More;
    }
    match reply[3] & 0x0f {
        0 | 3 => Judged::Pass,
        2 => Judged::Fail("SERVFAIL".into()),
        5 => Judged::Fail("REFUSED".into()),
        code => Judged::Fail(format!("DNS rcode {code}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A TCP server that answers every connection with `reply` after reading `read`
    /// bytes, then keeps the connection open until the client leaves.
    async fn server(read: usize, reply: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut got = vec![0u8; read];
                    if s.read_exact(&mut got).await.is_ok() {
                        let _ = s.write_all(reply).await;
                        let mut rest = [0u8; 64];
                        while let Ok(n) = s.read(&mut rest).await {
                            if n == 0 {
                                break;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    const T: Duration = Duration::from_secs(2);

    #[tokio::test]
    async fn send_expect_passes_on_the_substring_and_fails_without_it() {
        let master = server(
            18,
            b"$40\r\n# Replication\r\nrole:master\r\nconnected_slaves:0\r\n",
        )
        .await;
        let replica = server(
            18,
            b"$40\r\n# Replication\r\nrole:slave\r\nmaster_host:x\r\n",
        )
        .await;
        let check = Check::Tcp {
            send: b"INFO replication\r\n".to_vec(),
            expect: Expect::Contains(b"role:master".to_vec()),
        };
        check.probe(master, T).await.unwrap();
        // The replica keeps the connection open: the check fails at its timeout.
        let short = Duration::from_millis(200);
        assert!(matches!(
            check.probe(replica, short).await,
            Err(ProbeError::Timeout(_))
        ));
    }

    #[tokio::test]
    async fn first_byte_regex_and_http_status() {
        let pg = server(8, b"S").await;
        let check = Check::Tcp {
            send: vec![0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f],
            expect: Expect::FirstByte(b"SN".to_vec()),
        };
        check.probe(pg, T).await.unwrap();
        let not_pg = server(8, b"HTTP/1.1 400 Bad Request\r\n").await;
        assert!(matches!(
            check.probe(not_pg, T).await,
            Err(ProbeError::Unexpected(_))
        ));
        let mysql = server(0, b"\x4a\x00\x00\x00\x0a8.0.36\x00").await;
        let greeting = Check::Tcp {
            send: Vec::new(),
            expect: Expect::Regex(Regex::new(r"(?s-u)\A.{3}\x00\x0a").unwrap()),
        };
        greeting.probe(mysql, T).await.unwrap();
        let primary = server(4, b"HTTP/1.0 200 OK\r\n\r\n").await;
        let standby = server(4, b"HTTP/1.0 503 Service Unavailable\r\n\r\n").await;
        let http = Check::Tcp {
            send: b"GET /primary HTTP/1.0\r\n\r\n".to_vec(),
            expect: Expect::HttpStatus(vec![(200, 200)]),
        };
        http.probe(primary, T).await.unwrap();
        let err = http.probe(standby, T).await.unwrap_err();
        assert_eq!(err.to_string(), "unexpected reply: HTTP status 503");
    }

    #[tokio::test]
    async fn dns_passes_on_an_answer_and_fails_on_servfail_or_silence() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let mut n_query = 0;
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                n_query += 1;
                let mut reply = buf[..n].to_vec();
                reply[2] |= 0x80;
                // First query: a stray reply with the wrong id, then NOERROR. Second:
                // SERVFAIL. Third: silence.
                match n_query {
                    1 => {
                        let mut stray = reply.clone();
                        stray[0] ^= 0xff;
                        let _ = socket.send_to(&stray, from).await;
                        let _ = socket.send_to(&reply, from).await;
                    }
                    2 => {
                        reply[3] = (reply[3] & 0xf0) | 2;
                        let _ = socket.send_to(&reply, from).await;
                    }
                    _ => {}
                }
            }
        });
        let check = Check::Dns {
            name: "localhost".into(),
        };
        check.probe(addr, T).await.unwrap();
        assert!(matches!(
            check.probe(addr, T).await,
            Err(ProbeError::Unexpected(why)) if why == "SERVFAIL"
        ));
        assert!(matches!(
            check.probe(addr, Duration::from_millis(200)).await,
            Err(ProbeError::Timeout(_))
        ));
        let q = dns_query(0x1234, "www.example.");
        assert_eq!(&q[..4], &[0x12, 0x34, 0x01, 0x00]);
        assert_eq!(&q[12..], b"\x03www\x07example\x00\x00\x01\x00\x01");
    }
}
