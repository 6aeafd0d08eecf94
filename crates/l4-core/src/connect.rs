//! Connecting to a backend, with a timeout and an error that says what went wrong.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

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
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    source: Option<IpAddr>,
) -> Result<TcpStream, ConnectError> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(ConnectError::Io)?;
    socket.set_nodelay(true).map_err(ConnectError::Io)?;
    if let Some(source) = source {
        // An IPPROTO_IP option that IPv6 sockets honour as well (inet6_bind reads it).
        let _ = nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::IpBindAddressNoPort,
            &true,
        );
        socket
            .bind(SocketAddr::new(source, 0))
            .map_err(ConnectError::Io)?;
    }
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => Err(ConnectError::Refused),
        Ok(Err(e)) => Err(ConnectError::Io(e)),
        Err(_) => Err(ConnectError::Timeout(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
