//! Decoding a received PROXY header (v1 text or v2 binary), sans-io: the caller hands in
//! the bytes it has (peeked from a stream, or one datagram) and learns whether a header is
//! complete, how long it is, and what it says. Every length is checked before it is used;
//! no input makes it panic (it runs under a fuzzer).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{Transport, V2_SIGNATURE};

/// The longest v1 header the spec allows, CRLF included.
pub const V1_MAX: usize = 107;
/// The longest v2 header accepted (16 fixed bytes, addresses and TLVs). The spec allows
/// 64 KiB; the TLVs senders add in practice (SSL details, cloud endpoint ids, a unique
/// id) take a few hundred bytes, and a bound keeps a trusted but broken peer from making
/// us buffer that much.
pub const V2_MAX: usize = 4096;

/// A complete header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHeader {
    /// Bytes the header takes at the start of the input (strip them before relaying).
    pub len: usize,
    /// The original client and the address it reached. `None` for a v2 LOCAL command (the
    /// upstream's own connection, a health check), v1 `UNKNOWN`, or an address family
    /// l4lb cannot use (UNIX, UNSPEC): the socket's own endpoints stand.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    /// The transport the header declares (v1 is always a stream), when it declares one.
    pub transport: Option<Transport>,
    /// How many TLVs a v2 header carries (checked for framing, otherwise ignored).
    pub tlvs: usize,
}

/// What the bytes so far amount to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A header, complete.
    Header(ProxyHeader),
    /// A valid beginning: read more (at least this many bytes in all, when known).
    Incomplete(Option<usize>),
}

/// Why the bytes are not a PROXY header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Neither the v1 `PROXY ` prefix nor the v2 signature.
    #[error("no PROXY header (the first bytes are neither \"PROXY \" nor the v2 signature)")]
    Missing,
    /// A v1 line that breaks the spec.
    #[error("malformed PROXY v1 header: {0}")]
    V1(&'static str),
    /// The v2 version nibble is not 2.
    #[error("PROXY v2 header with version {0}")]
    Version(u8),
    /// The v2 command is neither LOCAL nor PROXY.
    #[error("PROXY v2 header with unknown command {0}")]
    Command(u8),
    /// An address family or transport outside the spec.
    #[error("PROXY v2 header with unknown family/transport byte {0:#04x}")]
    Family(u8),
    /// Longer than [`V2_MAX`].
    #[error("PROXY v2 header of {0} bytes (at most {V2_MAX} accepted)")]
    TooLong(usize),
    /// The length leaves no room for the addresses its family needs.
    #[error("PROXY v2 header too short for its addresses ({0} bytes)")]
    ShortAddresses(usize),
    /// A TLV runs past the end of the header.
    #[error("PROXY v2 header with a truncated TLV")]
    Tlv,
    /// The declared transport is not the one it arrived on (STREAM over UDP, DGRAM over
    /// TCP).
    #[error("PROXY header declares {declared:?} but arrived over {actual:?}")]
    WrongTransport {
        /// What the header says.
        declared: Transport,
        /// What it came on.
        actual: Transport,
    },
    /// A datagram carried only part of a header.
    #[error("datagram shorter than its PROXY v2 header")]
    Truncated,
    /// UDP carries v2 only.
    #[error("PROXY v1 over UDP (only v2 exists for datagrams)")]
    V1OverUdp,
}

/// Decodes a header at the start of bytes received on a stream (v1 or v2). `Incomplete`
/// means the bytes so far are a valid beginning.
pub fn decode_stream(buf: &[u8]) -> Result<Decoded, DecodeError> {
    if buf.is_empty() {
        return Ok(Decoded::Incomplete(None));
    }
    let decoded = if starts_like(buf, b"PROXY ") {
        decode_v1(buf)?
    } else if starts_like(buf, &V2_SIGNATURE) {
        decode_v2(buf)?
    } else {
        return Err(DecodeError::Missing);
    };
    check_transport(&decoded, Transport::Stream)?;
    Ok(decoded)
}

