//! Framing of [`Message`]s on a libp2p stream, with byte accounting.
//!
//! Each request or response is one `u32` big-endian length followed by one
//! [`fd_protocol::encode`] frame. The length is checked against
//! [`MAX_MESSAGE_BYTES`] before anything is allocated, on both sides, so the
//! limit a sender obeys is exactly the one a receiver enforces. A frame whose
//! length prefix exceeds the limit is refused unread and counted in
//! [`TrafficCounters::frames_too_large`]; one that does not decode is counted
//! in [`TrafficCounters::frames_malformed`].
//!
//! [`TrafficCounters`] count the bytes actually written and read, split into
//! share traffic and everything else, so a node can report what collaboration
//! cost it on the wire. Share traffic is everything that moves a share: pushed
//! `Share` frames, and for pulled shares ([`super::transfer`]) the
//! `ShareAvailable` announcements (gossip data, counted by the event loop) and
//! the `FetchChunk` / `Chunk` / `ChunkUnavailable` frames.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use fd_protocol::{MAX_MESSAGE_BYTES, Message, decode, encode};
use futures::prelude::*;
use libp2p::StreamProtocol;
use libp2p::request_response::Codec;

/// Bytes on the wire, including the 4-byte length prefix, and frame counts.
#[derive(Debug, Default)]
pub struct TrafficCounters {
    /// Frames that move shares (see the module doc), and gossip announcement data.
    pub share_bytes_sent: AtomicU64,
    pub share_bytes_received: AtomicU64,
    /// Shares delivered: pushed `Share` requests the peer answered (counted
    /// by the event loop, so a push retried after its connection closed
    /// counts once), plus pulled shares whose last chunk this node served.
    pub shares_sent: AtomicU64,
    pub other_bytes_sent: AtomicU64,
    pub other_bytes_received: AtomicU64,
    /// `Chunk` frames written (served) and read (fetched).
    pub chunks_sent: AtomicU64,
    pub chunks_received: AtomicU64,
    /// `ShareAvailable` announcements published on gossip (once per
    /// recipient) or pushed as requests, and received; their bytes are
    /// counted here as well as in `share_bytes_*`.
    pub announcements_sent: AtomicU64,
    pub announcements_received: AtomicU64,
    pub announcement_bytes_sent: AtomicU64,
    pub announcement_bytes_received: AtomicU64,
    /// Inbound frames refused because their length prefix exceeded
    /// [`MAX_MESSAGE_BYTES`] (never read, never allocated).
    pub frames_too_large: AtomicU64,
    /// Inbound frames that did not decode.
    pub frames_malformed: AtomicU64,
    /// Inbound requests answered `busy` unread by the program: their peer
    /// (or everyone together) had too many requests in flight.
    pub requests_busy: AtomicU64,
    /// Largest frame written and read, prefix included.
    pub largest_frame_sent: AtomicU64,
    pub largest_frame_received: AtomicU64,
    /// Pushed shares answered over a relayed connection (of `shares_sent`).
    pub shares_relayed: AtomicU64,
    /// Relay reservations and circuits this node (as a relay) refused.
    pub relay_refused: AtomicU64,
}

/// A snapshot of [`TrafficCounters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Traffic {
    pub share_bytes_sent: u64,
    pub share_bytes_received: u64,
    pub shares_sent: u64,
    pub other_bytes_sent: u64,
    pub other_bytes_received: u64,
    pub chunks_sent: u64,
    pub chunks_received: u64,
    pub announcements_sent: u64,
    pub announcements_received: u64,
    pub announcement_bytes_sent: u64,
    pub announcement_bytes_received: u64,
    pub frames_too_large: u64,
    pub frames_malformed: u64,
    pub requests_busy: u64,
    pub largest_frame_sent: u64,
    pub largest_frame_received: u64,
    pub shares_relayed: u64,
}

/// Whether a frame carrying `message` is share traffic.
fn is_share_traffic(message: &Message) -> bool {
    matches!(
        message,
        Message::Share(_)
            | Message::ShareAvailable(_)
            | Message::FetchChunk { .. }
            | Message::Chunk { .. }
            | Message::ChunkUnavailable { .. }
    )
}

