//! Real peers: nginx reading the PROXY protocol header that l4lb sends.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::harness::*;

struct Nginx {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nginx_binary() -> &'static str {
    for path in ["/usr/sbin/nginx", "/usr/bin/nginx"] {
        if std::path::Path::new(path).exists() {
            return path;
        }
    }
    panic!("nginx is not installed: scripts/test.sh installs it (apt-get install nginx)");
}

/// Starts nginx on a free port with `proxy_protocol` on its listener; it answers every
/// request with the client address it learned from the header.
async fn nginx_with_proxy_protocol() -> (Nginx, SocketAddr) {
    let port = peer_port(0);
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().display().to_string();
    let conf = format!(
        "daemon off;\nmaster_process off;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {prefix};\n  proxy_temp_path {prefix};\n  fastcgi_temp_path {prefix};\n  uwsgi_temp_path {prefix};\n  scgi_temp_path {prefix};\n\
           server {{\n    listen 127.0.0.1:{port} proxy_protocol;\n    location / {{ return 200 \"$proxy_protocol_addr $proxy_protocol_port\"; }}\n  }}\n}}\n"
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let child = Command::new(nginx_binary())
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Ready once it accepts; bounded.
    let deadline = Instant::now() + PATIENCE;
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "nginx did not start");
        tokio::task::yield_now().await;
    }
    (Nginx { child, _dir: dir }, addr)
}

async fn ask_through(lb: SocketAddr, from: &str) -> (String, u16) {
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
    let (_nginx, backend) = nginx_with_proxy_protocol().await;
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
