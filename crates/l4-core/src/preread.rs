//! What a TCP connection is read for before the relay starts: the PROXY header of a
//! trusted upstream (consumed, exactly its length), and the TLS ClientHello or PostgreSQL
//! preamble a route is chosen by (peeked, never consumed: the backend receives every byte
//! the client sent, unaltered, and the relay stays zero-copy from the first byte).
//!
//! Peeking works with the edge-triggered reactor: a peek that shows nothing new reports
//! "would block", which clears the readiness, so the task sleeps until the next segment
//! arrives instead of spinning on bytes it has already seen.

use std::io;
use std::os::fd::AsRawFd;

use nix::sys::socket::{recv, MsgFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use crate::client_hello::{self, Hello, HelloError, MAX_PREREAD};
use crate::postgres::{self, Preamble};
use crate::proxy_protocol::{decode_stream, DecodeError, Decoded, ProxyHeader, V2_MAX};

/// Why peeking stopped without a decision.
#[derive(Debug, thiserror::Error)]
pub enum PeekEnd {
    /// The deadline passed.
    #[error("timed out")]
    Timeout,
    /// The client closed (or half-closed) before enough arrived.
    #[error("client closed")]
    Closed,
    /// The bytes fill the window and still do not decide.
    #[error("too many bytes without a decision")]
    Full,
    /// A socket error.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Peeks at what the client has sent, without consuming it, until `decide` returns a
/// value. Reads at most `window` bytes; waits for new bytes until `deadline`.
async fn peek_until<R>(
    stream: &TcpStream,
    window: usize,
    deadline: Instant,
    mut decide: impl FnMut(&[u8]) -> Option<R>,
) -> Result<R, PeekEnd> {
    let fd = stream.as_raw_fd();
    // Most decisions need a few hundred bytes: start small, grow to the window.
    let mut buf = vec![0u8; window.min(2048)];
    let mut seen = 0;
    loop {
        let ready = timeout_at(deadline, stream.ready(Interest::READABLE))
            .await
            .map_err(|_| PeekEnd::Timeout)??;
        let peeked = stream.try_io(Interest::READABLE, || {
            let n = recv(fd, &mut buf, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT)
                .map_err(io::Error::from)?;
            if n == seen && n > 0 {
                // Nothing new: clear the readiness and wait for the next segment.
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match peeked {
            Ok(0) => return Err(PeekEnd::Closed),
            Ok(n) => {
                seen = n;
                if let Some(decision) = decide(&buf[..n]) {
                    return Ok(decision);
                }
                if n == buf.len() {
                    if buf.len() >= window {
                        return Err(PeekEnd::Full);
                    }
                    buf.resize((buf.len() * 2).min(window), 0);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if ready.is_read_closed() {
                    return Err(PeekEnd::Closed);
                }
            }
            Err(e) => return Err(PeekEnd::Io(e)),
        }
    }
}

/// Why a trusted upstream's PROXY header could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    /// The bytes are not a valid header.
    #[error(transparent)]
    Invalid(#[from] DecodeError),
    /// The header did not arrive complete in time, or the connection ended first.
    #[error("no complete PROXY header: {0}")]
    Incomplete(#[from] PeekEnd),
}

/// Reads (consumes) the PROXY header at the start of `stream`: exactly its bytes, so what
/// follows stays in the socket for the relay.
pub async fn read_proxy_header(
    stream: &mut TcpStream,
    deadline: Instant,
) -> Result<ProxyHeader, ProxyHeaderError> {
    let decided = peek_until(stream, V2_MAX, deadline, |bytes| {
        match decode_stream(bytes) {
            Ok(Decoded::Incomplete(_)) => None,
            Ok(Decoded::Header(header)) => Some(Ok(header)),
            Err(e) => Some(Err(e)),
        }
    })
    .await?;
    let header = decided?;
    let mut consumed = vec![0u8; header.len];
    timeout_at(deadline, stream.read_exact(&mut consumed))
        .await
        .map_err(|_| PeekEnd::Timeout)?
        .map_err(PeekEnd::Io)?;
    Ok(header)
}

/// What the ClientHello preread found.
#[derive(Debug)]
pub enum ServerName {
    /// A ClientHello with this server name.
    Name(String),
    /// A ClientHello without one.
    NoName,
    /// The client does not speak TLS first.
    NotTls,
    /// A TLS start that could not be read (logged; routed as if without a name).
    Invalid(HelloError),
    /// Peeking ended without a decision (logged; timeouts and oversized hellos are
    /// routed as if without a name, a closed client is closed).
    Undecided(PeekEnd),
}

/// Peeks at the ClientHello and returns its server name.
pub async fn peek_server_name(stream: &TcpStream, deadline: Instant) -> ServerName {
    let decided = peek_until(
        stream,
        MAX_PREREAD,
        deadline,
        |bytes| match client_hello::parse(bytes) {
            Ok(Hello::NeedMore) => None,
            Ok(Hello::NotTls) => Some(ServerName::NotTls),
            Ok(Hello::Complete(Some(name))) => Some(ServerName::Name(name)),
            Ok(Hello::Complete(None)) => Some(ServerName::NoName),
            Err(e) => Some(ServerName::Invalid(e)),
        },
    )
    .await;
    decided.unwrap_or_else(ServerName::Undecided)
}

/// What happened at the start of a PostgreSQL connection.
#[derive(Debug)]
pub struct PostgresStart {
    /// The client sent an SSLRequest and l4lb answered `S`: the chosen backend must be
    /// sent one, and its `S` consumed, before the relay.
    pub ssl_requested: bool,
    /// The server name of the ClientHello that followed (or came directly).
    pub name: ServerName,
}

/// Handles a PostgreSQL client's preamble: answers a GSSENCRequest with `N` and an
/// SSLRequest with `S` (both consumed), then peeks at the ClientHello. A plaintext
/// start is left untouched and routed without a name.
pub async fn postgres_start(
    stream: &mut TcpStream,
    deadline: Instant,
) -> Result<PostgresStart, PeekEnd> {
    let mut gssenc_answered = false;
    loop {
        let preamble = peek_until(stream, 8, deadline, |bytes| {
            match postgres::classify(bytes) {
                Preamble::NeedMore => None,
                decided => Some(decided),
            }
        })
        .await?;
        match preamble {
            Preamble::GssEncRequest if !gssenc_answered => {
                answer(stream, postgres::WONT, deadline).await?;
                gssenc_answered = true;
            }
            Preamble::SslRequest => {
                answer(stream, postgres::WILL_TLS, deadline).await?;
                return Ok(PostgresStart {
                    ssl_requested: true,
                    name: peek_server_name(stream, deadline).await,
                });
            }
            Preamble::DirectTls => {
                return Ok(PostgresStart {
                    ssl_requested: false,
                    name: peek_server_name(stream, deadline).await,
                })
            }
            _ => {
                return Ok(PostgresStart {
                    ssl_requested: false,
                    name: ServerName::NotTls,
                })
            }
        }
    }
}

/// Consumes the 8-byte request just classified and writes the one-byte answer.
async fn answer(stream: &mut TcpStream, reply: u8, deadline: Instant) -> Result<(), PeekEnd> {
    let mut request = [0u8; 8];
    let io = async {
        stream.read_exact(&mut request).await?;
        stream.write_all(&[reply]).await
    };
    timeout_at(deadline, io)
        .await
        .map_err(|_| PeekEnd::Timeout)?
        .map_err(PeekEnd::Io)
}

/// Asks a PostgreSQL backend for TLS on behalf of a client l4lb already answered:
/// sends the SSLRequest and consumes the `S`. Anything else means the backend will not
/// speak TLS, and the client, mid-handshake, cannot be served.
pub async fn postgres_backend_tls(backend: &mut TcpStream, deadline: Instant) -> io::Result<()> {
    let io = async {
        backend.write_all(&postgres::SSL_REQUEST).await?;
        let mut reply = [0u8; 1];
        backend.read_exact(&mut reply).await?;
        Ok::<u8, io::Error>(reply[0])
    };
    match timeout_at(deadline, io).await {
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "no answer to SSLRequest",
        )),
        Ok(Err(e)) => Err(e),
        Ok(Ok(postgres::WILL_TLS)) => Ok(()),
        Ok(Ok(other)) => Err(io::Error::other(format!(
            "backend answered SSLRequest with {:?}, not 'S'",
            char::from(other)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client_hello::tests::{hello_message, records, sni_extension};
    use crate::test_sockets::connected_pair;
    use std::time::Duration;

    #[tokio::test]
    async fn a_hello_in_pieces_is_peeked_whole_and_left_in_place() {
        let (mut server, mut client) = connected_pair(None).await;
        let message = hello_message(&[(0x11ec, vec![1; 1300]), sni_extension("a.test")]);
        let bytes = records(&message, 500);
        let sent = bytes.clone();
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(97) {
                client.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            client
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        match peek_server_name(&server, deadline).await {
            ServerName::Name(name) => assert_eq!(name, "a.test"),
            other => panic!("{other:?}"),
        }
        let _client = writer.await.unwrap();
        let mut all = vec![0u8; bytes.len()];
        server.read_exact(&mut all).await.unwrap();
        assert_eq!(all, bytes, "every byte is still there for the backend");
    }

    #[tokio::test]
    async fn silence_times_out_and_a_proxy_header_is_consumed_exactly() {
        let (mut server, mut client) = connected_pair(None).await;
        let deadline = Instant::now() + Duration::from_millis(50);
        assert!(matches!(
            peek_server_name(&server, deadline).await,
            ServerName::Undecided(PeekEnd::Timeout)
        ));
        client
            .write_all(b"PROXY TCP4 192.0.2.1 198.51.100.2 1000 443\r\nhello")
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let header = read_proxy_header(&mut server, deadline).await.unwrap();
        assert_eq!(
            header.addresses.unwrap().0,
            "192.0.2.1:1000".parse().unwrap()
        );
        let mut rest = [0u8; 5];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"hello");
    }

    #[tokio::test]
    async fn postgres_ssl_request_is_answered_then_the_hello_peeked() {
        let (mut server, mut client) = connected_pair(None).await;
        client.write_all(&postgres::GSSENC_REQUEST).await.unwrap();
        let task = tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            let start = postgres_start(&mut server, deadline).await.unwrap();
            (start, server)
        });
        let mut reply = [0u8; 1];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply[0], b'N');
        client.write_all(&postgres::SSL_REQUEST).await.unwrap();
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply[0], b'S');
        let hello = records(&hello_message(&[sni_extension("db1.test")]), 1 << 14);
        client.write_all(&hello).await.unwrap();
        let (start, _server) = task.await.unwrap();
        assert!(start.ssl_requested);
        assert!(matches!(start.name, ServerName::Name(n) if n == "db1.test"));
    }

    #[tokio::test]
    async fn postgres_direct_tls_and_plaintext_starts_are_left_untouched() {
        // PostgreSQL 17 sslnegotiation=direct: the ClientHello comes first.
        let (mut server, mut client) = connected_pair(None).await;
        let hello = records(&hello_message(&[sni_extension("db2.test")]), 1 << 14);
        client.write_all(&hello).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let start = postgres_start(&mut server, deadline).await.unwrap();
        assert!(!start.ssl_requested);
        assert!(matches!(start.name, ServerName::Name(n) if n == "db2.test"));
        let mut all = vec![0u8; hello.len()];
        server.read_exact(&mut all).await.unwrap();
        assert_eq!(all, hello);
        // A plaintext StartupMessage: no name, nothing consumed, nothing answered.
        let (mut server, mut client) = connected_pair(None).await;
        let startup = [0, 0, 0, 9, 0, 3, 0, 0, 0];
        client.write_all(&startup).await.unwrap();
        let start = postgres_start(&mut server, deadline).await.unwrap();
        assert!(!start.ssl_requested);
        assert!(matches!(start.name, ServerName::NotTls));
        let mut all = [0u8; 9];
        server.read_exact(&mut all).await.unwrap();
        assert_eq!(all, startup);
    }
}
