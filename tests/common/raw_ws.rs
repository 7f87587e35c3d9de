//! A WebSocket client on a plain socket, read at the pace a test chooses.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A connection to the WebSocket server at `address`, its handshake made by hand and
/// accepted (`101`).
pub async fn open(address: SocketAddr) -> TcpStream {
    let mut socket = TcpStream::connect(address).await.unwrap();
    let handshake = format!(
        "GET / HTTP/1.1\r\nhost: {address}\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
    );
    socket.write_all(handshake.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        socket.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    socket
}

/// `text` as a client's final text frame, masked with a zero mask; `text` is under 126 bytes.
pub fn text_frame(text: &str) -> Vec<u8> {
    let mut frame = vec![0x81u8, 0x80 | u8::try_from(text.len()).unwrap(), 0, 0, 0, 0];
    frame.extend_from_slice(text.as_bytes());
    frame
}

/// The bytes of the frame replying `repeat(size)`: its header (10 bytes) and its JSON around
/// the string of `size` bytes.
pub fn repeat_reply_len(size: usize) -> usize {
    size + r#"{"data":"","exception":null}"#.len() + 10
}
