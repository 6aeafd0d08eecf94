//! The active probe: can a TCP connection to the backend be opened within the timeout?

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

/// Why a probe failed, worded for the state-change log.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Nothing listens: the SYN was answered with a RST.
    #[error("connect refused")]
    Refused,
    /// No handshake within the timeout.
    #[error("timeout after {0:?}")]
    Timeout(Duration),
    /// Another socket error.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Opens and closes one TCP connection to `addr` within `timeout`.
pub async fn tcp_connect(addr: SocketAddr, timeout: Duration) -> Result<(), ProbeError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(_stream)) => Ok(()),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => Err(ProbeError::Refused),
        Ok(Err(e)) => Err(ProbeError::Io(e)),
        Err(_) => Err(ProbeError::Timeout(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn open_port_passes_and_closed_port_is_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tcp_connect(addr, Duration::from_secs(1)).await.unwrap();
        drop(listener);
        assert!(matches!(
            tcp_connect(addr, Duration::from_secs(1)).await,
            Err(ProbeError::Refused)
        ));
    }
}