/// Decodes the v2 header at the start of one datagram; the payload follows it.
pub fn decode_datagram(datagram: &[u8]) -> Result<ProxyHeader, DecodeError> {
    if datagram.starts_with(b"PROXY ") {
        return Err(DecodeError::V1OverUdp);
    }
    if !starts_like(datagram, &V2_SIGNATURE) {
        return Err(DecodeError::Missing);
    }
    let decoded = decode_v2(datagram)?;
    check_transport(&decoded, Transport::Datagram)?;
    match decoded {
        Decoded::Header(header) => Ok(header),
        Decoded::Incomplete(_) => Err(DecodeError::Truncated),
    }
}

fn check_transport(decoded: &Decoded, actual: Transport) -> Result<(), DecodeError> {
    if let Decoded::Header(ProxyHeader {
        transport: Some(declared),
        ..
    }) = decoded
    {
        if *declared != actual {
            return Err(DecodeError::WrongTransport {
                declared: *declared,
                actual,
            });
        }
    }
    Ok(())
}

/// Whether `buf` agrees with `prefix` as far as both go (a short `buf` is a beginning).
fn starts_like(buf: &[u8], prefix: &[u8]) -> bool {
    let n = buf.len().min(prefix.len());
    n > 0 && buf[..n] == prefix[..n]
}

fn decode_v1(buf: &[u8]) -> Result<Decoded, DecodeError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    // The line ends at the first CRLF; until one arrives (within 107 bytes) it is a
    // beginning, whatever it holds: the fields are judged once complete.
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= V1_MAX {
            return Err(DecodeError::V1("no CRLF within 107 bytes"));
        }
        return Ok(Decoded::Incomplete(None));
    };
    let len = end + 2;
    // The caller checked the "PROXY " prefix, and a CRLF follows it.
    let fields = window.get(6..end).unwrap_or_default();
    let family_len = fields
        .iter()
        .position(|&b| b == b' ')
        .unwrap_or(fields.len());
    if &fields[..family_len] == b"UNKNOWN" {
        // The spec: the rest of an UNKNOWN line is to be ignored, whatever it holds.
        return Ok(Decoded::Header(ProxyHeader {
            len,
            addresses: None,
            transport: Some(Transport::Stream),
            tlvs: 0,
        }));
    }
    let line = std::str::from_utf8(fields).map_err(|_| DecodeError::V1("not ASCII"))?;
    let mut fields = line.split(' ');
    let family = fields.next().ok_or(DecodeError::V1("no protocol"))?;
    if family != "TCP4" && family != "TCP6" {
        return Err(DecodeError::V1("protocol is not TCP4, TCP6 or UNKNOWN"));
    }
    let mut next = || fields.next().ok_or(DecodeError::V1("too few fields"));
    let (src, dst, sport, dport) = (next()?, next()?, next()?, next()?);
    if fields.next().is_some() {
        return Err(DecodeError::V1("too many fields"));
    }
    let (src, dst) = if family == "TCP4" {
        (v1_ipv4(src)?, v1_ipv4(dst)?)
    } else {
        (v1_ipv6(src)?, v1_ipv6(dst)?)
    };
    Ok(Decoded::Header(ProxyHeader {
        len,
        addresses: Some((
            SocketAddr::new(src, v1_port(sport)?),
            SocketAddr::new(dst, v1_port(dport)?),
        )),
        transport: Some(Transport::Stream),
        tlvs: 0,
    }))
}

fn v1_ipv4(text: &str) -> Result<IpAddr, DecodeError> {
    text.parse::<Ipv4Addr>()
        .map(IpAddr::V4)
        .map_err(|_| DecodeError::V1("bad IPv4 address"))
}

fn v1_ipv6(text: &str) -> Result<IpAddr, DecodeError> {
    text.parse::<Ipv6Addr>()
        .map(IpAddr::V6)
        .map_err(|_| DecodeError::V1("bad IPv6 address"))
}

/// A port: 1 to 5 decimal digits, no sign, no leading zero (the spec's form), <= 65535.
fn v1_port(text: &str) -> Result<u16, DecodeError> {
    let digits = !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit());
    if !digits || (text.len() > 1 && text.starts_with('0')) {
        return Err(DecodeError::V1("bad port"));
    }
    text.parse().map_err(|_| DecodeError::V1("bad port"))
}

