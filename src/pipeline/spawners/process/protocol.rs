//! The frames between a service and its worker processes: length-prefixed MessagePack over two
//! Unix sockets per worker, each frame written in one piece by whoever sends it and read through
//! a buffer that each end keeps (one syscall a frame each way, fewer when frames queue up).
//!
//! The calls link carries [`Ready`], then calls one at a time and their outcomes: the
//! service's calling task and the worker's call thread are its only readers, so neither
//! waits for another thread to hand it a frame. The control link carries the broker traffic
//! a call makes through the service ([`FromWorker`], [`ToWorker`]), which arrives while the
//! call thread is busy with the call.
//!
//! MessagePack rather than JSON: a message's body goes as bytes, where JSON wrote each byte as
//! a number (up to four times the body's size, and a number to parse for each byte).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::data::BackOffData;
use crate::data::Failure;
use crate::data::Message;
use crate::data::TargetRole;
use crate::error::{Chain, Error};
use crate::transport::{
    BindingSpec, ConsumeOptions, ExchangeSpec, OutgoingMessage, PublishOptions, QueueInfo,
    QueueSpec, TransportError,
};

/// Frames larger than this are refused (a corrupt or hostile length prefix).
const MAX_FRAME: u32 = 256 * 1024 * 1024;
/// The deepest nesting a frame may have: a message's headers may nest as deep as an AMQP
/// frame allows (about 26,200 levels, 5 bytes a level in RabbitMQ's 131,072-byte frames),
/// within the frame's own few levels; the threads' stacks are sized for that depth. A deeper
/// frame is refused, where its one byte a level would otherwise exhaust the stack.
const MAX_DEPTH: usize = 27_000;
/// How much a read for a frame's body reserves at most at a time: the buffer grows with
/// the bytes that arrive, not with what a length prefix announces.
const PREALLOCATE: usize = 64 * 1024;
/// The write buffer of each end of a link: a call with its message and headers fits.
const WRITE_BUFFER: usize = 4 * 1024;
/// The read buffer of each end of a link: most frames arrive in one read, several at once
/// when they queue up.
const READ_BUFFER: usize = 16 * 1024;
/// A buffer grown past this by a big frame is replaced by a small one once empty.
const KEEP_BUFFER: usize = 1024 * 1024;

/// One call for a worker process.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct CallRequest {
    pub route: String,
    /// The call's id, which the service logs the call under too (a worker killed by the
    /// time limit, or dying, logs nothing of it).
    pub call_id: String,
    pub role: TargetRole,
    pub message: Message,
    pub failure: Option<Failure>,
    pub retry: BackOffData,
}

/// A call as the service sends it: [`CallRequest`]'s fields, borrowed, so the message is not
/// copied on its way to the worker.
#[derive(Serialize)]
pub(crate) struct BorrowedCall<'a> {
    pub route: &'a str,
    pub call_id: &'a str,
    pub role: TargetRole,
    pub message: &'a Message,
    pub failure: Option<&'a Failure>,
    pub retry: &'a BackOffData,
}

/// What a worker that can serve says.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Ready {
    pub pid: u32,
}

/// The first frame a worker sends on its calls link: ready, or why it cannot serve.
pub(crate) type Greeting = Result<Ready, NotReady>;

/// Why a worker cannot serve (its dependencies' set-up failed, mostly): told to the service,
/// whose start, or replacement of a worker, then fails with the reason rather than with the
/// link's end alone.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct NotReady {
    pub pid: u32,
    /// The dependency whose set-up failed, if that is what failed.
    pub dependency: Option<String>,
    pub reason: String,
}

impl NotReady {
    /// What this worker process says of `error`, its causes included: the text is all the
    /// service gets of it.
    pub(crate) fn from_error(error: &Error) -> Self {
        let pid = std::process::id();
        match error {
            Error::Dependency { name, source } => {
                let reason = Chain(source.as_ref()).to_string();
                NotReady { pid, dependency: Some(name.clone()), reason }
            }
            other => NotReady { pid, dependency: None, reason: Chain(other).to_string() },
        }
    }
}

