//! A lingering close: after a response that left part of its request body unread, the
//! connection's write side is shut (hyper does it once the response is flushed) and what the
//! client still sends is read and thrown away until it ends its side, pauses, or has had its
//! time; only then is the socket closed.
//!
//! Closing a socket with received bytes unread makes Linux answer with a reset, and a client
//! still writing its body (it reads no answer before it has sent it) then gets "broken pipe"
//! or "connection reset" instead of the `413` waiting for it. nginx's `lingering_close` does
//! the same, with the same times: its defaults, which clients have met for years, and that
//! bound what a lingering client costs (a socket and its place under
//! `HTTP_MAX_CONNECTIONS`, no budget nor worker) without a setting of their own.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::deadline_after;

/// The longest pause of a lingering client (nginx's `lingering_timeout`): a client that has
/// read its answer closes at once, and one still sending writes as fast as the network lets
/// it, so a pause this long means it is gone, or waits for nothing.
const LINGER_PAUSE: Duration = Duration::from_secs(5);

/// The longest linger (nginx's `lingering_time`): the rest of a large upload arrives within
/// it even on a slow link (48 MiB at 2 MB/s takes 25 s), while a client that sends for ever
/// holds its place under `HTTP_MAX_CONNECTIONS` no longer than this.
const LINGER_TOTAL: Duration = Duration::from_secs(30);

/// What is read at a time, and thrown away.
const DISCARD_BUFFER: usize = 16 << 10;

/// Why a linger ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ended {
    /// The client ended its side (or its socket failed): nothing more comes.
    ClientDone,
    /// No byte for [`LINGER_PAUSE`].
    Paused,
    /// [`LINGER_TOTAL`] has passed.
    TimeUp,
    /// The service is stopping: a stop waits for no lingering client.
    Stopping,
}

/// Read and discard what `socket` still receives, until its client ends its side, pauses
/// for [`LINGER_PAUSE`] or [`LINGER_TOTAL`] has passed, or `stopping` fires (also if it
/// already has).
pub(super) async fn linger<S: AsyncRead + Unpin>(
    mut socket: S,
    stopping: &CancellationToken,
) -> Ended {
    let until = deadline_after(LINGER_TOTAL);
    let mut buffer = vec![0; DISCARD_BUFFER];
    loop {
        let pause_ends = deadline_after(LINGER_PAUSE).min(until);
        tokio::select! {
            biased;
            () = stopping.cancelled() => return Ended::Stopping,
            read = socket.read(&mut buffer) => match read {
                Ok(1..) => {}
                Ok(0) | Err(_) => return Ended::ClientDone,
            },
            () = tokio::time::sleep_until(pause_ends) => {
                return match Instant::now() >= until {
                    true => Ended::TimeUp,
                    false => Ended::Paused,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_client_that_ends_its_side_ends_the_linger_at_once() {
        let (client, server) = tokio::io::duplex(64);
        let lingering =
            tokio::spawn(async move { linger(server, &CancellationToken::new()).await });
        let mut client = client;
        client.write_all(&[b'x'; 1000]).await.unwrap();
        drop(client);
        let started = Instant::now();
        assert_eq!(lingering.await.unwrap(), Ended::ClientDone);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_pauses_is_left_after_the_lingering_pause() {
        let (mut client, server) = tokio::io::duplex(64);
        let started = Instant::now();
        let lingering =
            tokio::spawn(async move { linger(server, &CancellationToken::new()).await });
        for _ in 0..3 {
            client.write_all(b"more").await.unwrap();
            tokio::time::sleep(Duration::from_secs(4)).await;
        }
        assert_eq!(lingering.await.unwrap(), Ended::Paused);
        assert_eq!(started.elapsed(), Duration::from_secs(8) + LINGER_PAUSE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_sends_for_ever_is_left_after_the_lingering_time() {
        let (mut client, server) = tokio::io::duplex(64);
        let started = Instant::now();
        let lingering =
            tokio::spawn(async move { linger(server, &CancellationToken::new()).await });
        while client.write_all(b"more").await.is_ok() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert_eq!(lingering.await.unwrap(), Ended::TimeUp);
        // its last write, a second apart, is the first after the cut, or the one at it
        let elapsed = started.elapsed();
        assert!(elapsed >= LINGER_TOTAL, "{elapsed:?}");
        assert!(elapsed <= LINGER_TOTAL + Duration::from_secs(1), "{elapsed:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_ends_the_linger_at_once_even_one_begun_before() {
        let (mut client, server) = tokio::io::duplex(64);
        let stopping = CancellationToken::new();
        let token = stopping.clone();
        let lingering = tokio::spawn(async move { linger(server, &token).await });
        client.write_all(b"more").await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        stopping.cancel();
        assert_eq!(lingering.await.unwrap(), Ended::Stopping);
        let (_client, server) = tokio::io::duplex(64);
        assert_eq!(linger(server, &stopping).await, Ended::Stopping, "stopped before");
    }
}
