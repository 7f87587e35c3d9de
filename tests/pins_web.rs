//! Pins from a mutation review of the HTTP entrypoint: a body found over `MAX_MESSAGE_SIZE`
//! as it is read (chunked, no `content-length` to refuse it by) is `too_large`, as one
//! announced over it is.
#![cfg(feature = "http")]

mod common;

use common::{config, unique};
use micro_framework::http::HttpEntrypoint;
use micro_framework::prelude::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn echo(Payload(body): Payload<Value>) -> Value {
    body
}

/// A chunked body over MAX_MESSAGE_SIZE, found too large only as it is read, gets 413
/// `too_large` naming the limit, and is counted as refused for that reason. Mutant: such a
/// body answered as `bad_input` (the 413 of the body reader, with its own text).
#[tokio::test]
async fn a_chunked_body_over_the_limit_is_too_large() {
    let uri = format!("memory://{}", unique("pins-web"));
    let config = config(&uri, "pins_chunked")
        .with_web_server_address("127.0.0.1:0".into())
        .with_max_message_size(1024);
    let routes = vec![Route::new(echo).entrypoint(HttpEntrypoint::post("/echo"))];
    let service = Runner::new(routes, config).spawn().await.unwrap();
    let address = service.web_address().unwrap();
    let mut socket = TcpStream::connect(address).await.unwrap();
    let body = format!("\"{}\"", "x".repeat(2000));
    let request = format!(
        "POST /echo HTTP/1.1\r\nhost: test\r\nconnection: close\r\ncontent-type: application/json\r\n\
         transfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    socket.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    let json = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    let json: Value = serde_json::from_str(json).unwrap();
    assert_eq!(json["error"], "too_large", "{json}");
    let message = json["message"].as_str().unwrap();
    assert!(message.contains("MAX_MESSAGE_SIZE (1024 bytes)"), "{message}");
    assert_eq!(service.route("echo").unwrap().stats().received_count(), 0);
    #[cfg(feature = "metrics")]
    {
        let metrics = service.metrics().render();
        let line =
            "requests_refused_total{context=\"default\",reason=\"too_large\",route=\"echo\"} 1";
        assert!(metrics.lines().any(|l| l == line), "{line} not in {metrics}");
    }
    service.stop().await.unwrap();
}
