//! Real peers: nginx reading the PROXY protocol header that l4lb sends.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

use crate::harness::*;

/// Starts nginx on a free port with `proxy_protocol` on its listener; it answers every
/// request with the client address it learned from the header.
pub fn nginx_with_proxy_protocol() -> (Peer, SocketAddr) {
    let port = peer_port(0);
    let nginx = start_nginx(&format!(
        "  server {{\n    listen 127.0.0.1:{port} proxy_protocol;\n    location / {{ return 200 \"$proxy_protocol_addr $proxy_protocol_port\"; }}\n  }}"
    ));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_accepting(addr, "nginx");
    (nginx, addr)
}

pub async fn ask_through(lb: SocketAddr, from: &str) -> (String, u16) {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse().unwrap(), 0))
        .unwrap();
    let mut s = socket.connect(lb).await.unwrap();
    let port = s.local_addr().unwrap().port();
    s.write_all(b"GET / HTTP/1.0\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut response))
        .await
        .unwrap()
        .unwrap();
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (body, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_learns_the_real_client_address_from_proxy_protocol_v1_and_v2() {
    let (_nginx, backend) = nginx_with_proxy_protocol();
    for version in ["v1", "v2"] {
        let lb = Balancer::start(&config(
            &[backend],
            &format!("proxy_protocol: {version}"),
            "",
        ));
        let (body, port) = ask_through(lb.addr(), "127.0.0.7").await;
        assert_eq!(body, format!("127.0.0.7 {port}"), "PROXY {version}");
    }
}
