//! The active probe: can a TCP connection to the backend be opened within the timeout?

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

/// Why a probe failed, worded for the state-change log.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Nothing listens: the SYN was answered with a RST (TCP) or the datagram with an
    /// ICMP port unreachable (UDP).
    #[error("connect refused")]
    Refused,
    /// No handshake within the timeout.
    #[error("timeout after {0:?}")]
    Timeout(Duration),
    /// Another socket error.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The backend answered, but not as the check expects.
    #[error("unexpected reply: {0}")]
    Unexpected(String),
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

/// Probes a UDP port the only way that works for any protocol: send an empty datagram on
/// a connected socket and listen for an ICMP port-unreachable (`ECONNREFUSED`) until
/// `timeout`. Silence or any reply counts as alive; a closed port fails at once. (A dead
/// host, unlike a dead port, sends nothing back: passive detection and the data path's
/// unreachable counts cover what this cannot see.)
pub async fn udp_port(addr: SocketAddr, timeout: Duration) -> Result<(), ProbeError> {
    let any: std::net::IpAddr = if addr.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = tokio::net::UdpSocket::bind(SocketAddr::new(any, 0)).await?;
    socket.connect(addr).await?;
    match socket.send(&[]).await {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Err(ProbeError::Refused),
        Err(e) => return Err(ProbeError::Io(e)),
        Ok(_) => {}
    }
    let mut buf = [0u8; 512];
    match tokio::time::timeout(timeout, socket.recv(&mut buf)).await {
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => Err(ProbeError::Refused),
        Ok(Err(e)) => Err(ProbeError::Io(e)),
        Ok(Ok(_)) | Err(_) => Ok(()),
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

    #[tokio::test]
    async fn udp_probe_sees_a_closed_port() {
        let open = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = open.local_addr().unwrap();
        udp_port(addr, Duration::from_millis(50)).await.unwrap();
        drop(open);
        assert!(matches!(
            udp_port(addr, Duration::from_millis(500)).await,
            Err(ProbeError::Refused)
        ));
    }
}
