use std::net::{IpAddr, SocketAddr};

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Transport protocol of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// A TCP connection.
    Tcp,
    /// A UDP flow.
    Udp,
}

/// What selection may look at: the 5-tuple of the client's flow as the balancer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The client's address and port.
    pub client: SocketAddr,
    /// The local (listener) address the client reached.
    pub local: SocketAddr,
    /// TCP or UDP.
    pub protocol: Protocol,
}

/// Which part of a flow a hashing algorithm (source_hash, maglev) keys on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HashKey {
    /// The client's IP: every connection of a client lands on one backend.
    #[default]
    SrcIp,
    /// The client's IP and port.
    SrcIpPort,
    /// Client and local address and port, and the protocol.
    FiveTuple,
}

impl HashKey {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            HashKey::SrcIp => "src_ip",
            HashKey::SrcIpPort => "src_ip_port",
            HashKey::FiveTuple => "five_tuple",
        }
    }
}

/// Fixed seed: placement must be the same in every process and across restarts, so two
/// l4lb instances behind ECMP pick the same backend for the same flow.
const FLOW_SEED: u64 = 0x6c34_6c62_666c_6f77; // "l4lbflow"

/// Appends an IP in a family-independent way: IPv4-mapped IPv6 is hashed as IPv4, so a
/// dual-stack listener places a client the same whichever way it arrived.
fn put_ip(buf: &mut [u8; 40], at: usize, ip: IpAddr) -> usize {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            buf[at..at + 4].copy_from_slice(&v4.octets());
            at + 4
        }
        IpAddr::V6(v6) => {
            buf[at..at + 16].copy_from_slice(&v6.octets());
            at + 16
        }
    }
}

fn put_port(buf: &mut [u8; 40], at: usize, port: u16) -> usize {
    buf[at..at + 2].copy_from_slice(&port.to_be_bytes());
    at + 2
}

impl FlowKey {
    /// A stable 64-bit hash of the part of the flow named by `key` (xxh3, fixed seed, no
    /// allocation).
    pub fn hash(&self, key: HashKey) -> u64 {
        let mut buf = [0u8; 40];
        let mut len = put_ip(&mut buf, 0, self.client.ip());
        if key != HashKey::SrcIp {
            len = put_port(&mut buf, len, self.client.port());
        }
        if key == HashKey::FiveTuple {
            len = put_ip(&mut buf, len, self.local.ip());
            len = put_port(&mut buf, len, self.local.port());
            buf[len] = match self.protocol {
                Protocol::Tcp => 6,
                Protocol::Udp => 17,
            };
            len += 1;
        }
        xxh3_64_with_seed(&buf[..len], FLOW_SEED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(client: &str) -> FlowKey {
        FlowKey {
            client: client.parse().unwrap(),
            local: "127.0.0.1:80".parse().unwrap(),
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn keys_ignore_what_they_should() {
        let a = key("10.0.0.1:1000");
        let b = key("10.0.0.1:2000");
        assert_eq!(a.hash(HashKey::SrcIp), b.hash(HashKey::SrcIp));
        assert_ne!(a.hash(HashKey::SrcIpPort), b.hash(HashKey::SrcIpPort));
        assert_ne!(a.hash(HashKey::FiveTuple), b.hash(HashKey::FiveTuple));
        let mapped = key("[::ffff:10.0.0.1]:1000");
        assert_eq!(a.hash(HashKey::FiveTuple), mapped.hash(HashKey::FiveTuple));
    }

    #[test]
    fn hashes_are_stable_across_builds() {
        // Golden values: a change here moves every flow of every deployment.
        assert_eq!(
            key("10.0.0.1:1000").hash(HashKey::SrcIp),
            8088888061542923889
        );
    }
}
