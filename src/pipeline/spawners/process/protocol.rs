//! The frames between a service and its worker processes: length-prefixed JSON over a Unix
//! socket, each written in one piece and read through a buffer (one syscall a frame each way
//! when the link is busy).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::data::BackOffData;
use crate::data::Failure;
use crate::data::Message;
use crate::data::{Outcome, TargetRole};
use crate::transport::{
    BindingSpec, ConsumeOptions, ExchangeSpec, OutgoingMessage, PublishOptions, QueueInfo,
    QueueSpec, TransportError,
};

/// Frames larger than this are refused (a corrupt or hostile length prefix).
const MAX_FRAME: u32 = 256 * 1024 * 1024;
/// What a frame's buffer starts with; it grows as the body arrives.
const PREALLOCATE: usize = 64 * 1024;
/// What an outgoing frame's buffer starts with: a call with its message and headers fits.
const FIRST_CAPACITY: usize = 1024;
/// The read buffer of each end of a link: most frames arrive in one read.
pub(crate) const READ_BUFFER: usize = 16 * 1024;

/// One call for a worker process.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct CallRequest {
    pub route: String,
    pub role: TargetRole,
    pub message: Message,
    pub failure: Option<Failure>,
    pub retry: BackOffData,
}

/// From the service to a worker.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ToWorker {
    Call(Box<CallRequest>),
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

/// From a worker to the service.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum FromWorker {
    Ready {
        pid: u32,
    },
    Outcome(Outcome),
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

/// Write one frame: its length and body in one buffer, so one write (one syscall) sends it.
pub(crate) async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    writer: &mut W,
    frame: &T,
) -> std::io::Result<()> {
    writer.write_all(&encode(frame)?).await
}

/// A frame as sent: the body's length (4 bytes, big-endian), then the body.
fn encode<T: Serialize>(frame: &T) -> std::io::Result<Vec<u8>> {
    let mut buffer = Vec::with_capacity(FIRST_CAPACITY);
    buffer.extend_from_slice(&[0; 4]);
    serde_json::to_writer(&mut buffer, frame)?;
    let length = u32::try_from(buffer.len() - 4)
        .ok()
        .filter(|length| *length <= MAX_FRAME)
        .ok_or_else(|| std::io::Error::other("frame too large"))?;
    buffer[..4].copy_from_slice(&length.to_be_bytes());
    Ok(buffer)
}

/// Read one frame; `None` at the end of the stream.
pub(crate) async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
    reader: &mut R,
) -> std::io::Result<Option<T>> {
    let mut length = [0u8; 4];
    match reader.read_exact(&mut length).await {
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    }
    let length = u32::from_be_bytes(length);
    if length > MAX_FRAME {
        return Err(std::io::Error::other(format!("frame of {length} bytes refused")));
    }
    // grow with the bytes that actually arrive: a length prefix alone allocates little
    let mut body = Vec::with_capacity((length as usize).min(PREALLOCATE));
    reader.take(u64::from(length)).read_to_end(&mut body).await?;
    if body.len() != length as usize {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    // A message's headers may nest as deep as an AMQP frame allows (about 26,000 levels),
    // beyond serde_json's default limit of 128; the threads' stacks are sized for that depth.
    let mut deserializer = serde_json::Deserializer::from_slice(&body);
    deserializer.disable_recursion_limit();
    let frame = T::deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(Some(frame))
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

    #[tokio::test]
    async fn a_frame_is_written_in_one_piece_and_read_back() {
        let message = Message::json(&serde_json::json!({"id": 1})).unwrap();
        let frame = ToWorker::Delivery(Box::new(ForwardedDelivery {
            consumer: 1,
            delivery: 2,
            message: message.clone(),
        }));
        let mut writer = CountingWriter::default();
        write_frame(&mut writer, &frame).await.unwrap();
        assert_eq!(writer.writes, 1, "length and body in one write");
        let length = u32::from_be_bytes(writer.bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(length, writer.bytes.len() - 4);
        let mut reader = writer.bytes.as_slice();
        let Some(ToWorker::Delivery(read)) = read_frame::<_, ToWorker>(&mut reader).await.unwrap()
        else {
            panic!("not a delivery")
        };
        assert_eq!(read.message, message);
        assert!(read_frame::<_, ToWorker>(&mut reader).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_truncated_frame_is_an_error_not_an_end() {
        let mut bytes = encode(&FromWorker::Ready { pid: 7 }).unwrap();
        bytes.pop();
        let error = read_frame::<_, FromWorker>(&mut bytes.as_slice()).await.unwrap_err();
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
        let (mut writer, mut reader) = tokio::io::duplex(1 << 20);
        let sent = tokio::spawn(async move { write_frame(&mut writer, &frame).await });
        let received = read_frame::<_, ToWorker>(&mut reader).await.unwrap();
        sent.await.unwrap().unwrap();
        let Some(ToWorker::Delivery(delivery)) = received else { panic!("{received:?}") };
        assert_eq!(delivery.message, message);
    }
}
