//! libp2p networking of an fd member (also used by the coordinator).
//!
//! Shaped after rust-libp2p's file-sharing example: the [`Swarm`] lives in one
//! [`EventLoop`] task; the rest of the program talks to it through a
//! cloneable [`Client`] of commands with oneshot replies, and reads inbound
//! requests as [`InboundRequest`]s from a channel. Network code never sees a
//! tensor and learning code never sees a socket.
//!
//! Transport: TCP + Noise + Yamux. Application protocol: one request-response
//! protocol, `/fd/1`, carrying [`fd_protocol::Message`] frames (see
//! [`codec`]). Shares are pushed by their sender to each member; the receiver
//! answers `ShareAccepted` or `ShareRejected` after validating.
//!
//! [`Swarm`]: libp2p::Swarm

pub mod client;
pub mod codec;
pub mod event_loop;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use fd_protocol::{Message, PublicKey, SigningKey};
use libp2p::request_response::{self, ProtocolSupport, ResponseChannel};
use libp2p::{PeerId, StreamProtocol, identity, noise, tcp, yamux};
use tokio::sync::mpsc;

pub use client::Client;
pub use codec::{FdCodec, Traffic, TrafficCounters};
pub use event_loop::EventLoop;

/// The application protocol name.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/fd/1");

/// A request from a peer, waiting for the program's answer through [`Client::respond`].
#[derive(Debug)]
pub struct InboundRequest {
    pub peer: PeerId,
    pub message: Message,
    pub channel: ResponseChannel<Message>,
}

/// The libp2p identity that goes with a share-signing key: the same Ed25519 secret.
pub fn libp2p_keypair(key: &SigningKey) -> identity::Keypair {
    identity::Keypair::ed25519_from_bytes(*key.seed())
        .expect("a 32-byte seed is a valid ed25519 secret")
}

/// The PeerId of the member whose share-signing key is `key`.
pub fn peer_id_of(key: &PublicKey) -> anyhow::Result<PeerId> {
    let pk = identity::ed25519::PublicKey::try_from_bytes(&key.0)
        .context("member key is not a valid Ed25519 key")?;
    Ok(identity::PublicKey::from(pk).to_peer_id())
}

/// Bytes `message` takes on the wire: its frame plus the 4-byte length prefix
/// [`FdCodec`] writes (and counts in [`TrafficCounters`]).
pub fn frame_len(message: &Message) -> anyhow::Result<u64> {
    Ok(fd_protocol::encode(message)?.len() as u64 + 4)
}

/// How long one request may take, e.g. a large share on a slow link.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Builds the swarm for `key` and splits it into client, inbound requests and event loop.
/// Spawn [`EventLoop::run`] on the tokio runtime.
pub fn new(
    key: &SigningKey,
) -> anyhow::Result<(Client, mpsc::Receiver<InboundRequest>, EventLoop)> {
    let counters = Arc::new(TrafficCounters::default());
    let codec = FdCodec::new(counters.clone());
    let swarm = libp2p::SwarmBuilder::with_existing_identity(libp2p_keypair(key))
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                codec,
                [(PROTOCOL, ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(REQUEST_TIMEOUT),
            )
        })?
        // Rounds can be minutes apart; keep connections instead of redialling.
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(600)))
        .build();
    let (command_tx, command_rx) = mpsc::channel(64);
    let (request_tx, request_rx) = mpsc::channel(256);
    let local_peer_id = *swarm.local_peer_id();
    Ok((
        Client::new(command_tx, local_peer_id, counters),
        request_rx,
        EventLoop::new(swarm, command_rx, request_tx),
    ))
}
