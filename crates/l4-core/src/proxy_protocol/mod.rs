//! PROXY protocol headers (HAProxy's spec, versions 1 and 2): encoded as the first bytes
//! of a backend connection (or UDP datagram) so the backend learns the real client
//! address, and decoded from a trusted upstream balancer (`accept_proxy`).

use std::net::{IpAddr, SocketAddr};

mod decode;
pub use decode::{
    decode_datagram, decode_stream, DecodeError, Decoded, ProxyHeader, V1_MAX, V2_MAX,
};

/// Which header, if any, to send to backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProxyProtocol {
    /// No header.
    #[default]
    Off,
    /// The human-readable text header.
    V1,
    /// The binary header.
    V2,
}

/// The 12-byte signature that starts every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Transport of the proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP (v1 and v2).
    Stream,
    /// UDP (v2 only).
    Datagram,
}

fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// Encodes the header for a connection from `client` to `local` (the listener address the
/// client reached). IPv4-mapped IPv6 addresses are written as IPv4; when the two families
/// still differ, the header says the addresses are unknown, as the spec asks.
pub fn encode(
    version: ProxyProtocol,
    transport: Transport,
    client: SocketAddr,
    local: SocketAddr,
) -> Vec<u8> {
    let (client, local) = (unmap(client), unmap(local));
    match version {
        ProxyProtocol::Off => Vec::new(),
        ProxyProtocol::V1 => encode_v1(client, local).into_bytes(),
        ProxyProtocol::V2 => encode_v2(transport, client, local),
    }
}

fn encode_v1(client: SocketAddr, local: SocketAddr) -> String {
    match (client.ip(), local.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            format!("PROXY TCP4 {s} {d} {} {}\r\n", client.port(), local.port())
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            format!("PROXY TCP6 {s} {d} {} {}\r\n", client.port(), local.port())
        }
        _ => "PROXY UNKNOWN\r\n".to_string(),
    }
}

fn encode_v2(transport: Transport, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&V2_SIGNATURE);
    let proto = match transport {
        Transport::Stream => 0x1,
        Transport::Datagram => 0x2,
    };
    match (client.ip(), local.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&[0x21, 0x10 | proto, 0, 12]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.extend_from_slice(&[0x21, 0x20 | proto, 0, 36]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        _ => {
            // LOCAL-less "unspecified" family: receivers use the real connection endpoints.
            out.extend_from_slice(&[0x21, 0x00, 0, 0]);
            return out;
        }
    }
    out.extend_from_slice(&client.port().to_be_bytes());
    out.extend_from_slice(&local.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_matches_the_spec_examples() {
        assert_eq!(
            encode(
                ProxyProtocol::V1,
                Transport::Stream,
                a("192.168.0.1:56324"),
                a("192.168.0.11:443")
            ),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        );
        assert_eq!(
            encode(
                ProxyProtocol::V1,
                Transport::Stream,
                a("[::1]:1000"),
                a("[::2]:80")
            ),
            b"PROXY TCP6 ::1 ::2 1000 80\r\n"
        );
        assert_eq!(
            encode(
                ProxyProtocol::V1,
                Transport::Stream,
                a("[::ffff:10.0.0.1]:5"),
                a("10.0.0.2:80")
            ),
            b"PROXY TCP4 10.0.0.1 10.0.0.2 5 80\r\n"
        );
        assert_eq!(
            encode(
                ProxyProtocol::V1,
                Transport::Stream,
                a("[::1]:5"),
                a("10.0.0.2:80")
            ),
            b"PROXY UNKNOWN\r\n"
        );
    }

    #[test]
    fn v2_ipv4_layout() {
        let h = encode(
            ProxyProtocol::V2,
            Transport::Stream,
            a("10.1.2.3:4660"),
            a("10.4.5.6:80"),
        );
        assert_eq!(&h[..12], &V2_SIGNATURE);
        assert_eq!(&h[12..16], &[0x21, 0x11, 0x00, 0x0c]);
        assert_eq!(&h[16..24], &[10, 1, 2, 3, 10, 4, 5, 6]);
        assert_eq!(&h[24..], &[0x12, 0x34, 0x00, 0x50]);
        let u = encode(
            ProxyProtocol::V2,
            Transport::Datagram,
            a("[::1]:53"),
            a("[::2]:53"),
        );
        assert_eq!(&u[12..16], &[0x21, 0x22, 0x00, 36]);
        assert_eq!(u.len(), 16 + 36);
        assert!(encode(
            ProxyProtocol::Off,
            Transport::Stream,
            a("1.1.1.1:1"),
            a("2.2.2.2:2")
        )
        .is_empty());
    }
}