impl TrafficCounters {
    pub fn snapshot(&self) -> Traffic {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Traffic {
            share_bytes_sent: get(&self.share_bytes_sent),
            share_bytes_received: get(&self.share_bytes_received),
            shares_sent: get(&self.shares_sent),
            other_bytes_sent: get(&self.other_bytes_sent),
            other_bytes_received: get(&self.other_bytes_received),
            chunks_sent: get(&self.chunks_sent),
            chunks_received: get(&self.chunks_received),
            announcements_sent: get(&self.announcements_sent),
            announcements_received: get(&self.announcements_received),
            announcement_bytes_sent: get(&self.announcement_bytes_sent),
            announcement_bytes_received: get(&self.announcement_bytes_received),
            frames_too_large: get(&self.frames_too_large),
            frames_malformed: get(&self.frames_malformed),
            requests_busy: get(&self.requests_busy),
            largest_frame_sent: get(&self.largest_frame_sent),
            largest_frame_received: get(&self.largest_frame_received),
            shares_relayed: get(&self.shares_relayed),
        }
    }

    fn sent(&self, message: &Message, bytes: usize) {
        let bytes = bytes as u64;
        self.largest_frame_sent.fetch_max(bytes, Ordering::Relaxed);
        if is_share_traffic(message) {
            self.share_bytes_sent.fetch_add(bytes, Ordering::Relaxed);
        } else {
            self.other_bytes_sent.fetch_add(bytes, Ordering::Relaxed);
        }
        match message {
            Message::Chunk { .. } => {
                self.chunks_sent.fetch_add(1, Ordering::Relaxed);
            }
            Message::ShareAvailable(_) => self.announcement_sent(bytes),
            _ => {}
        }
    }

