//! Framing of [`Message`]s on a libp2p stream, with byte accounting.
//!
//! Each request or response is one `u32` big-endian length followed by one
//! [`fd_protocol::encode`] frame. The length is checked against
//! [`MAX_MESSAGE_BYTES`] before anything is allocated, on both sides, so the
//! limit a sender obeys is exactly the one a receiver enforces.
//!
//! [`TrafficCounters`] count the bytes actually written and read, split into
//! share traffic and everything else, so a node can report what collaboration
//! cost it on the wire.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use fd_protocol::{MAX_MESSAGE_BYTES, Message, decode, encode};
use futures::prelude::*;
use libp2p::StreamProtocol;
use libp2p::request_response::Codec;

/// Bytes on the wire, including the 4-byte length prefix.
#[derive(Debug, Default)]
pub struct TrafficCounters {
    pub share_bytes_sent: AtomicU64,
    pub share_bytes_received: AtomicU64,
    pub shares_sent: AtomicU64,
    pub other_bytes_sent: AtomicU64,
    pub other_bytes_received: AtomicU64,
}

/// A snapshot of [`TrafficCounters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Traffic {
    pub share_bytes_sent: u64,
    pub share_bytes_received: u64,
    pub shares_sent: u64,
    pub other_bytes_sent: u64,
    pub other_bytes_received: u64,
}

impl TrafficCounters {
    pub fn snapshot(&self) -> Traffic {
        Traffic {
            share_bytes_sent: self.share_bytes_sent.load(Ordering::Relaxed),
            share_bytes_received: self.share_bytes_received.load(Ordering::Relaxed),
            shares_sent: self.shares_sent.load(Ordering::Relaxed),
            other_bytes_sent: self.other_bytes_sent.load(Ordering::Relaxed),
            other_bytes_received: self.other_bytes_received.load(Ordering::Relaxed),
        }
    }

    fn sent(&self, message: &Message, bytes: usize) {
        if let Message::Share(_) = message {
            self.share_bytes_sent
                .fetch_add(bytes as u64, Ordering::Relaxed);
            self.shares_sent.fetch_add(1, Ordering::Relaxed);
        } else {
            self.other_bytes_sent
                .fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }

    fn received(&self, message: &Message, bytes: usize) {
        let counter = match message {
            Message::Share(_) => &self.share_bytes_received,
            _ => &self.other_bytes_received,
        };
        counter.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

impl Traffic {
    /// Counter growth since `earlier`.
    pub fn since(&self, earlier: &Traffic) -> Traffic {
        Traffic {
            share_bytes_sent: self.share_bytes_sent - earlier.share_bytes_sent,
            share_bytes_received: self.share_bytes_received - earlier.share_bytes_received,
            shares_sent: self.shares_sent - earlier.shares_sent,
            other_bytes_sent: self.other_bytes_sent - earlier.other_bytes_sent,
            other_bytes_received: self.other_bytes_received - earlier.other_bytes_received,
        }
    }
}

/// The `/fd/1` request-response codec.
#[derive(Clone)]
pub struct FdCodec {
    counters: Arc<TrafficCounters>,
}

impl FdCodec {
    pub fn new(counters: Arc<TrafficCounters>) -> Self {
        FdCodec { counters }
    }

    async fn read<T: AsyncRead + Unpin + Send>(&self, io: &mut T) -> io::Result<Message> {
        let mut len = [0u8; 4];
        io.read_exact(&mut len).await?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_MESSAGE_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame of {len} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes"),
            ));
        }
        let mut frame = vec![0u8; len];
        io.read_exact(&mut frame).await?;
        let message = decode(&frame).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        self.counters.received(&message, len + 4);
        Ok(message)
    }

    async fn write<T: AsyncWrite + Unpin + Send>(
        &self,
        io: &mut T,
        message: Message,
    ) -> io::Result<()> {
        let frame = encode(&message).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        io.write_all(&(frame.len() as u32).to_be_bytes()).await?;
        io.write_all(&frame).await?;
        io.close().await?;
        self.counters.sent(&message, frame.len() + 4);
        Ok(())
    }
}

#[async_trait]
impl Codec for FdCodec {
    type Protocol = StreamProtocol;
    type Request = Message;
    type Response = Message;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Message>
    where
        T: AsyncRead + Unpin + Send,
    {
        self.read(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Message>
    where
        T: AsyncRead + Unpin + Send,
    {
        self.read(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Message,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        self.write(io, req).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Message,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        self.write(io, res).await
    }
}
