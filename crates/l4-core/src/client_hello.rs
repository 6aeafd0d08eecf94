//! Reading the server name (SNI) from a TLS ClientHello, sans-io: the caller passes every
//! byte the client has sent so far (peeked, not consumed) and learns whether more are
//! needed. The handshake message is reassembled across TLS records and so across TCP
//! segments: a post-quantum key share (X25519MLKEM768 adds 1,216 bytes) no longer fits
//! one segment, and clients may split it over records, where parsers that read one
//! segment or one record fail (ingress-nginx #11498, caddy-l4 #346, golang/go#70047).
//!
//! Every length is checked before use, the message is bounded by [`MAX_HELLO`], and no
//! input makes it panic (it runs under a fuzzer).

/// The largest ClientHello handshake message accepted (the TLS record payload limit,
/// 2^14; real ones are under 2 KiB even with post-quantum key shares).
pub const MAX_HELLO: usize = 16 * 1024;
/// How many bytes a caller needs to see at most to decide: the message and the record
/// headers of a reasonable split (up to 200 records).
pub const MAX_PREREAD: usize = MAX_HELLO + 4 + 5 * 200;

const RECORD_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXTENSION_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;

/// What the bytes so far amount to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A valid beginning of a TLS handshake: wait for more bytes.
    NeedMore,
    /// Not TLS (the first record is not a handshake): route without SNI.
    NotTls,
    /// A complete ClientHello, with its server name if it sent one (lowercase, without a
    /// trailing dot).
    Complete(Option<String>),
}

/// Why a TLS handshake start could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// A record that is not a handshake record interrupts the ClientHello.
    #[error("a record of type {0} inside the ClientHello")]
    Interleaved(u8),
    /// A record header outside TLS (version, empty or oversized record).
    #[error("bad TLS record header: {0}")]
    Record(&'static str),
    /// The first handshake message is not a ClientHello.
    #[error("the first handshake message is of type {0}, not ClientHello")]
    NotClientHello(u8),
    /// Larger than [`MAX_HELLO`].
    #[error("ClientHello of {0} bytes (at most {MAX_HELLO} read)")]
    TooLarge(usize),
    /// The message itself breaks its own lengths.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    /// The server_name extension holds something that is not a host name.
    #[error("server name is not a valid host name")]
    BadName,
}

