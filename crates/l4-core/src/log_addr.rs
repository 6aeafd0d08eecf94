//! Socket addresses as log fields, written without `core::fmt`'s per-octet machinery.
//!
//! Every proxied connection logs two addresses (the client in its span, the backend in its
//! access line). `SocketAddrV4`'s own `Display` formats the address into a buffer and then
//! each octet and the port through `core::fmt` padding: about 1,500 instructions per
//! address, a tenth of what l4lb's code does per connection once the log line itself is
//! cheap (callgrind). [`LogAddr`] writes the same text from a stack buffer in one call.

use std::fmt;
use std::net::SocketAddr;

/// Displays exactly as [`SocketAddr`] does; IPv4 without `core::fmt` (IPv6, and any
/// width or precision asked for, go to the standard `Display`).
#[derive(Clone, Copy, Debug)]
pub struct LogAddr(pub SocketAddr);

impl fmt::Display for LogAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            SocketAddr::V4(v4) if f.width().is_none() && f.precision().is_none() => {
                // "255.255.255.255:65535" is 21 bytes.
                let mut buf = [0u8; 21];
                let mut len = 0;
                for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                    if i > 0 {
                        buf[len] = b'.';
                        len += 1;
                    }
                    len += decimal(u32::from(octet), &mut buf[len..]);
                }
                buf[len] = b':';
                len += 1;
                len += decimal(u32::from(v4.port()), &mut buf[len..]);
                // Only ASCII digits, dots and a colon were written.
                f.write_str(std::str::from_utf8(&buf[..len]).map_err(|_| fmt::Error)?)
            }
            addr => fmt::Display::fmt(&addr, f),
        }
    }
}

/// Writes `n` (at most 65535) in decimal at the start of `out`; returns the digits written.
fn decimal(mut n: u32, out: &mut [u8]) -> usize {
    let mut digits = [0u8; 5];
    let mut count = 0;
    loop {
        digits[count] = b'0' + (n % 10) as u8;
        count += 1;
        n /= 10;
        if n == 0 || count == digits.len() {
            break;
        }
    }
    for (slot, digit) in out.iter_mut().zip(digits[..count].iter().rev()) {
        *slot = *digit;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn writes_what_socket_addr_writes(ip in any::<[u8; 4]>(), port in any::<u16>(), v6 in any::<[u16; 8]>()) {
            let v4 = SocketAddr::from((ip, port));
            prop_assert_eq!(LogAddr(v4).to_string(), v4.to_string());
            let v6 = SocketAddr::from((v6, port));
            prop_assert_eq!(LogAddr(v6).to_string(), v6.to_string());
        }
    }

    #[test]
    fn extremes_and_padding_match_too() {
        for text in [
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "127.0.0.1:9",
            "[::1]:443",
        ] {
            let addr: SocketAddr = text.parse().unwrap();
            assert_eq!(LogAddr(addr).to_string(), text);
            assert_eq!(format!("{:>25}", LogAddr(addr)), format!("{addr:>25}"));
        }
    }
}
