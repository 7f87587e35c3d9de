//! Pins from a mutation review of the web servers: a body found over `MAX_MESSAGE_SIZE` as
//! it is read (chunked, no `content-length` to refuse it by) is `too_large`, as one announced
//! over it is; a WebSocket client's idle timeout and a reply it reads steadily, by tokio's
//! paused clock, where every deadline is exact.

mod common;

#[cfg(feature = "http")]
mod http {
    use crate::common::{config, unique};
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
}

#[cfg(feature = "websocket")]
mod websocket {
    use std::future::Future;
    use std::net::SocketAddr;
    use std::time::Duration;

    use crate::common::unique;
    use futures::{SinkExt, StreamExt};
    use micro_framework::amqp::rpc::Args;
    use micro_framework::prelude::*;
    use micro_framework::websocket::WebSocketEntrypoint;
    use micro_framework::RunningService;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::Instant;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::Message;

    const IDLE: Duration = Duration::from_secs(1);

    /// Run `test` on a runtime of its own whose clock is paused (it moves on when every task
    /// waits), on a thread of its own. A task that never waits holds that clock still and the
    /// test with it: the thread is given up on after 30 s, a guard against a hang and no
    /// measure of the test.
    fn on_paused_clock<F: Future<Output = ()> + 'static>(
        test: impl FnOnce() -> F + Send + 'static,
    ) {
        let (done, ended) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .unwrap();
            runtime.block_on(test());
            let _ = done.send(());
        });
        ended
            .recv_timeout(Duration::from_secs(30))
            .expect("the test ends (a task that never waits holds the paused clock still)");
    }

    fn repeat(Args((n,)): Args<(usize,)>) -> String {
        "x".repeat(n)
    }

    async fn start(service: &str) -> (RunningService, SocketAddr) {
        let config = Config::new(unique(service))
            .with_amqp_uri(format!("memory://{}", unique("pins-ws")))
            .with_websocket_ip("127.0.0.1".into())
            .with_websocket_port(0)
            .with_websocket_idle_timeout(IDLE);
        let routes = vec![Route::new(repeat).entrypoint(WebSocketEntrypoint::new())];
        let service = Runner::new(routes, config).spawn().await.unwrap();
        let address = service.websocket_address().expect("the service listens");
        (service, address)
    }

    /// A silent client is closed (1000, "idle timeout") exactly WEBSOCKET_IDLE_TIMEOUT after
    /// its last byte, here the first fragment of a message, not after its last whole message.
    /// Mutants: the fragment's bytes not counted (closed a second after the handshake), and the
    /// deadline taken for not yet passed when it is reached exactly (the connection's task
    /// spins on it and never closes).
    #[test]
    fn a_client_is_closed_as_idle_exactly_the_idle_timeout_after_its_last_byte() {
        on_paused_clock(|| async {
            let (service, address) = start("pins_ws_idle").await;
            let (mut socket, _) =
                tokio_tungstenite::connect_async(format!("ws://{address}")).await.unwrap();
            tokio::time::sleep(IDLE * 9 / 10).await;
            let fragment = Frame::message(b"{\"comm".to_vec(), OpCode::Data(Data::Text), false);
            socket.send(Message::Frame(fragment)).await.unwrap();
            let last_byte = Instant::now();
            let closed = socket.next().await;
            let quiet = last_byte.elapsed();
            let Some(Ok(Message::Close(Some(frame)))) = closed else {
                panic!("no close frame: {closed:?}");
            };
            assert_eq!((frame.code, frame.reason.as_str()), (CloseCode::Normal, "idle timeout"));
            assert!(quiet >= IDLE && quiet < IDLE + Duration::from_millis(10), "after {quiet:?}");
            service.stop().await.unwrap();
        });
    }

    /// A client that reads a large reply steadily, 64 KiB every 10 ms, gets all of it though
    /// sending it takes many idle timeouts. Mutant: the send's deadline counted from its start,
    /// the reply cut after a second.
    #[test]
    fn a_reply_read_steadily_is_sent_whole_however_long_it_takes() {
        on_paused_clock(|| async {
            let (service, address) = start("pins_ws_steady").await;
            let mut socket = crate::common::raw_ws::open(address).await;
            let size: usize = 16 << 20;
            let request = serde_json::json!({"command": "repeat", "command_args": [size]});
            socket
                .write_all(&crate::common::raw_ws::text_frame(&request.to_string()))
                .await
                .unwrap();
            let expected = crate::common::raw_ws::repeat_reply_len(size);
            let mut received = 0;
            let mut buffer = vec![0u8; 64 * 1024];
            let started = Instant::now();
            while received < expected {
                match socket.read(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(read) => received += read,
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let took = started.elapsed();
            assert_eq!(received, expected, "{received} of {expected} after {took:?}");
            assert!(took > IDLE * 2, "read in {took:?}: too fast to test the idle timeout");
            service.stop().await.unwrap();
        });
    }
}