    fn received(&self, message: &Message, bytes: usize) {
        let bytes = bytes as u64;
        self.largest_frame_received
            .fetch_max(bytes, Ordering::Relaxed);
        if is_share_traffic(message) {
            self.share_bytes_received
                .fetch_add(bytes, Ordering::Relaxed);
        } else {
            self.other_bytes_received
                .fetch_add(bytes, Ordering::Relaxed);
        }
        match message {
            Message::Chunk { .. } => {
                self.chunks_received.fetch_add(1, Ordering::Relaxed);
            }
            Message::ShareAvailable(_) => {
                self.announcements_received.fetch_add(1, Ordering::Relaxed);
                self.announcement_bytes_received
                    .fetch_add(bytes, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// One announcement of `bytes` sent (a frame, or gossip data to one
    /// recipient). Share traffic is counted by the caller for gossip.
    fn announcement_sent(&self, bytes: u64) {
        self.announcements_sent.fetch_add(1, Ordering::Relaxed);
        self.announcement_bytes_sent
            .fetch_add(bytes, Ordering::Relaxed);
    }

    /// Gossip data of an announcement published to `recipients` peers.
    pub(crate) fn gossip_sent(&self, bytes: usize, recipients: usize) {
        for _ in 0..recipients {
            self.announcement_sent(bytes as u64);
            self.share_bytes_sent
                .fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }

    /// Gossip data of an announcement received.
    pub(crate) fn gossip_received(&self, bytes: usize) {
        self.announcements_received.fetch_add(1, Ordering::Relaxed);
        self.announcement_bytes_received
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.share_bytes_received
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// The last chunk of a pulled share was served: one more share delivered.
    pub(crate) fn pulled_share_served(&self) {
        self.shares_sent.fetch_add(1, Ordering::Relaxed);
    }
}

impl Traffic {
    /// Counter growth since `earlier`. The `largest_frame_*` fields are
    /// maxima, not counts: they keep their current value.
    pub fn since(&self, earlier: &Traffic) -> Traffic {
        Traffic {
            share_bytes_sent: self.share_bytes_sent - earlier.share_bytes_sent,
            share_bytes_received: self.share_bytes_received - earlier.share_bytes_received,
            shares_sent: self.shares_sent - earlier.shares_sent,
            other_bytes_sent: self.other_bytes_sent - earlier.other_bytes_sent,
            other_bytes_received: self.other_bytes_received - earlier.other_bytes_received,
            chunks_sent: self.chunks_sent - earlier.chunks_sent,
            chunks_received: self.chunks_received - earlier.chunks_received,
            announcements_sent: self.announcements_sent - earlier.announcements_sent,
            announcements_received: self.announcements_received - earlier.announcements_received,
            announcement_bytes_sent: self.announcement_bytes_sent - earlier.announcement_bytes_sent,
            announcement_bytes_received: self.announcement_bytes_received
                - earlier.announcement_bytes_received,
            frames_too_large: self.frames_too_large - earlier.frames_too_large,
            frames_malformed: self.frames_malformed - earlier.frames_malformed,
            requests_busy: self.requests_busy - earlier.requests_busy,
            largest_frame_sent: self.largest_frame_sent,
            largest_frame_received: self.largest_frame_received,
            shares_relayed: self.shares_relayed - earlier.shares_relayed,
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
            self.counters
                .frames_too_large
                .fetch_add(1, Ordering::Relaxed);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame of {len} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes"),
            ));
        }
        let mut frame = vec![0u8; len];
        io.read_exact(&mut frame).await?;
        let message = decode(&frame).map_err(|e| {
            self.counters
                .frames_malformed
                .fetch_add(1, Ordering::Relaxed);
            io::Error::new(io::ErrorKind::InvalidData, e)
        })?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: u32, body: &[u8]) -> Vec<u8> {
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.extend_from_slice(body);
        bytes
    }

    #[tokio::test]
    async fn net_codec_refuses_and_counts_oversize_frames() {
        let counters = Arc::new(TrafficCounters::default());
        let mut codec = FdCodec::new(counters.clone());
        let protocol = super::super::PROTOCOL;

        // A length prefix one past the limit: refused before reading the body.
        let over = frame(MAX_MESSAGE_BYTES as u32 + 1, &[0; 16]);
        let error = codec
            .read_request(&protocol, &mut futures::io::Cursor::new(over))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(error.to_string().contains("exceeds the limit"), "{error}");
        let error = codec
            .read_response(
                &protocol,
                &mut futures::io::Cursor::new(frame(u32::MAX, &[])),
            )
            .await
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        let t = counters.snapshot();
        assert_eq!(t.frames_too_large, 2);
        assert_eq!(t.other_bytes_received + t.share_bytes_received, 0);

        // A frame within the limit is read and counted as traffic, not refused.
        let ack = encode(&Message::Ack).unwrap();
        let message = codec
            .read_request(
                &protocol,
                &mut futures::io::Cursor::new(frame(ack.len() as u32, &ack)),
            )
            .await
            .unwrap();
        assert_eq!(message, Message::Ack);
        let t = counters.snapshot();
        assert_eq!(t.frames_too_large, 2);
        assert_eq!(t.other_bytes_received, ack.len() as u64 + 4);

        // Garbage within the limit is malformed, not too large.
        let error = codec
            .read_request(
                &protocol,
                &mut futures::io::Cursor::new(frame(3, &[1, 0, 0xFF])),
            )
            .await
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        let t = counters.snapshot();
        assert_eq!((t.frames_too_large, t.frames_malformed), (2, 1));

        // The writer obeys the same limit: a chunk over it is not sent.
        let mut out = futures::io::Cursor::new(Vec::new());
        let big = Message::Chunk {
            index: 0,
            data: vec![0; MAX_MESSAGE_BYTES],
        };
        assert!(codec.write_request(&protocol, &mut out, big).await.is_err());
        assert!(out.into_inner().is_empty());
    }

    #[tokio::test]
    async fn net_codec_counts_chunk_frames_as_share_traffic() {
        let counters = Arc::new(TrafficCounters::default());
        let mut codec = FdCodec::new(counters.clone());
        let protocol = super::super::PROTOCOL;
        let chunk = Message::Chunk {
            index: 3,
            data: vec![7; fd_protocol::CHUNK_BYTES],
        };
        let mut out = futures::io::Cursor::new(Vec::new());
        codec
            .write_response(&protocol, &mut out, chunk.clone())
            .await
            .unwrap();
        let wire = out.into_inner();
        let back = codec
            .read_response(&protocol, &mut futures::io::Cursor::new(wire.clone()))
            .await
            .unwrap();
        assert_eq!(back, chunk);
        let t = counters.snapshot();
        assert_eq!(t.share_bytes_sent, wire.len() as u64);
        assert_eq!(t.share_bytes_received, wire.len() as u64);
        assert_eq!((t.chunks_sent, t.chunks_received), (1, 1));
        assert_eq!(t.shares_sent, 0, "a chunk is not a whole share");
        assert_eq!(t.largest_frame_sent, wire.len() as u64);
        assert!(wire.len() <= MAX_MESSAGE_BYTES + 4);
    }
}
