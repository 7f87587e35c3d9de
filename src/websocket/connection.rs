//! One client connection: read request frames, run their calls concurrently, send each reply
//! when its call finishes. A client that sends no byte for `WEBSOCKET_IDLE_TIMEOUT` while
//! none of its calls runs is closed (1000, "idle timeout"), and so is one that does not
//! finish its handshake in that time (at most [`HANDSHAKE_TIMEOUT`]). One that takes no byte
//! of a reply for as long (its buffers full, a send waiting), or that has not taken all of it
//! [`CLOSE_WAIT`] after the service stops, is dropped. A frame too big is answered with 1009,
//! text that is not UTF-8 with 1007. A handshake from a web page whose origin is not allowed
//! (`WEBSOCKET_ALLOWED_ORIGINS`) is answered `403` and closed, and one that came while every
//! slot was taken (`WEBSOCKET_MAX_CONNECTIONS`) `503`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use crate::clock::{deadline_after, deadline_from};
use crate::metrics::Metrics;
use crate::web_server::Watched;
use crate::websocket::admission::Admission;
use crate::websocket::dispatch::{dispatch, Step};
use crate::websocket::handshake::HandshakeCheck;
use crate::websocket::origin::OriginPolicy;
use crate::websocket::registry::WsRegistry;
use crate::websocket::traffic::Traffic;
use crate::websocket::{frame_limits, HANDSHAKE_TIMEOUT};

/// The handshake borrows the stream, so that a request it fails is answered on the stream:
/// a connection holds one descriptor, also while it is refused.
type Socket<'a> = WebSocketStream<&'a mut Watched<Traffic>>;

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
    /// The client sent a text frame that is not UTF-8: close with 1007 (invalid data).
    NotUtf8,
    /// The client sent no byte for `WEBSOCKET_IDLE_TIMEOUT`: close with 1000.
    Idle,
}

/// What every connection of one server is served with.
pub(crate) struct ClientTerms {
    pub(crate) metrics: Metrics,
    /// The commands served.
    pub(crate) registry: Arc<WsRegistry>,
    /// The web pages' origins whose handshakes are taken.
    pub(crate) origins: OriginPolicy,
    /// `WEBSOCKET_IDLE_TIMEOUT`.
    pub(crate) idle: Duration,
    /// Fires when the service begins to stop.
    pub(crate) stopping: CancellationToken,
}

/// Serve the client at `peer` until it leaves, stays silent for `terms.idle`, or the service
/// stops; refuse its handshake if its `admission` is a refusal, or if its `Origin` is not one
/// `terms.origins` allows. The admission's slot is held until then.
pub(crate) async fn serve_client(
    terms: Arc<ClientTerms>,
    admission: Admission,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let ClientTerms { metrics, registry, origins, idle, stopping } = &*terms;
    let idle = *idle;
    let traffic = Arc::new(Traffic::new());
    let mut stream = Watched::new(stream, traffic.clone());
    let busy = admission.is_refused();
    let check = HandshakeCheck { origins, busy, metrics, peer };
    let handshake =
        tokio_tungstenite::accept_hdr_async_with_config(&mut stream, check, Some(frame_limits()));
    let handshake = tokio::select! {
        _ = stopping.cancelled() => return,
        handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT.min(idle), handshake) => handshake,
    };
    let mut socket = match handshake {
        Ok(Ok(socket)) => socket,
        Ok(Err(error)) => {
            refuse_request(&mut stream, &error).await;
            return tracing::debug!("WebSocket handshake with {peer} failed: {error}");
        }
        Err(_) => return tracing::debug!("WebSocket handshake with {peer} timed out"),
    };
    tracing::debug!("WebSocket client {peer} connected");
    let _open = metrics.websocket_connection();
    let mut calls: JoinSet<String> = JoinSet::new();
    // The client is idle from the later of its last byte (part of a frame counts) and the end
    // of the last call it waited for, its reply sent.
    let mut quiet_since = Instant::now();
    let idle_until =
        |quiet_since: Instant| deadline_from(traffic.last_read().max(quiet_since), idle);
    let end = loop {
        tokio::select! {
            biased;
            _ = stopping.cancelled() => break End::Stopping,
            Some(done) = calls.join_next() => {
                if let Some(reply) = finished(done) {
                    if !send_within(&mut socket, &traffic, reply, idle, stopping, peer).await {
                        break End::Closed;
                    }
                }
                quiet_since = Instant::now();
            }
            message = socket.next() => {
                let frame = match message {
                    Some(Ok(Message::Text(text))) => text.into(),
                    Some(Ok(Message::Binary(bytes))) => bytes,
                    Some(Ok(_)) => continue, // ping, pong, close: tungstenite answers them
                    Some(Err(WsError::Capacity(error))) => {
                        tracing::warn!("WebSocket client {peer} sent too much: {error}");
                        break End::TooBig;
                    }
                    Some(Err(WsError::Utf8(error))) => {
                        tracing::warn!("WebSocket client {peer} sent text that is not UTF-8: {error}");
                        break End::NotUtf8;
                    }
                    Some(Err(error)) => {
                        tracing::debug!("WebSocket client {peer} failed: {error}");
                        break End::Closed;
                    }
                    None => break End::Closed,
                };
                match dispatch(registry, &frame, calls.len()) {
                    Step::Call(call) => {
                        calls.spawn(call.run());
                    }
                    Step::Reply(reply) => {
                        if !send_within(&mut socket, &traffic, reply, idle, stopping, peer).await {
                            break End::Closed;
                        }
                        quiet_since = Instant::now();
                    }
                }
            }
            // a client waiting for a long call is not idle
            () = tokio::time::sleep_until(idle_until(quiet_since)), if calls.is_empty() => {
                // bytes that came meanwhile moved the deadline: wait for the new one
                if idle_until(quiet_since) <= Instant::now() {
                    tracing::debug!("WebSocket client {peer} idle for {idle:?}: closing");
                    break End::Idle;
                }
            }
        }
    };
    finish(socket, &traffic, calls, end, peer, idle, stopping).await;
}