fn decode_v2(buf: &[u8]) -> Result<Decoded, DecodeError> {
    if buf.len() < 16 {
        return Ok(Decoded::Incomplete(Some(16)));
    }
    let version = buf[12] >> 4;
    let command = buf[12] & 0x0f;
    if version != 2 {
        return Err(DecodeError::Version(version));
    }
    if command > 1 {
        return Err(DecodeError::Command(command));
    }
    let family = buf[13];
    let body = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let len = 16 + body;
    if len > V2_MAX {
        return Err(DecodeError::TooLong(len));
    }
    if command == 0 {
        // LOCAL (an upstream's own connection, its health check): the spec has the
        // receiver discard the whole block, family included, and keep the connection.
        if buf.len() < len {
            return Ok(Decoded::Incomplete(Some(len)));
        }
        return Ok(Decoded::Header(ProxyHeader {
            len,
            addresses: None,
            transport: None,
            tlvs: 0,
        }));
    }
    let transport = match family & 0x0f {
        0 => None,
        1 => Some(Transport::Stream),
        2 => Some(Transport::Datagram),
        _ => return Err(DecodeError::Family(family)),
    };
    let address_len = match family >> 4 {
        0 => 0,
        1 => 12,
        2 => 36,
        3 => 216,
        _ => return Err(DecodeError::Family(family)),
    };
    if body < address_len {
        return Err(DecodeError::ShortAddresses(body));
    }
    if buf.len() < len {
        return Ok(Decoded::Incomplete(Some(len)));
    }
    let block = &buf[16..16 + address_len];
    let addresses = match family >> 4 {
        1 => {
            let ip = |o: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    block[o],
                    block[o + 1],
                    block[o + 2],
                    block[o + 3],
                ))
            };
            let port = |o: usize| u16::from_be_bytes([block[o], block[o + 1]]);
            Some((
                SocketAddr::new(ip(0), port(8)),
                SocketAddr::new(ip(4), port(10)),
            ))
        }
        2 => {
            let ip = |o: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&block[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            let port = |o: usize| u16::from_be_bytes([block[o], block[o + 1]]);
            Some((
                SocketAddr::new(ip(0), port(32)),
                SocketAddr::new(ip(16), port(34)),
            ))
        }
        // UNSPEC and UNIX: nothing l4lb can route or log by.
        _ => None,
    };
    let tlvs = count_tlvs(&buf[16 + address_len..len])?;
    Ok(Decoded::Header(ProxyHeader {
        len,
        addresses,
        transport,
        tlvs,
    }))
}