impl From<NotReady> for Error {
    /// The error the service reports: a dependency's as in the service's own process.
    fn from(NotReady { pid, dependency, reason }: NotReady) -> Self {
        match dependency {
            Some(name) => Error::Dependency {
                name,
                source: format!("{reason} (in worker process {pid})").into(),
            },
            None => Error::WorkerProcess(format!("worker process {pid} cannot serve: {reason}")),
        }
    }
}

/// From the service to a worker, on the control link.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ToWorker {
    TransportReply {
        id: u64,
        result: Result<TransportAnswer, TransportError>,
    },
    /// A delivery for a consumer the worker opened through the service.
    Delivery(Box<ForwardedDelivery>),
    /// That consumer ended.
    ConsumerEnded {
        consumer: u64,
    },
    /// How many times the service's connection reconnected, sent as it changes (a worker's
    /// RPC caller then sets up a new reply queue, as the service's own does).
    Reconnected {
        reconnects: u64,
    },
}

/// A delivery forwarded to a worker; the service keeps its acker until the worker settles.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ForwardedDelivery {
    pub consumer: u64,
    pub delivery: u64,
    pub message: Message,
}

/// How a worker settles a forwarded delivery.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub(crate) enum Settlement {
    Ack,
    Nack { requeue: bool },
    Reject { requeue: bool },
}

/// From a worker to the service, on the control link.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum FromWorker {
    Transport {
        id: u64,
        op: Box<TransportOp>,
    },
    /// Settle a forwarded delivery.
    Settle {
        delivery: u64,
        settlement: Settlement,
    },
    /// Cancel a consumer opened through the service.
    Cancel {
        consumer: u64,
    },
    /// The worker no longer waits for the answer to the broker operation `id` (the call that
    /// asked was cut short): not done yet, it is not done.
    Abandon {
        id: u64,
    },
    /// An RPC call a target made, for the service's metrics (the ones served).
    RpcCall {
        service: String,
        method: String,
        outcome: String,
        elapsed: Duration,
    },
}

/// A broker operation a worker asks the service to do (its dependencies' traffic).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum TransportOp {
    DeclareExchange(ExchangeSpec),
    DeclareQueue(QueueSpec),
    QueueInfo(String),
    Bind(BindingSpec),
    DeleteQueue(String),
    DeleteExchange(String),
    Purge(String),
    Consume {
        queue: String,
        options: ConsumeOptions,
    },
    Publish {
        exchange: String,
        routing_key: String,
        message: Box<OutgoingMessage>,
        options: PublishOptions,
    },
}

/// The answer to a [`TransportOp`].
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum TransportAnswer {
    Done,
    Info(QueueInfo),
    Count(u32),
    Consuming { consumer: u64 },
}

/// Frames to one end of a link, written in order from any task: a caller writes its frame
/// itself (no hop through a writer task), under a lock that keeps frames whole.
pub(crate) struct FrameSink<W> {
    writer: tokio::sync::Mutex<FrameWriter<W>>,
    closed: AtomicBool,
}

impl<W: AsyncWrite + Unpin> FrameSink<W> {
    pub(crate) fn new(writer: W) -> Self {
        FrameSink {
            writer: tokio::sync::Mutex::new(FrameWriter::new(writer)),
            closed: false.into(),
        }
    }

    /// Write `frame` now, with whatever an earlier, cancelled send left unwritten. A frame
    /// that cannot be encoded is refused (`InvalidData`) and the link stays usable; any
    /// other error means the link is broken. Once it is closed, nothing is written
    /// (`NotConnected`).
    pub(crate) async fn send<T: Serialize>(&self, frame: &T) -> std::io::Result<()> {
        let mut writer = self.writer.lock().await;
        // nobody reads the other end any more: nothing sent would be answered
        if self.is_closed() {
            let ended = "the link has ended";
            return Err(std::io::Error::new(std::io::ErrorKind::NotConnected, ended));
        }
        writer.push(frame)?;
        let written = writer.flush().await;
        if written.is_err() {
            self.closed.store(true, Ordering::Relaxed);
        }
        written
    }

    /// Mark the link closed (its other half ended).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }

    /// True once the link is closed or a write failed.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }
}

/// Encodes frames into one buffer it keeps (no allocation per frame once warm) and writes
/// what it holds in one piece: the length prefix and body of a frame are one syscall.
pub(crate) struct FrameWriter<W> {
    writer: W,
    buffer: BytesMut,
}

