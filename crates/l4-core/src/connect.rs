//! Connecting to a backend, with a timeout and an error that says what went wrong.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Why a backend connection could not be made. Passive health and retries use the kind;
/// logs use the message.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The backend answered the SYN with a RST: nothing listens there.
    #[error("connect refused")]
    Refused,
    /// No answer within the connect timeout.
    #[error("connect timeout after {0:?}")]
    Timeout(Duration),
    /// Anything else (unreachable network, no local ports, ...).
    #[error("connect failed: {0}")]
    Io(#[source] io::Error),
}

impl ConnectError {
    /// The metric label of a failure that blames the backend.
    pub fn reason(&self) -> l4_balance::FailureReason {
        match self {
            ConnectError::Refused => l4_balance::FailureReason::Refused,
            ConnectError::Timeout(_) => l4_balance::FailureReason::Timeout,
            ConnectError::Io(_) => l4_balance::FailureReason::Unreachable,
        }
    }

    /// Whether the failure says something about the backend (refused, timed out, host or
    /// network unreachable), as opposed to this process running short of descriptors or
    /// local ports. Only the former may count against the backend's health: otherwise a
    /// proxy out of file descriptors would mark its whole pool down.
    pub fn blames_backend(&self) -> bool {
        match self {
            ConnectError::Refused | ConnectError::Timeout(_) => true,
            ConnectError::Io(e) => matches!(
                e.raw_os_error(),
                Some(libc::EHOSTUNREACH)
                    | Some(libc::ENETUNREACH)
                    | Some(libc::ECONNRESET)
                    | Some(libc::ETIMEDOUT)
            ),
        }
    }
}

/// Connects to `addr` within `timeout`, from `source` if given, with `TCP_NODELAY` set:
/// l4lb forwards what it receives at once and must not add Nagle delays of its own.
///
/// A source address is bound with `IP_BIND_ADDRESS_NO_PORT`, so the kernel picks the local
/// port at connect time by the whole 4-tuple: one local port serves one connection per
/// backend, and each source adds a full port range.
///
/// The outcome is read from the readiness epoll reports: a failed connect wakes with
/// `EPOLLERR` (and `EPOLLHUP`), a made one with `EPOLLOUT` alone. Only a failure asks the
/// socket for its error. tokio's own connect (and nginx's stream proxy, in
/// `ngx_stream_proxy_test_connect`) asks after every connect, a `getsockopt(SO_ERROR)` per
/// proxied connection that, on success, says nothing epoll had not said.
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    source: Option<IpAddr>,
) -> Result<TcpStream, ConnectError> {
    // Non-blocking from the start (SOCK_NONBLOCK; socket2 adds SOCK_CLOEXEC): one syscall.
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )
    .map_err(ConnectError::Io)?;
    socket.set_tcp_nodelay(true).map_err(ConnectError::Io)?;
    if let Some(source) = source {
        // An IPPROTO_IP option that IPv6 sockets honour as well (inet6_bind reads it).
        let _ = nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::IpBindAddressNoPort,
            &true,
        );
        socket
            .bind(&SocketAddr::new(source, 0).into())
            .map_err(ConnectError::Io)?;
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(classify(e)),
    }
    let stream =
        TcpStream::from_std(std::net::TcpStream::from(socket)).map_err(ConnectError::Io)?;
    let ready =
        match tokio::time::timeout(timeout, stream.ready(Interest::WRITABLE | Interest::ERROR))
            .await
        {
            Ok(ready) => ready.map_err(ConnectError::Io)?,
            Err(_) => return Err(ConnectError::Timeout(timeout)),
        };
    if ready.is_error() || ready.is_write_closed() {
        let error = stream
            .take_error()
            .map_err(ConnectError::Io)?
            .unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::NotConnected, "closed while connecting")
            });
        return Err(classify(error));
    }
    Ok(stream)
}

fn classify(error: io::Error) -> ConnectError {
    if error.kind() == io::ErrorKind::ConnectionRefused {
        ConnectError::Refused
    } else {
        ConnectError::Io(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_with_nodelay_and_reports_a_refusal_as_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = connect(addr, Duration::from_secs(5), None).await.unwrap();
        assert_eq!(stream.peer_addr().unwrap(), addr);
        assert!(stream.nodelay().unwrap());
        let (accepted, _) = listener.accept().await.unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), stream.local_addr().unwrap());
        drop(listener);
        // Nothing listens on the port any more: the SYN is answered by a RST.
        match connect(addr, Duration::from_secs(5), None).await {
            Err(ConnectError::Refused) => {}
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn leaves_from_the_source_address_given() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let source: IpAddr = "127.0.0.9".parse().unwrap();
        let stream = connect(addr, Duration::from_secs(5), Some(source))
            .await
            .unwrap();
        let (_, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.ip(), source);
        assert_eq!(stream.local_addr().unwrap(), peer);
    }

    #[test]
    fn only_backend_failures_blame_the_backend() {
        assert!(ConnectError::Refused.blames_backend());
        assert!(ConnectError::Timeout(Duration::from_secs(1)).blames_backend());
        assert!(
            ConnectError::Io(io::Error::from_raw_os_error(libc::EHOSTUNREACH)).blames_backend()
        );
        for local in [
            libc::EMFILE,
            libc::ENFILE,
            libc::EADDRNOTAVAIL,
            libc::ENOBUFS,
        ] {
            assert!(!ConnectError::Io(io::Error::from_raw_os_error(local)).blames_backend());
        }
    }
}