/// Reads the ClientHello at the start of `bytes`.
pub fn parse(bytes: &[u8]) -> Result<Hello, HelloError> {
    match bytes.first() {
        None => return Ok(Hello::NeedMore),
        Some(&RECORD_HANDSHAKE) => {}
        Some(_) => return Ok(Hello::NotTls),
    }
    // Reassemble the handshake message from the records' fragments. Only a multi-record
    // hello copies; the usual single record is parsed in place.
    let mut message: Vec<u8> = Vec::new();
    let mut single: Option<&[u8]> = None;
    let mut rest = bytes;
    loop {
        if rest.len() < 5 {
            return Ok(Hello::NeedMore);
        }
        if rest[0] != RECORD_HANDSHAKE {
            return Err(HelloError::Interleaved(rest[0]));
        }
        if rest[1] != 3 {
            // SSLv2-style and anything else: not a TLS record layer.
            return Err(HelloError::Record("version major is not 3"));
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if len == 0 {
            return Err(HelloError::Record("empty handshake record"));
        }
        if len > 1 << 14 {
            return Err(HelloError::Record("record longer than 2^14 bytes"));
        }
        let available = &rest[5..];
        let fragment = &available[..len.min(available.len())];
        let gathered: &[u8] = match single {
            None if message.is_empty() => {
                single = Some(fragment);
                fragment
            }
            _ => {
                if let Some(first) = single.take() {
                    message.extend_from_slice(first);
                }
                message.extend_from_slice(fragment);
                &message
            }
        };
        if gathered.len() >= 4 {
            if gathered[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(HelloError::NotClientHello(gathered[0]));
            }
            let body_len = usize::from(gathered[1]) << 16
                | usize::from(gathered[2]) << 8
                | usize::from(gathered[3]);
            if body_len + 4 > MAX_HELLO {
                return Err(HelloError::TooLarge(body_len + 4));
            }
            if gathered.len() >= 4 + body_len {
                return read_server_name(&gathered[4..4 + body_len]).map(Hello::Complete);
            }
        }
        if fragment.len() < len {
            return Ok(Hello::NeedMore);
        }
        rest = &available[len..];
    }
}

/// A cursor over a message that refuses to read past its end.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HelloError> {
        if self.rest.len() < n {
            return Err(HelloError::Malformed("a length runs past the end"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, HelloError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, HelloError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn vec8(&mut self) -> Result<&'a [u8], HelloError> {
        let n = usize::from(self.u8()?);
        self.take(n)
    }

    fn vec16(&mut self) -> Result<&'a [u8], HelloError> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
}

/// The server name in a ClientHello body (RFC 8446 4.1.2, RFC 6066 3).
fn read_server_name(body: &[u8]) -> Result<Option<String>, HelloError> {
    let mut r = Reader { rest: body };
    let _legacy_version = r.u16()?;
    let _random = r.take(32)?;
    if r.vec8()?.len() > 32 {
        return Err(HelloError::Malformed("session id longer than 32 bytes"));
    }
    let suites = r.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(HelloError::Malformed("cipher suites"));
    }
    if r.vec8()?.is_empty() {
        return Err(HelloError::Malformed("no compression methods"));
    }
    if r.rest.is_empty() {
        // A hello without extensions (SSL 3.0 style) has no server name.
        return Ok(None);
    }
    let mut extensions = Reader { rest: r.vec16()? };
    if !r.rest.is_empty() {
        return Err(HelloError::Malformed("bytes after the extensions"));
    }
    let mut name = None;
    while !extensions.rest.is_empty() {
        let kind = extensions.u16()?;
        let data = extensions.vec16()?;
        if kind == EXTENSION_SERVER_NAME {
            if name.is_some() {
                return Err(HelloError::Malformed("two server_name extensions"));
            }
            name = Some(host_name(data)?);
        }
    }
    Ok(name.flatten())
}

/// The host_name entry of a server_name extension, validated and normalised.
fn host_name(data: &[u8]) -> Result<Option<String>, HelloError> {
    let mut r = Reader { rest: data };
    let mut list = Reader { rest: r.vec16()? };
    if !r.rest.is_empty() {
        return Err(HelloError::Malformed("bytes after the server name list"));
    }
    while !list.rest.is_empty() {
        let kind = list.u8()?;
        let name = list.vec16()?;
        if kind == NAME_TYPE_HOST {
            return normalise(name).map(Some);
        }
    }
    Ok(None)
}

/// Lowercase ASCII letters, digits, `-`, `_` and dots, 1 to 253 characters once a trailing
/// dot is dropped, no empty label. Anything else (IP literals are not allowed in SNI
/// either) is refused rather than matched against routes.
fn normalise(name: &[u8]) -> Result<String, HelloError> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    let valid_chars = name
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if name.is_empty()
        || name.len() > 253
        || !valid_chars
        || name.split(|&b| b == b'.').any(<[u8]>::is_empty)
    {
        return Err(HelloError::BadName);
    }
    Ok(name
        .iter()
        .map(|b| char::from(b.to_ascii_lowercase()))
        .collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A ClientHello body with the given extensions (type, data), as a handshake message.
    pub(crate) fn hello_message(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(32);
        body.extend_from_slice(&[9; 32]);
        body.extend_from_slice(&[0, 4, 0x13, 0x01, 0x13, 0x02]);
        body.extend_from_slice(&[1, 0]);
        let mut ext = Vec::new();
        for (kind, data) in extensions {
            ext.extend_from_slice(&kind.to_be_bytes());
            ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
            ext.extend_from_slice(data);
        }
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut message = vec![1];
        message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend_from_slice(&body);
        message
    }

    pub(crate) fn sni_extension(name: &str) -> (u16, Vec<u8>) {
        let mut entry = vec![0];
        entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
        entry.extend_from_slice(name.as_bytes());
        let mut data = (entry.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&entry);
        (0, data)
    }

    /// `message` framed as TLS records of at most `size` bytes each.
    pub(crate) fn records(message: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in message.chunks(size) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    #[test]
    fn reads_the_name_from_one_record() {
        let bytes = records(
            &hello_message(&[(10, vec![0, 2, 0, 29]), sni_extension("A.Test.")]),
            1 << 14,
        );
        assert_eq!(parse(&bytes), Ok(Hello::Complete(Some("a.test".into()))));
    }

    #[test]
    fn every_prefix_asks_for_more_and_split_records_reassemble() {
        let big = (0x11ec, vec![0x5a; 1500]);
        let message = hello_message(&[(0x0a0a, vec![]), big, sni_extension("b.test")]);
        assert!(message.len() > 1500);
        for size in [1, 7, 100, 600, 1 << 14] {
            let bytes = records(&message, size);
            assert_eq!(
                parse(&bytes),
                Ok(Hello::Complete(Some("b.test".into()))),
                "records of {size}"
            );
            for cut in 0..bytes.len() {
                assert_eq!(
                    parse(&bytes[..cut]),
                    Ok(Hello::NeedMore),
                    "records of {size}, cut {cut}"
                );
            }
        }
    }

    #[test]
    fn no_name_and_not_tls() {
        let bytes = records(&hello_message(&[(10, vec![0, 2, 0, 29])]), 1 << 14);
        assert_eq!(parse(&bytes), Ok(Hello::Complete(None)));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Ok(Hello::NotTls));
        assert_eq!(parse(&[0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f]), Ok(Hello::NotTls));
    }

    #[test]
    fn refuses_malformed_input() {
        let good = hello_message(&[sni_extension("a.test")]);
        let mut wrong_type = good.clone();
        wrong_type[0] = 2;
        assert_eq!(
            parse(&records(&wrong_type, 1 << 14)),
            Err(HelloError::NotClientHello(2))
        );
        let mut alert_inside = records(&good[..10], 100);
        alert_inside.extend_from_slice(&[21, 3, 3, 0, 2, 2, 40]);
        assert_eq!(parse(&alert_inside), Err(HelloError::Interleaved(21)));
        assert!(parse(&[22, 3, 1, 0, 0]).is_err());
        assert!(parse(&[22, 2, 0, 0, 5]).is_err());
        let mut huge = vec![1, 0, 0x80, 0];
        huge.extend_from_slice(&[0; 100]);
        assert_eq!(
            parse(&records(&huge, 1 << 14)),
            Err(HelloError::TooLarge(0x8004))
        );
        for name in ["", "a..b", "a b", "é.test", "."] {
            let message = hello_message(&[sni_extension(name)]);
            assert_eq!(
                parse(&records(&message, 1 << 14)),
                Err(HelloError::BadName),
                "{name:?}"
            );
        }
        // A body shorter than its own extension lengths.
        let mut short = good.clone();
        let n = short.len();
        short[n - 1] = b'x';
        short.truncate(n - 3);
        let len = (short.len() - 4) as u32;
        short[1..4].copy_from_slice(&len.to_be_bytes()[1..]);
        assert!(parse(&records(&short, 1 << 14)).is_err());
    }
}