/// Walks the TLVs (type, 16-bit length, value) and checks they fill the rest exactly.
fn count_tlvs(mut rest: &[u8]) -> Result<usize, DecodeError> {
    let mut count = 0;
    while !rest.is_empty() {
        if rest.len() < 3 {
            return Err(DecodeError::Tlv);
        }
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        rest = rest.get(3 + len..).ok_or(DecodeError::Tlv)?;
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::super::{encode, ProxyProtocol};
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn header(decoded: Result<Decoded, DecodeError>) -> ProxyHeader {
        match decoded {
            Ok(Decoded::Header(h)) => h,
            other => panic!("not a header: {other:?}"),
        }
    }

    #[test]
    fn v1_round_trips_and_reports_its_length() {
        let mut bytes = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET /".to_vec();
        let h = header(decode_stream(&bytes));
        assert_eq!(h.len, 47);
        assert_eq!(&bytes[h.len..], b"GET /");
        assert_eq!(
            h.addresses,
            Some((a("192.168.0.1:56324"), a("192.168.0.11:443")))
        );
        bytes.truncate(20);
        assert_eq!(decode_stream(&bytes), Ok(Decoded::Incomplete(None)));
        let h = header(decode_stream(b"PROXY TCP6 ::1 2001:db8::2 1000 80\r\n"));
        assert_eq!(h.addresses, Some((a("[::1]:1000"), a("[2001:db8::2]:80"))));
        let h = header(decode_stream(b"PROXY UNKNOWN ignored stuff\r\n"));
        assert_eq!(h.addresses, None);
        assert_eq!(h.len, 29);
        let h = header(decode_stream(b"PROXY UNKNOWN \x01\xff\r\nrest"));
        assert_eq!((h.addresses, h.len), (None, 18));
        assert_eq!(header(decode_stream(b"PROXY UNKNOWN\r\n")).len, 15);
    }

    #[test]
    fn v1_refuses_what_the_spec_forbids() {
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4\n5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \x012\r\n",
        ] {
            assert!(
                decode_stream(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = [b"PROXY ".as_slice(), &[b'A'; 120]].concat();
        assert!(decode_stream(&long).is_err());
        assert_eq!(
            decode_stream(b"GET / HTTP/1.1\r\n"),
            Err(DecodeError::Missing)
        );
        assert_eq!(decode_stream(b"PRO"), Ok(Decoded::Incomplete(None)));
    }

    #[test]
    fn v2_round_trips_every_family() {
        for (client, local) in [
            (a("10.1.2.3:4660"), a("10.4.5.6:80")),
            (a("[2001:db8::1]:5"), a("[2001:db8::2]:443")),
        ] {
            let bytes = encode(ProxyProtocol::V2, Transport::Stream, client, local);
            let h = header(decode_stream(&bytes));
            assert_eq!(h.len, bytes.len());
            assert_eq!(h.addresses, Some((client, local)));
            let bytes = encode(ProxyProtocol::V2, Transport::Datagram, client, local);
            let mut datagram = bytes.clone();
            datagram.extend_from_slice(b"payload");
            let h = decode_datagram(&datagram).unwrap();
            assert_eq!(&datagram[h.len..], b"payload");
            assert_eq!(h.addresses, Some((client, local)));
            for cut in 0..bytes.len() {
                assert!(matches!(
                    decode_stream(&bytes[..cut]),
                    Ok(Decoded::Incomplete(_))
                ));
            }
        }
    }

    #[test]
    fn v2_local_and_unspec_keep_the_socket_addresses() {
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x11, 0, 12]);
        local.extend_from_slice(&[1; 12]);
        let h = header(decode_stream(&local));
        assert_eq!((h.addresses, h.len), (None, 28));
        // LOCAL discards its block whatever it holds (family, lengths, TLV framing).
        let mut odd = V2_SIGNATURE.to_vec();
        odd.extend_from_slice(&[0x20, 0xff, 0, 3, 9, 9, 9]);
        assert_eq!(header(decode_stream(&odd)).len, 19);
        let mut unspec = V2_SIGNATURE.to_vec();
        unspec.extend_from_slice(&[0x21, 0x00, 0, 0]);
        assert_eq!(header(decode_stream(&unspec)).addresses, None);
    }

    #[test]
    fn v2_refuses_what_the_spec_forbids() {
        let v4 = encode(
            ProxyProtocol::V2,
            Transport::Stream,
            a("1.2.3.4:1"),
            a("5.6.7.8:2"),
        );
        let with = |i: usize, b: u8| {
            let mut bytes = v4.clone();
            bytes[i] = b;
            bytes
        };
        assert_eq!(decode_stream(&with(12, 0x11)), Err(DecodeError::Version(1)));
        assert_eq!(decode_stream(&with(12, 0x22)), Err(DecodeError::Command(2)));
        assert_eq!(
            decode_stream(&with(13, 0x13)),
            Err(DecodeError::Family(0x13))
        );
        assert_eq!(
            decode_stream(&with(13, 0x41)),
            Err(DecodeError::Family(0x41))
        );
        assert_eq!(
            decode_stream(&with(15, 4)),
            Err(DecodeError::ShortAddresses(4))
        );
        assert_eq!(
            decode_stream(&with(14, 0xff)),
            Err(DecodeError::TooLong(16 + 0xff0c))
        );
        assert!(matches!(
            decode_stream(&with(13, 0x12)),
            Err(DecodeError::WrongTransport { .. })
        ));
        assert!(matches!(
            decode_datagram(&v4),
            Err(DecodeError::WrongTransport { .. })
        ));
        assert_eq!(decode_datagram(&v4[..20]), Err(DecodeError::Truncated));
        assert_eq!(
            decode_datagram(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
            Err(DecodeError::V1OverUdp)
        );
        // A TLV whose length runs past the header.
        let mut tlv = v4.clone();
        tlv[15] = 12 + 4;
        tlv.extend_from_slice(&[0x04, 0x00, 0x05, 0xaa]);
        assert_eq!(decode_stream(&tlv), Err(DecodeError::Tlv));
    }
}
