//! Sockets for unit tests: real loopback connections.

use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// A connected pair on loopback: (the accepted end, the connecting end), the connecting
/// end with `receive_buffer` bytes of receive buffer if given.
pub(crate) async fn connected_pair(receive_buffer: Option<u32>) -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    if let Some(size) = receive_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let connecting = socket
        .connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, _) = listener.accept().await.unwrap();
    (accepted, connecting)
}
