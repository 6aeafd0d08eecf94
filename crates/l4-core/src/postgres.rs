//! The start of a PostgreSQL connection, sans-io. A classic client asks for TLS with an
//! 8-byte SSLRequest and waits for `S` before its ClientHello (which libpq sends with SNI
//! by default); PostgreSQL 17 clients with `sslnegotiation=direct` start with the
//! ClientHello itself. A GSSENCRequest may come first (libpq built with GSSAPI tries it
//! when it holds credentials); answering `N` makes the client go on to the SSLRequest.

/// An SSLRequest: length 8, code 80877103.
pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
/// A GSSENCRequest: length 8, code 80877104.
pub const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
/// The server's answer that it will speak TLS.
pub const WILL_TLS: u8 = b'S';
/// The server's answer that it will not (to a GSSENCRequest).
pub const WONT: u8 = b'N';

/// What the first bytes of a PostgreSQL connection are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preamble {
    /// Too few bytes to tell.
    NeedMore,
    /// An SSLRequest (8 bytes to consume).
    SslRequest,
    /// A GSSENCRequest (8 bytes to consume).
    GssEncRequest,
    /// A TLS record: direct TLS negotiation.
    DirectTls,
    /// Anything else (a plaintext StartupMessage, a CancelRequest): relay untouched.
    Other,
}

/// Classifies the first bytes of a connection.
pub fn classify(bytes: &[u8]) -> Preamble {
    if bytes.first() == Some(&0x16) {
        return Preamble::DirectTls;
    }
    let n = bytes.len().min(8);
    if bytes[..n] == SSL_REQUEST[..n] || bytes[..n] == GSSENC_REQUEST[..n] {
        if n < 8 {
            return Preamble::NeedMore;
        }
        return if bytes[..8] == SSL_REQUEST {
            Preamble::SslRequest
        } else {
            Preamble::GssEncRequest
        };
    }
    if bytes.is_empty() {
        Preamble::NeedMore
    } else {
        Preamble::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_each_start() {
        assert_eq!(classify(&SSL_REQUEST), Preamble::SslRequest);
        assert_eq!(classify(&GSSENC_REQUEST), Preamble::GssEncRequest);
        for cut in 0..8 {
            assert_eq!(classify(&SSL_REQUEST[..cut]), Preamble::NeedMore);
        }
        assert_eq!(classify(&[0x16, 3, 1]), Preamble::DirectTls);
        // A StartupMessage (protocol 3.0) and a CancelRequest.
        assert_eq!(classify(&[0, 0, 0, 40, 0, 3, 0, 0]), Preamble::Other);
        assert_eq!(
            classify(&[0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e]),
            Preamble::Other
        );
        assert_eq!(classify(&[0, 0, 0, 9]), Preamble::Other);
    }
}