/// Answer a request that failed the WebSocket handshake with an HTTP error saying why (426
/// for a plain HTTP request, or for a handshake of a version other than 13, which is named so
/// that the client can retry with it; 400 for anything else that is no handshake), then
/// close. Only for request errors: after an I/O error or a timeout there is no one to answer.
/// A handshake the handshake check refused was answered already: it is only closed.
async fn refuse_request(stream: &mut Watched<Traffic>, error: &WsError) {
    use tokio_tungstenite::tungstenite::error::ProtocolError;
    let status = match error {
        // the server's own refusal (the handshake check's `403` or `503`), which tungstenite sent
        WsError::Http(_) => return close_after_reading(stream).await,
        WsError::Protocol(
            ProtocolError::MissingConnectionUpgradeHeader
            | ProtocolError::MissingUpgradeWebSocketHeader,
        ) => "426 Upgrade Required\r\nupgrade: websocket",
        // tungstenite's error for a missing version and for any version but 13 alike
        WsError::Protocol(ProtocolError::MissingSecWebSocketVersionHeader) => {
            "426 Upgrade Required\r\nupgrade: websocket\r\nsec-websocket-version: 13"
        }
        WsError::Protocol(_) | WsError::HttpFormat(_) => "400 Bad Request",
        _ => return,
    };
    let body = format!("this port serves WebSocket connections only: {error}\n");
    let response = format!(
        "HTTP/1.1 {status}\r\nconnection: close\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    // a client that reads nothing cannot hold the task: bounded like a close
    if let Ok(Ok(())) =
        tokio::time::timeout(CLOSE_WAIT, stream.write_all(response.as_bytes())).await
    {
        close_after_reading(stream).await;
    }
}

/// Send `reply` to the client while it takes a byte of it at least every `limit` (as
/// `traffic` sees), and within [`CLOSE_WAIT`] once `stopping` fires. A client that takes
/// nothing for that long (it reads no reply, so its buffers and ours are full) would hold the
/// send, and with it the connection, its task, its idle timer and a graceful stop: it is
/// dropped instead. One that reads a large reply steadily gets all of it.
async fn send_within(
    socket: &mut Socket<'_>,
    traffic: &Traffic,
    reply: String,
    limit: Duration,
    stopping: &CancellationToken,
    peer: SocketAddr,
) -> bool {
    let send = socket.send(Message::text(reply));
    tokio::pin!(send);
    let started = Instant::now();
    let until = || deadline_from(traffic.last_written().max(started), limit);
    // once the service stops, the send's end is fixed: CLOSE_WAIT from then at most
    let mut stop_until: Option<Instant> = None;
    let sent = loop {
        let deadline = stop_until.map_or_else(until, |stop| until().min(stop));
        tokio::select! {
            sent = &mut send => break Some(sent),
            () = stopping.cancelled(), if stop_until.is_none() => {
                stop_until = Some(deadline_after(CLOSE_WAIT));
            }
            () = tokio::time::sleep_until(deadline) => {
                // bytes written meanwhile moved the deadline: wait for the new one
                let deadline = stop_until.map_or_else(until, |stop| until().min(stop));
                if deadline <= Instant::now() {
                    break None;
                }
            }
        }
    };
    match sent {
        Some(Ok(())) => true,
        Some(Err(error)) => {
            tracing::debug!("cannot reply to WebSocket client {peer}: {error}");
            false
        }
        None => {
            tracing::warn!("WebSocket client {peer} took no reply in time: dropped");
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
    mut socket: Socket<'_>,
    traffic: &Traffic,
    mut calls: JoinSet<String>,
    end: End,
    peer: SocketAddr,
    idle: Duration,
    stopping: &CancellationToken,
) {
    let mut open = !matches!(end, End::Closed);
    while let Some(done) = calls.join_next().await {
        if let (Some(reply), true) = (finished(done), open) {
            open = send_within(&mut socket, traffic, reply, idle, stopping, peer).await;
        }
    }
    let frame = match end {
        End::Closed => return tracing::debug!("WebSocket client {peer} left"),
        End::Stopping => CloseFrame { code: CloseCode::Away, reason: "service stopping".into() },
        End::TooBig => CloseFrame { code: CloseCode::Size, reason: "message too big".into() },
        End::NotUtf8 => CloseFrame { code: CloseCode::Invalid, reason: "text not UTF-8".into() },
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
    if matches!(end, End::TooBig | End::NotUtf8) {
        // the rest of a frame too big is unread, and the WebSocket layer reads no more
        // after a bad frame: read raw bytes, so that the close frame is not reset away
        return close_after_reading(socket.get_mut()).await;
    }
    // wait a little for the client's close frame, for a clean close
    let _ =
        tokio::time::timeout(CLOSE_WAIT, async { while let Some(Ok(_)) = socket.next().await {} })
            .await;
}

/// Close the write side of `stream`, then read and discard what the client still sends until
/// it closes too, for at most [`CLOSE_WAIT`]. Closing a socket with unread bytes resets the
/// connection, which can destroy what was last sent before the client reads it.
async fn close_after_reading(stream: &mut (impl AsyncRead + AsyncWrite + Unpin)) {
    let drain = async {
        stream.shutdown().await?;
        let mut sink = [0u8; 8192];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    };
    let _ = tokio::time::timeout(CLOSE_WAIT, drain).await;
}
