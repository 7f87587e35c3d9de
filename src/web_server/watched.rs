//! A client's socket that tells a [`Watcher`] when bytes come in or go out, so that a server
//! times its client out by its last byte, not by its last request or message: the HTTP
//! connections' deadlines and the WebSocket idle timeout and reply sends.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// What follows a client's traffic: told of each read or write that moved bytes.
pub(crate) trait Watcher {
    /// Bytes came from the client.
    fn bytes_read(&self);
    /// Bytes went to the client.
    fn bytes_written(&self);
}

/// The client's socket, telling its [`Watcher`] when bytes come in or go out.
pub(crate) struct Watched<W> {
    stream: TcpStream,
    watcher: Arc<W>,
}

impl<W: Watcher> Watched<W> {
    pub(crate) fn new(stream: TcpStream, watcher: Arc<W>) -> Self {
        Watched { stream, watcher }
    }

    fn written(&self, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Ok(written)) = polled {
            if written > 0 {
                self.watcher.bytes_written();
            }
        }
        polled
    }
}

impl<W: Watcher> AsyncRead for Watched<W> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.watcher.bytes_read();
        }
        polled
    }
}

impl<W: Watcher> AsyncWrite for Watched<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.written(polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.written(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
