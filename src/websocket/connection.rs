//! One client connection: read request frames, run their calls concurrently, send each reply
//! when its call finishes. A client that sends no frame for `WEBSOCKET_IDLE_TIMEOUT` while
//! none of its calls runs is closed (1000, "idle timeout"), and so is one that does not
//! finish its handshake in that time (at most [`HANDSHAKE_TIMEOUT`]). One that takes no
//! reply for as long (its buffers full, a send waiting) is dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use crate::clock::deadline_after;
use crate::websocket::dispatch::{dispatch, Step};
use crate::websocket::registry::WsRegistry;
use crate::websocket::{frame_limits, HANDSHAKE_TIMEOUT};

type Socket = WebSocketStream<TcpStream>;

/// How long a closing connection waits for the client to answer its close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Why a connection stopped reading.
enum End {
    /// The service is stopping: finish the calls, reply, close with 1001 (going away).
    Stopping,
    /// The client closed the connection or it broke.
    Closed,
    /// The client sent a frame past the size limit: close with 1009 (too big).
    TooBig,
    /// The client sent nothing for `WEBSOCKET_IDLE_TIMEOUT`: close with 1000.
    Idle,
}

/// Serve the client at `peer` until it leaves, stays silent for `idle`, or `stopping` fires.
pub(crate) async fn serve_client(
    registry: Arc<WsRegistry>,
    stream: TcpStream,
    peer: SocketAddr,
    idle: Duration,
    stopping: CancellationToken,
) {
    let handshake = tokio_tungstenite::accept_async_with_config(stream, Some(frame_limits()));
    let handshake = tokio::select! {
        _ = stopping.cancelled() => return,
        handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT.min(idle), handshake) => handshake,
    };
    let mut socket = match handshake {
        Ok(Ok(socket)) => socket,
        Ok(Err(error)) => {
            return tracing::debug!("WebSocket handshake with {peer} failed: {error}")
        }
        Err(_) => return tracing::debug!("WebSocket handshake with {peer} timed out"),
    };
    tracing::debug!("WebSocket client {peer} connected");
    let mut calls: JoinSet<String> = JoinSet::new();
    let mut idle_until = deadline_after(idle);
    let end = loop {
        tokio::select! {
            biased;
            _ = stopping.cancelled() => break End::Stopping,
            Some(done) = calls.join_next() => {
                idle_until = deadline_after(idle);
                if let Some(reply) = finished(done) {
                    if !send_within(&mut socket, reply, idle, peer).await {
                        break End::Closed;
                    }
                }
            }
            message = socket.next() => {
                idle_until = deadline_after(idle);
                let frame = match message {
                    Some(Ok(Message::Text(text))) => text.into(),
                    Some(Ok(Message::Binary(bytes))) => bytes,
                    Some(Ok(_)) => continue, // ping, pong, close: tungstenite answers them
                    Some(Err(WsError::Capacity(error))) => {
                        tracing::warn!("WebSocket client {peer} sent too much: {error}");
                        break End::TooBig;
                    }
                    Some(Err(error)) => {
                        tracing::debug!("WebSocket client {peer} failed: {error}");
                        break End::Closed;
                    }
                    None => break End::Closed,
                };
                match dispatch(&registry, &frame, calls.len()) {
                    Step::Call(call) => {
                        calls.spawn(call.run());
                    }
                    Step::Reply(reply) => {
                        if !send_within(&mut socket, reply, idle, peer).await {
                            break End::Closed;
                        }
                    }
                }
            }
            // a client waiting for a long call is not idle
            () = tokio::time::sleep_until(idle_until), if calls.is_empty() => {
                tracing::debug!("WebSocket client {peer} idle for {idle:?}: closing");
                break End::Idle;
            }
        }
    };
    finish(socket, calls, end, peer, idle).await;
}

/// Send `reply` to the client within `limit`. A client that takes nothing for that long
/// (it reads no reply, so its buffers and ours are full) would hold the send, and with it
/// the connection, its task and its idle timer, without end: it is dropped instead.
async fn send_within(
    socket: &mut Socket,
    reply: String,
    limit: Duration,
    peer: SocketAddr,
) -> bool {
    match tokio::time::timeout(limit, socket.send(Message::text(reply))).await {
        Ok(Ok(())) => true,
        Ok(Err(error)) => {
            tracing::debug!("cannot reply to WebSocket client {peer}: {error}");
            false
        }
        Err(_) => {
            tracing::warn!("WebSocket client {peer} took no reply for {limit:?}: dropped");
            false
        }
    }
}

/// The reply of a finished call task (a task that panicked has none).
fn finished(done: Result<String, tokio::task::JoinError>) -> Option<String> {
    done.map_err(|error| tracing::error!("a WebSocket call task failed: {error}")).ok()
}

/// Let the running calls finish (never abort them: they may have started side effects),
/// reply to them while the connection is open, then close it.
async fn finish(
    mut socket: Socket,
    mut calls: JoinSet<String>,
    end: End,
    peer: SocketAddr,
    idle: Duration,
) {
    let mut open = !matches!(end, End::Closed);
    while let Some(done) = calls.join_next().await {
        if let (Some(reply), true) = (finished(done), open) {
            open = send_within(&mut socket, reply, idle, peer).await;
        }
    }
    let frame = match end {
        End::Closed => return tracing::debug!("WebSocket client {peer} left"),
        End::Stopping => CloseFrame { code: CloseCode::Away, reason: "service stopping".into() },
        End::TooBig => CloseFrame { code: CloseCode::Size, reason: "message too big".into() },
        End::Idle => CloseFrame { code: CloseCode::Normal, reason: "idle timeout".into() },
    };
    if !open {
        return;
    }
    match tokio::time::timeout(CLOSE_WAIT, socket.close(Some(frame))).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            return tracing::debug!("cannot close the WebSocket connection of {peer}: {error}")
        }
        Err(_) => return tracing::debug!("WebSocket client {peer} took no close frame"),
    }
    // wait a little for the client's close frame, for a clean close
    let _ =
        tokio::time::timeout(CLOSE_WAIT, async { while let Some(Ok(_)) = socket.next().await {} })
            .await;
}