impl<W> FrameWriter<W> {
    pub(crate) fn new(writer: W) -> Self {
        FrameWriter { writer, buffer: BytesMut::with_capacity(WRITE_BUFFER) }
    }

    /// What was pushed and not written yet.
    #[cfg(test)]
    pub(crate) fn pushed(&self) -> &[u8] {
        &self.buffer
    }

    /// Where the next frame pushed will begin: what [`FrameWriter::truncate_to`] takes.
    pub(crate) fn mark(&self) -> usize {
        self.buffer.len()
    }

    /// Drop the frames pushed since `mark` (not written yet: no flush came between).
    pub(crate) fn truncate_to(&mut self, mark: usize) {
        self.buffer.truncate(mark);
    }

    /// Add one frame: the body's length (4 bytes, big-endian), then the body. A frame that
    /// cannot be encoded leaves nothing behind.
    pub(crate) fn push<T: Serialize>(&mut self, frame: &T) -> std::io::Result<()> {
        let at = self.buffer.len();
        self.buffer.put_u32(0);
        // struct fields by name: a field left out (`skip_serializing_if`) or added stays readable
        let mut serializer =
            rmp_serde::Serializer::new((&mut self.buffer).writer()).with_struct_map();
        let encoded = frame
            .serialize(&mut serializer)
            .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidData, error))
            .and_then(|()| {
                u32::try_from(self.buffer.len() - at - 4)
                    .ok()
                    .filter(|length| *length <= MAX_FRAME)
                    .ok_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::InvalidData, "frame too large")
                    })
            });
        match encoded {
            Ok(length) => {
                self.buffer[at..at + 4].copy_from_slice(&length.to_be_bytes());
                Ok(())
            }
            Err(error) => {
                self.buffer.truncate(at);
                Err(error)
            }
        }
    }

    /// The frames written, for tests.
    #[cfg(test)]
    pub(crate) fn into_inner(self) -> W {
        self.writer
    }

    /// One big frame does not keep its buffer for the link's life.
    fn shrink(&mut self) {
        if self.buffer.capacity() > KEEP_BUFFER {
            self.buffer = BytesMut::with_capacity(WRITE_BUFFER);
        }
    }
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Write every frame added so far. Cancel-safe: what is not written yet stays for the
    /// next flush, so frames stay whole.
    pub(crate) async fn flush(&mut self) -> std::io::Result<()> {
        self.writer.write_all_buf(&mut self.buffer).await?;
        self.shrink();
        Ok(())
    }
}

impl<W: std::io::Write> FrameWriter<W> {
    /// Write every frame added so far, blocking this thread until they are written.
    pub(crate) fn flush_blocking(&mut self) -> std::io::Result<()> {
        self.writer.write_all(&self.buffer)?;
        self.buffer.clear();
        self.shrink();
        Ok(())
    }
}

/// Reads frames through one buffer it keeps; cancel-safe, as what was read stays in the
/// buffer: a task may wait for the next frame in a `select!`.
pub(crate) struct FrameReader<R> {
    reader: R,
    buffer: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// The next frame; `None` at the end of the stream between frames.
    pub(crate) async fn next<T: DeserializeOwned>(&mut self) -> std::io::Result<Option<T>> {
        loop {
            let wanted = match self.wanted()? {
                0 => return self.take().map(Some),
                wanted => wanted,
            };
            // grow with the bytes that actually arrive: a length prefix alone allocates little
            self.buffer.reserve(wanted.min(PREALLOCATE));
            if self.reader.read_buf(&mut self.buffer).await? == 0 {
                return self.ended();
            }
        }
    }
}

