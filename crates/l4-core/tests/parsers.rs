//! The parsers of network input, on golden fixtures and under a fuzzer.
//!
//! The tests named after a parser are bolero harnesses: `cargo test` runs it over its committed seed
//! corpus (`tests/__fuzz__/<name>/corpus`, seeded with the fixtures) and a bounded number
//! of random inputs; `cargo bolero test --package l4-core <name>` runs the same harness
//! under libFuzzer (nightly), unbounded. Beyond "never panics", each checks the property
//! routing relies on: as bytes arrive, the answer is "need more" until it is the final
//! decision, and then stays that decision whatever follows (so routing never depends on
//! bytes that have not arrived, nor on bytes after the ClientHello).
#![allow(clippy::unwrap_used)]

use l4_core::client_hello::{self, Hello};
use l4_core::postgres::{self, Preamble};
use l4_core::proxy_protocol::{decode_datagram, decode_stream, Decoded};

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn assert_needs_more_before(bytes: &[u8]) {
    for cut in 0..bytes.len() {
        assert_eq!(
            client_hello::parse(&bytes[..cut]),
            Ok(Hello::NeedMore),
            "after {cut} of {} bytes",
            bytes.len()
        );
    }
}

/// As `bytes` arrive one at a time, the answer is `NeedMore` until it becomes `decided`,
/// and stays `decided` from then on.
fn assert_decided_once(bytes: &[u8], decided: &Result<Hello, client_hello::HelloError>) {
    let mut settled = false;
    for cut in 0..=bytes.len() {
        let now = client_hello::parse(&bytes[..cut]);
        if settled {
            assert_eq!(&now, decided, "changed its mind at {cut} bytes");
        } else if now != Ok(Hello::NeedMore) {
            assert_eq!(&now, decided, "decided early at {cut} bytes");
            settled = true;
        }
    }
}

#[test]
fn golden_client_hello_from_openssl() {
    let hello = fixture("client_hello_openssl.bin");
    assert_eq!(
        client_hello::parse(&hello),
        Ok(Hello::Complete(Some("openssl.test".into())))
    );
    assert_needs_more_before(&hello);
}

#[test]
fn golden_client_hello_over_three_records() {
    let hello = fixture("client_hello_three_records.bin");
    let mut rest = &hello[..];
    let mut records = 0;
    while rest.len() >= 5 {
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        rest = &rest[5 + len..];
        records += 1;
    }
    assert_eq!(records, 3);
    assert_eq!(
        client_hello::parse(&hello),
        Ok(Hello::Complete(Some("openssl.test".into())))
    );
    assert_needs_more_before(&hello);
}

#[test]
fn golden_post_quantum_client_hello_with_grease() {
    let hello = fixture("client_hello_pq_grease.bin");
    assert!(hello.len() > 1500, "spans more than one TCP segment");
    assert_eq!(
        client_hello::parse(&hello),
        Ok(Hello::Complete(Some("pq.test".into())))
    );
    assert_needs_more_before(&hello);
    // As the TCP segments of a 1,460-byte MSS deliver it.
    assert_eq!(client_hello::parse(&hello[..1460]), Ok(Hello::NeedMore));
}

#[test]
fn golden_proxy_v2_header_with_tlvs() {
    let bytes = fixture("proxy_v2_tlvs.bin");
    let Ok(Decoded::Header(header)) = decode_stream(&bytes) else {
        panic!("not a header");
    };
    assert_eq!(
        header.tlvs, 4,
        "ALPN, authority, unique id, SSL (its sub-TLV inside)"
    );
    assert_eq!(&bytes[header.len..], b"payload");
    let (client, reached) = header.addresses.unwrap();
    assert_eq!(client, "192.0.2.10:50000".parse().unwrap());
    assert_eq!(reached, "198.51.100.20:443".parse().unwrap());
}

#[test]
fn client_hello() {
    bolero::check!().for_each(|input: &[u8]| {
        let decided = client_hello::parse(input);
        if let Ok(Hello::Complete(name)) = &decided {
            if let Some(name) = name {
                assert!(!name.is_empty() && name.len() <= 253);
                assert!(!name.bytes().any(|b| b.is_ascii_uppercase()));
            }
            let mut longer = input.to_vec();
            longer.extend_from_slice(&[23, 3, 3, 0, 1, 0]);
            assert_eq!(client_hello::parse(&longer), decided);
            if input.len() <= 4096 {
                assert_decided_once(input, &decided);
            }
        }
    });
}

#[test]
fn proxy_header_stream() {
    bolero::check!().for_each(|input: &[u8]| {
        if let Ok(Decoded::Header(header)) = decode_stream(input) {
            assert!(header.len <= input.len());
            let exact = decode_stream(&input[..header.len]);
            assert_eq!(exact, Ok(Decoded::Header(header.clone())));
            // The header ends where it says: before that, only "read more".
            for cut in 0..header.len {
                assert!(
                    matches!(decode_stream(&input[..cut]), Ok(Decoded::Incomplete(_))),
                    "prefix of {cut} bytes"
                );
            }
        }
    });
}

#[test]
fn proxy_header_datagram() {
    bolero::check!().for_each(|input: &[u8]| {
        if let Ok(header) = decode_datagram(input) {
            assert!(header.len >= 16 && header.len <= input.len());
        }
    });
}

#[test]
fn postgres_preamble() {
    bolero::check!().for_each(|input: &[u8]| {
        let preamble = postgres::classify(input);
        match preamble {
            Preamble::SslRequest => assert!(input.starts_with(&postgres::SSL_REQUEST)),
            Preamble::GssEncRequest => assert!(input.starts_with(&postgres::GSSENC_REQUEST)),
            Preamble::NeedMore => assert!(input.len() < 8),
            Preamble::DirectTls => assert_eq!(input.first(), Some(&0x16)),
            Preamble::Other => {}
        }
    });
}