impl<R: std::io::Read> FrameReader<R> {
    /// The next frame, blocking this thread until it has arrived; `None` at the end of the
    /// stream between frames.
    pub(crate) fn next_blocking<T: DeserializeOwned>(&mut self) -> std::io::Result<Option<T>> {
        loop {
            let wanted = match self.wanted()? {
                0 => return self.take().map(Some),
                wanted => wanted,
            };
            // reads into the spare capacity, zero-filled first (std's reads take initialised
            // memory); as above, at most PREALLOCATE more bytes than arrived
            let filled = self.buffer.len();
            let room = (self.buffer.capacity() - filled).max(wanted.min(PREALLOCATE));
            self.buffer.resize(filled + room, 0);
            let read = loop {
                match self.reader.read(&mut self.buffer[filled..]) {
                    Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                    read => break read,
                }
            };
            let read = read.inspect_err(|_| self.buffer.truncate(filled))?;
            self.buffer.truncate(filled + read);
            if read == 0 {
                return self.ended();
            }
        }
    }
}

impl<R> FrameReader<R> {
    pub(crate) fn new(reader: R) -> Self {
        FrameReader { reader, buffer: BytesMut::with_capacity(READ_BUFFER) }
    }

    /// What the end of the stream means: the link's end between frames, an error within one.
    fn ended<T>(&self) -> std::io::Result<Option<T>> {
        match self.buffer.is_empty() {
            true => Ok(None),
            false => Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
    }

    /// How many more bytes the next frame needs (0: it is complete in the buffer).
    fn wanted(&self) -> std::io::Result<usize> {
        let Some(prefix) = self.buffer.get(..4) else { return Ok(4 - self.buffer.len()) };
        let length = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        if length > MAX_FRAME {
            return Err(std::io::Error::other(format!("frame of {length} bytes refused")));
        }
        Ok((4 + length as usize).saturating_sub(self.buffer.len()))
    }

    /// Decode the complete frame at the front of the buffer and drop it from there.
    fn take<T: DeserializeOwned>(&mut self) -> std::io::Result<T> {
        let length =
            u32::from_be_bytes([self.buffer[0], self.buffer[1], self.buffer[2], self.buffer[3]]);
        let body = &self.buffer[4..4 + length as usize];
        // read in place: strings and bodies are copied once, into the value
        let mut deserializer = rmp_serde::Deserializer::from_read_ref(body);
        deserializer.set_max_depth(MAX_DEPTH);
        let frame = T::deserialize(&mut deserializer).map_err(std::io::Error::other)?;
        self.buffer.advance(4 + length as usize);
        if self.buffer.is_empty() && self.buffer.capacity() > KEEP_BUFFER {
            self.buffer = BytesMut::with_capacity(READ_BUFFER);
        }
        Ok(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::HeaderValue;

    /// Counts the writes it is given.
    #[derive(Default)]
    struct CountingWriter {
        writes: usize,
        bytes: Vec<u8>,
    }

    impl AsyncWrite for CountingWriter {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.writes += 1;
            self.bytes.extend_from_slice(buf);
            std::task::Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// `frames` encoded as they are sent.
    async fn framed<T: Serialize>(frames: &[T]) -> Vec<u8> {
        let mut writer = FrameWriter::new(Vec::new());
        for frame in frames {
            writer.push(frame).unwrap();
        }
        writer.flush().await.unwrap();
        writer.into_inner()
    }

    #[tokio::test]
    async fn a_frame_is_written_in_one_piece_and_read_back() {
        let message = Message::json(&serde_json::json!({"id": 1})).unwrap();
        let frame = ToWorker::Delivery(Box::new(ForwardedDelivery {
            consumer: 1,
            delivery: 2,
            message: message.clone(),
        }));
        let sink = FrameSink::new(CountingWriter::default());
        sink.send(&frame).await.unwrap();
        let writer = sink.writer.into_inner().into_inner();
        assert_eq!(writer.writes, 1, "length and body in one write");
        let length = u32::from_be_bytes(writer.bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(length, writer.bytes.len() - 4);
        let mut reader = FrameReader::new(writer.bytes.as_slice());
        let Some(ToWorker::Delivery(read)) = reader.next::<ToWorker>().await.unwrap() else {
            panic!("not a delivery")
        };
        assert_eq!(read.message, message);
        assert!(reader.next::<ToWorker>().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn frames_queued_together_are_written_together_and_read_from_one_buffer() {
        let frames = [FromWorker::Cancel { consumer: 1 }, FromWorker::Cancel { consumer: 2 }];
        let mut writer = FrameWriter::new(CountingWriter::default());
        for frame in &frames {
            writer.push(frame).unwrap();
        }
        writer.flush().await.unwrap();
        let writer = writer.into_inner();
        assert_eq!(writer.writes, 1);
        let mut reader = FrameReader::new(writer.bytes.as_slice());
        assert!(matches!(reader.next().await.unwrap(), Some(FromWorker::Cancel { consumer: 1 })));
        assert!(matches!(reader.next().await.unwrap(), Some(FromWorker::Cancel { consumer: 2 })));
        assert!(reader.next::<FromWorker>().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_frame_that_cannot_be_encoded_is_refused_and_the_link_goes_on() {
        struct Unencodable;
        impl Serialize for Unencodable {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("no"))
            }
        }
        let sink = FrameSink::new(Vec::new());
        let refused = sink.send(&Unencodable).await.unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::InvalidData);
        assert!(!sink.is_closed());
        sink.send(&Ready { pid: 3 }).await.unwrap();
        let bytes = sink.writer.into_inner().into_inner();
        let mut reader = FrameReader::new(bytes.as_slice());
        assert!(matches!(reader.next().await.unwrap(), Some(Ready { pid: 3 })));
    }

    #[tokio::test]
    async fn a_borrowed_call_is_read_as_a_call() {
        let message = Message::json(&serde_json::json!({"id": 1})).unwrap();
        let failure = Failure::new(crate::data::FailureKind::Error, "first");
        let retry = BackOffData { retry_count: 2, ..BackOffData::default() };
        let call = BorrowedCall {
            route: "route",
            call_id: "svc.route.1",
            role: TargetRole::Callback,
            message: &message,
            failure: Some(&failure),
            retry: &retry,
        };
        let bytes = framed(&[call]).await;
        let read: CallRequest = FrameReader::new(bytes.as_slice()).next().await.unwrap().unwrap();
        assert_eq!((read.route.as_str(), read.role), ("route", TargetRole::Callback));
        assert_eq!((read.message, read.retry), (message, retry));
        assert_eq!(read.failure.map(|failure| failure.message), Some("first".to_owned()));
    }

    #[tokio::test]
    async fn frames_arriving_in_pieces_survive_a_cancelled_read() {
        let bytes = framed(&[Ready { pid: 4 }, Ready { pid: 5 }]).await;
        let (mut writer, reader) = tokio::io::duplex(1 << 16);
        let mut reader = FrameReader::new(reader);
        for byte in &bytes[..bytes.len() - 1] {
            writer.write_all(std::slice::from_ref(byte)).await.unwrap();
            // a read that is given up on, as when another branch of a select! wins
            let read = tokio::time::timeout(std::time::Duration::ZERO, reader.next::<Ready>());
            if let Ok(frame) = read.await {
                assert!(matches!(frame.unwrap(), Some(Ready { pid: 4 })));
            }
        }
        writer.write_all(&bytes[bytes.len() - 1..]).await.unwrap();
        drop(writer);
        assert!(matches!(reader.next().await.unwrap(), Some(Ready { pid: 5 })));
        assert!(reader.next::<Ready>().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_truncated_frame_is_an_error_not_an_end() {
        let mut bytes = framed(&[Ready { pid: 7 }]).await;
        bytes.pop();
        let error = FrameReader::new(bytes.as_slice()).next::<Ready>().await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn a_message_with_headers_nested_as_deep_as_a_frame_allows_crosses_the_link() {
        let mut deep = HeaderValue::Array(Vec::new());
        for _ in 1..26_000 {
            deep = HeaderValue::Array(vec![deep]);
        }
        let mut message = Message::json(&serde_json::json!({})).unwrap();
        message.properties.headers.insert("deep".into(), deep);
        let frame = ToWorker::Delivery(Box::new(ForwardedDelivery {
            consumer: 1,
            delivery: 2,
            message: message.clone(),
        }));
        let (writer, reader) = tokio::io::duplex(1 << 20);
        let sent = tokio::spawn(async move { FrameSink::new(writer).send(&frame).await });
        let received = FrameReader::new(reader).next::<ToWorker>().await.unwrap();
        sent.await.unwrap().unwrap();
        let Some(ToWorker::Delivery(delivery)) = received else { panic!("{received:?}") };
        assert_eq!(delivery.message, message);
    }

    /// Hands out what it holds a few bytes at a time, as a socket may.
    struct Trickle<'a> {
        bytes: &'a [u8],
        step: usize,
        interrupted: bool,
    }

    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.interrupted = !self.interrupted;
            if self.interrupted {
                return Err(std::io::ErrorKind::Interrupted.into());
            }
            let n = self.step.min(buf.len()).min(self.bytes.len());
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    #[test]
    fn blocking_reads_take_frames_in_pieces_through_interruptions() {
        let mut writer = FrameWriter::new(Vec::new());
        for pid in [1, 2, 3] {
            writer.push(&Ready { pid }).unwrap();
        }
        writer.flush_blocking().unwrap();
        let bytes = writer.into_inner();
        for step in [1, 3, 7, bytes.len()] {
            let trickle = Trickle { bytes: &bytes, step, interrupted: false };
            let mut reader = FrameReader::new(trickle);
            for pid in [1, 2, 3] {
                let read = reader.next_blocking::<Ready>().unwrap();
                assert!(matches!(read, Some(Ready { pid: read }) if read == pid), "step {step}");
            }
            assert!(reader.next_blocking::<Ready>().unwrap().is_none());
        }
    }

    #[test]
    fn a_blocking_read_of_a_truncated_frame_is_an_error_not_an_end() {
        let mut writer = FrameWriter::new(Vec::new());
        writer.push(&Ready { pid: 7 }).unwrap();
        writer.flush_blocking().unwrap();
        let mut bytes = writer.into_inner();
        bytes.pop();
        let error = FrameReader::new(bytes.as_slice()).next_blocking::<Ready>().unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn a_body_crosses_the_link_as_its_bytes() {
        let body: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let message = Message { body: body.into(), ..Message::default() };
        let frame = ToWorker::Delivery(Box::new(ForwardedDelivery {
            consumer: 1,
            delivery: 2,
            message: message.clone(),
        }));
        let bytes = framed(&[frame]).await;
        assert!(bytes.len() < message.body.len() + 512, "{} bytes framed", bytes.len());
        let read = FrameReader::new(bytes.as_slice()).next::<ToWorker>().await.unwrap();
        let Some(ToWorker::Delivery(delivery)) = read else { panic!("{read:?}") };
        assert_eq!(delivery.message, message);
    }

    #[tokio::test]
    async fn every_float_a_peer_can_send_crosses_the_link() {
        let floats = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0, 1.5, f64::MAX];
        let mut message = Message::default();
        for (index, float) in floats.iter().enumerate() {
            message.properties.headers.insert(index.to_string(), HeaderValue::Float(*float));
        }
        let call = BorrowedCall {
            route: "route",
            call_id: "svc.route.2",
            role: TargetRole::Target,
            message: &message,
            failure: None,
            retry: &BackOffData::default(),
        };
        let bytes = framed(&[call]).await;
        let read: CallRequest = FrameReader::new(bytes.as_slice()).next().await.unwrap().unwrap();
        for (index, float) in floats.iter().enumerate() {
            let read = read.message.properties.headers.get(&index.to_string());
            let Some(HeaderValue::Float(read)) = read else { panic!("{float}: {read:?}") };
            assert_eq!(read.to_bits(), float.to_bits(), "{float}");
        }
    }

    #[tokio::test]
    async fn a_frame_nested_deeper_than_any_header_is_refused() {
        // MessagePack's one-element array is one byte: a small frame can nest very deep
        let mut value = vec![0x91; 100_000];
        value.push(0xc0);
        let mut bytes = u32::try_from(value.len()).unwrap().to_be_bytes().to_vec();
        bytes.extend(value);
        let read = FrameReader::new(bytes.as_slice()).next::<serde::de::IgnoredAny>().await;
        let error = read.unwrap_err();
        assert!(error.to_string().contains("depth"), "{error}");
    }

    #[test]
    fn a_blocking_read_refuses_an_oversized_length_before_reading_the_body() {
        let bytes = (MAX_FRAME + 1).to_be_bytes();
        let error = FrameReader::new(bytes.as_slice()).next_blocking::<Ready>().unwrap_err();
        assert!(error.to_string().contains("refused"), "{error}");
    }
}
