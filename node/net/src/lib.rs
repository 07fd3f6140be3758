//! # fd-net
//!
//! libp2p networking of an fd member, also the coordinator's: the swarm and
//! its client ([`client`], [`event_loop`]), the wire codec ([`codec`]),
//! large-share transfers ([`transfer`]), who may connect ([`membership`],
//! the allow-list), identities on disk ([`keyfile`]), the `[federation]`
//! table both read ([`config`]), and the Prometheus endpoint ([`telemetry`]).
//! Depends on `fd-protocol` and `fd-data` only: no ML stack, so a host that
//! runs only a coordinator never compiles burn.
//!
//! Shaped after rust-libp2p's file-sharing example: the [`Swarm`] lives in one
//! [`EventLoop`] task; the rest of the program talks to it through a
//! cloneable [`Client`] of commands with oneshot replies, and reads inbound
//! requests as [`InboundRequest`]s from a channel. Network code never sees a
//! tensor and learning code never sees a socket.
//!
//! Transports: QUIC (`/udp/<port>/quic-v1`: TLS 1.3 with the libp2p
//! identity in the certificate, QUIC's own streams) and TCP + Noise + Yamux
//! (`/tcp/<port>`), both built, so a member listens and dials on either.
//! A closed network ([`NetConfig::psk`], libp2p pnet) wraps TCP only: pnet
//! has no QUIC form, so with a key QUIC is not built at all and configs with
//! QUIC addresses are refused ([`quic_under_psk`]). Dialling races every
//! known address of a peer and keeps the first connection; [`prefer_quic`]
//! puts QUIC addresses first, and QUIC's one-round-trip handshake usually
//! wins. Application protocol: one
//! request-response protocol, `/fd/1`, carrying [`fd_protocol::Message`]
//! frames (see [`codec`]). Shares are pushed by their sender to each member;
//! the receiver answers `ShareAccepted` or `ShareRejected` after validating.
//! Shares too large for one frame are announced on gossipsub and pulled in
//! chunks (see [`transfer`]).
//!
//! # Floods
//!
//! The event loop never waits on the program. Each request it hands over
//! counts against its peer until answered: a peer with
//! [`MAX_IN_FLIGHT_PER_PEER`] requests unanswered, or any request while
//! [`MAX_IN_FLIGHT`] are, is answered `Refused { code: "busy" }` at once,
//! counted ([`TrafficCounters::requests_busy`]) and logged (a line per peer
//! per second, with the count). So one peer's flood costs every other peer
//! nothing but a place in a bounded queue, and memory stays bounded: at
//! most [`MAX_STREAMS_PER_CONNECTION`] frames being read per connection,
//! [`MAX_IN_FLIGHT`] queued.
//!
//! # Behaviour composition ([`Behaviour`])
//!
//! | field | what | when |
//! |---|---|---|
//! | `allowed` | `allow_block_list` with [`AllowedPeers`]: connections to or from any other peer are denied, inbound and outbound | [`NetConfig::allowed`] is `Some` |
//! | `limits` | `connection_limits`: [`MAX_CONNECTIONS_PER_PEER`], [`MAX_PENDING_INCOMING`], [`MAX_ESTABLISHED_INCOMING`] | always |
//! | `request_response` | `/fd/1` with [`FdCodec`] | always |
//! | `identify` | `/fd/id/1`: listen addresses, fed into Kademlia | always |
//! | `kademlia` | `/fd/kad/1` (a private DHT, never the IPFS one), server mode, in-memory store | [`NetConfig::kademlia`] |
//! | `gossipsub` | signed messages, strict validation, application-level acceptance, message id = SHA-256 of the data, flood publish; topic `/fd/<federation_id>/shares` | always (subscribed once a federation id is set) |
//! | `mdns` | LAN discovery (tokio) | [`NetConfig::mdns`] |
//!
//! The pre-shared key wraps the TCP stream before Noise, so a peer without
//! the key (or with another) fails the handshake before any protocol runs,
//! in both directions.
//!
//! [`Swarm`]: libp2p::Swarm

pub mod client;
pub mod codec;
pub mod config;
pub mod event_loop;
pub mod keyfile;
pub mod membership;
pub mod relay_use;
pub mod telemetry;
pub mod transfer;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use either::Either;
use fd_protocol::transfer::ShareAnnouncement;
use fd_protocol::{Message, PublicKey, SigningKey};
use libp2p::allow_block_list::{self, AllowedPeers};
use libp2p::connection_limits;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Boxed;
use libp2p::core::upgrade::Version;
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::request_response::{self, ProtocolSupport, ResponseChannel};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Transport as _, autonat, dcutr, gossipsub, identify,
    identity, kad, mdns, noise, quic, relay, tcp, yamux,
};
use tokio::sync::mpsc;

pub use client::{Client, Connected, RelayedOnly, request_with_retry};
pub use codec::{FdCodec, Traffic, TrafficCounters};
pub use config::{RelayConfig, RelayLimits, RelayMode};
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
///
/// Computed without the frame limit, so it also answers for a share too
/// large to be pushed whole (which would travel in chunks instead).
pub fn frame_len(message: &Message) -> anyhow::Result<u64> {
    Ok(fd_protocol::codec::encoded_len(message)? as u64 + 4)
}

/// [`frame_len`] of `Message::Share(share)`, without cloning the share.
pub fn share_frame_len(share: &fd_protocol::LogitShare) -> anyhow::Result<u64> {
    Ok(fd_protocol::codec::share_frame_len(share)? as u64 + 4)
}

/// How long one request may take, e.g. a large share on a slow link.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// The identify protocol version fd peers announce.
pub const IDENTIFY_PROTOCOL: &str = "/fd/id/1";

/// The Kademlia protocol: a DHT of fd peers only.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/fd/kad/1");

/// Largest gossip message: announcements are a few hundred bytes.
pub const MAX_GOSSIP_BYTES: usize = 64 * 1024;

/// Time allowed for a connection's handshake (TCP, pre-shared key, Noise, Yamux).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// Requests one peer may have waiting for the program's answer; more are
/// answered `busy` at once. An honest member has one or two in flight (its
/// share, a report, a control message); a coordinator one per member it
/// broadcasts to, each on its own peer.
pub const MAX_IN_FLIGHT_PER_PEER: usize = 8;

/// Requests all peers together may have waiting for the program's answer
/// (the queue between the event loop and the program is this long too).
/// With frames of at most [`fd_protocol::MAX_MESSAGE_BYTES`], the queued
/// requests hold at most 64 × 4 MiB.
pub const MAX_IN_FLIGHT: usize = 64;

/// Inbound request streams one connection may have open at once
/// (libp2p request-response drops the streams above it).
pub const MAX_STREAMS_PER_CONNECTION: usize = 16;

/// Connections one peer may hold at once (both dialled at the same time
/// gives two; a restart briefly three).
pub const MAX_CONNECTIONS_PER_PEER: u32 = 4;

/// Inbound connections still in their handshake, and established inbound
/// connections, at most: a flood of connections is refused by the swarm
/// before any protocol runs.
pub const MAX_PENDING_INCOMING: u32 = 64;
pub const MAX_ESTABLISHED_INCOMING: u32 = 512;

/// The gossipsub topic of a federation's share announcements.
pub fn shares_topic(federation_id: &str) -> gossipsub::IdentTopic {
    gossipsub::IdentTopic::new(format!("/fd/{federation_id}/shares"))
}

/// How a member's network is set up.
#[derive(Clone, Default)]
pub struct NetConfig {
    /// Only these peers may hold a connection (libp2p allow_block_list::AllowedPeers); None = anyone.
    pub allowed: Option<Vec<PeerId>>,
    /// Closed network: libp2p pnet pre-shared key over TCP (peers without the key fail the handshake).
    pub psk: Option<PreSharedKey>,
    /// Kademlia (peer discovery without a coordinator) and identify (listen addresses into kad).
    pub kademlia: bool,
    /// mDNS on a LAN (optional; off by default).
    pub mdns: bool,
    /// Federation id; the share-announcement gossipsub topic is "/fd/<id>/shares".
    /// Empty: no topic until [`Client::set_federation`].
    pub federation_id: String,
    /// Reaching this node through relays (see [`relay_use`]).
    pub relay: RelayUse,
    /// Relay for others within these limits (relay v2 server); None: not a relay.
    pub relay_service: Option<RelayLimits>,
}

/// How this node uses relays: when it reserves a slot ([`RelayMode`]), on
/// which relays, and the largest share it pushes over a relayed connection.
#[derive(Clone, Debug)]
pub struct RelayUse {
    pub mode: RelayMode,
    /// (relay, its address without `/p2p/<relay>`).
    pub relays: Vec<(PeerId, Multiaddr)>,
    pub max_relayed_share_bytes: u64,
}

impl Default for RelayUse {
    fn default() -> Self {
        RelayUse {
            mode: RelayMode::Auto,
            relays: Vec::new(),
            max_relayed_share_bytes: RelayConfig::default().max_relayed_share_bytes,
        }
    }
}

impl NetConfig {
    /// Anyone may connect, no pre-shared key, no Kademlia, no mDNS, no topic yet:
    /// what [`new`] builds.
    pub fn open() -> Self {
        NetConfig::default()
    }
}

impl std::fmt::Debug for NetConfig {
    // Never prints the pre-shared key itself.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetConfig")
            .field("allowed", &self.allowed)
            .field(
                "psk",
                &self.psk.map(|k| format!("fingerprint {}", k.fingerprint())),
            )
            .field("kademlia", &self.kademlia)
            .field("mdns", &self.mdns)
            .field("federation_id", &self.federation_id)
            .field("relay", &self.relay)
            .field("relay_service", &self.relay_service)
            .finish()
    }
}

/// The composed libp2p behaviour (see the module doc).
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    pub allowed: Toggle<allow_block_list::Behaviour<AllowedPeers>>,
    pub limits: connection_limits::Behaviour,
    pub request_response: request_response::Behaviour<FdCodec>,
    pub identify: identify::Behaviour,
    pub kademlia: Toggle<kad::Behaviour<kad::store::MemoryStore>>,
    pub gossipsub: gossipsub::Behaviour,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    pub relay_client: relay::client::Behaviour,
    pub relay: Toggle<relay::Behaviour>,
    pub dcutr: dcutr::Behaviour,
    pub autonat: autonat::Behaviour,
}

/// Everything [`new_with`] builds: spawn `event_loop.run()`, answer
/// `requests` through `client`, and read `announcements` of pulled shares
/// (already checked: federation, size, author = announced sender).
pub struct Network {
    pub client: Client,
    pub requests: mpsc::Receiver<InboundRequest>,
    pub announcements: mpsc::Receiver<(PeerId, ShareAnnouncement)>,
    pub event_loop: EventLoop,
}

/// `addr` ending in `/p2p/<peer id>` → (peer id, the address without it).
pub fn split_peer_addr(addr: &Multiaddr) -> anyhow::Result<(PeerId, Multiaddr)> {
    let mut base = addr.clone();
    match base.pop() {
        Some(Protocol::P2p(peer)) => Ok((peer, base)),
        _ => Err(anyhow!("address {addr} does not end in /p2p/<peer id>")),
    }
}

/// Whether `addr` is a QUIC address (`…/udp/<port>/quic-v1…`).
pub fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::QuicV1))
}

/// `addrs` with QUIC addresses first, each group in its given order: the
/// swarm dials a peer's addresses concurrently in this order.
pub fn prefer_quic(mut addrs: Vec<Multiaddr>) -> Vec<Multiaddr> {
    addrs.sort_by_key(|a| !is_quic(a));
    addrs
}

/// The error for a QUIC address in a closed (pre-shared key) network, or
/// `None`. `field` names the config field the address came from.
pub fn quic_under_psk(field: &str, addr: &str) -> Option<String> {
    let parsed: Multiaddr = addr.parse().ok()?;
    is_quic(&parsed).then(|| {
        format!(
            "`{field}` has the QUIC address {addr}, but a closed federation (psk_file) runs \
             over TCP only: libp2p's pre-shared key (pnet) wraps TCP streams and has no QUIC \
             form. Use a /tcp/ address, or drop psk_file and keep the federation closed with \
             its member list (the allow-list refuses any other PeerId)"
        )
    })
}

fn transport(
    keypair: &identity::Keypair,
    psk: Option<PreSharedKey>,
    relay_transport: relay::client::Transport,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, Box<dyn std::error::Error + Send + Sync>> {
    let noise = noise::Config::new(keypair)?;
    // Relayed connections (`…/p2p-circuit/p2p/<peer>`) run Noise + Yamux
    // inside the circuit, end to end: the relay sees ciphertext. No
    // pre-shared key inside: a circuit needs a connection to the relay,
    // which under a key is itself pnet-wrapped, and both ends pass the
    // allow-list.
    let relayed = relay_transport
        .upgrade(Version::V1Lazy)
        .authenticate(noise.clone())
        .multiplex(yamux::Config::default())
        .timeout(HANDSHAKE_TIMEOUT)
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)));
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    // With a key, every TCP connection first runs the pnet handshake; libp2p
    // implements `Transport` for `Either`, so one upgrade chain serves both
    // (as in rust-libp2p's ipfs-private example).
    let tcp = match psk {
        Some(psk) => {
            Either::Left(tcp.and_then(move |socket, _| PnetConfig::new(psk).handshake(socket)))
        }
        None => Either::Right(tcp),
    };
    let tcp = tcp
        .upgrade(Version::V1Lazy)
        .authenticate(noise)
        .multiplex(yamux::Config::default())
        .timeout(HANDSHAKE_TIMEOUT)
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)));
    let tcp = relayed
        .or_transport(tcp)
        .map(|either, _| either.into_inner());
    if psk.is_some() {
        return Ok(tcp.boxed());
    }
    let mut quic_config = quic::Config::new(keypair);
    quic_config.handshake_timeout = HANDSHAKE_TIMEOUT;
    let quic = quic::tokio::Transport::new(quic_config)
        .map(|(peer, connection), _| (peer, StreamMuxerBox::new(connection)));
    Ok(quic
        .or_transport(tcp)
        .map(|either, _| either.into_inner())
        .boxed())
}

fn behaviour(
    keypair: &identity::Keypair,
    config: &NetConfig,
    counters: Arc<TrafficCounters>,
    relay_client: relay::client::Behaviour,
) -> anyhow::Result<Behaviour> {
    let local = keypair.public().to_peer_id();
    let allowed = config.allowed.as_ref().map(|peers| {
        let mut list = allow_block_list::Behaviour::<AllowedPeers>::default();
        for peer in peers {
            list.allow_peer(*peer);
        }
        list
    });
    let request_response = request_response::Behaviour::with_codec(
        FdCodec::new(counters),
        [(PROTOCOL, ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(REQUEST_TIMEOUT)
            .with_max_concurrent_streams(MAX_STREAMS_PER_CONNECTION),
    );
    let identify = identify::Behaviour::new(
        identify::Config::new(IDENTIFY_PROTOCOL.to_string(), keypair.public())
            .with_agent_version(format!("fd-node/{}", env!("CARGO_PKG_VERSION")))
            // A reservation's circuit address reaches connected peers at once.
            .with_push_listen_addr_updates(true),
    );
    let kademlia = config.kademlia.then(|| {
        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        kad_config.set_query_timeout(Duration::from_secs(30));
        let mut kad =
            kad::Behaviour::with_config(local, kad::store::MemoryStore::new(local), kad_config);
        // Members rarely have a confirmed external address (NAT, 127.0.0.1 in
        // tests); answer queries anyway, the network is private to the federation.
        kad.set_mode(Some(kad::Mode::Server));
        kad
    });
    let gossip_config = gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .message_id_fn(|message: &gossipsub::Message| {
            gossipsub::MessageId::from(fd_protocol::digest::sha256(&message.data).to_hex())
        })
        .flood_publish(true)
        .max_transmit_size(MAX_GOSSIP_BYTES)
        .build()
        .map_err(|e| anyhow!("gossipsub config: {e}"))?;
    let gossipsub = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(keypair.clone()),
        gossip_config,
    )
    .map_err(|e| anyhow!("gossipsub: {e}"))?;
    let mdns = if config.mdns {
        Some(mdns::tokio::Behaviour::new(mdns::Config::default(), local).context("mDNS")?)
    } else {
        None
    };
    let limits = connection_limits::Behaviour::new(
        connection_limits::ConnectionLimits::default()
            .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
            .with_max_pending_incoming(Some(MAX_PENDING_INCOMING))
            .with_max_established_incoming(Some(MAX_ESTABLISHED_INCOMING)),
    );
    let relay = config.relay_service.map(|limits| {
        relay::Behaviour::new(local, relay_use::server_config(&limits))
    });
    Ok(Behaviour {
        allowed: allowed.into(),
        limits,
        request_response,
        identify,
        kademlia: kademlia.into(),
        gossipsub,
        mdns: mdns.into(),
        relay_client,
        relay: relay.into(),
        dcutr: dcutr::Behaviour::new(local),
        autonat: autonat::Behaviour::new(local, relay_use::autonat_config()),
    })
}

/// Builds the swarm for `key` as `config` says and splits it into client,
/// inbound requests, inbound share announcements and event loop.
/// Spawn [`EventLoop::run`] on the tokio runtime.
pub fn new_with(key: &SigningKey, config: &NetConfig) -> anyhow::Result<Network> {
    let counters = Arc::new(TrafficCounters::default());
    let keypair = libp2p_keypair(key);
    let (relay_transport, relay_client) = relay::client::new(keypair.public().to_peer_id());
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(|keypair| transport(keypair, config.psk, relay_transport))?
        .with_behaviour(|keypair| {
            behaviour(keypair, config, counters.clone(), relay_client)
                .map_err(Box::<dyn std::error::Error + Send + Sync>::from)
        })?
        // Rounds can be minutes apart; keep connections instead of redialling.
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(600)))
        .build();
    let topic = if config.federation_id.is_empty() {
        None
    } else {
        let topic = shares_topic(&config.federation_id);
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&topic)
            .map_err(|e| anyhow!("cannot subscribe to {topic}: {e}"))?;
        Some(topic)
    };
    let (command_tx, command_rx) = mpsc::channel(64);
    let (request_tx, request_rx) = mpsc::channel(MAX_IN_FLIGHT);
    let (announcement_tx, announcement_rx) = mpsc::channel(256);
    let local_peer_id = *swarm.local_peer_id();
    Ok(Network {
        client: Client::new(
            command_tx,
            local_peer_id,
            counters.clone(),
            config.relay.max_relayed_share_bytes,
        ),
        requests: request_rx,
        announcements: announcement_rx,
        event_loop: EventLoop::new(
            swarm,
            command_rx,
            request_tx,
            announcement_tx,
            counters,
            config.federation_id.clone(),
            topic,
            config.relay.clone(),
        ),
    })
}

/// Builds the swarm for `key` with an open configuration ([`NetConfig::open`])
/// and splits it into client, inbound requests and event loop.
/// Spawn [`EventLoop::run`] on the tokio runtime.
pub fn new(
    key: &SigningKey,
) -> anyhow::Result<(Client, mpsc::Receiver<InboundRequest>, EventLoop)> {
    let network = new_with(key, &NetConfig::open())?;
    Ok((network.client, network.requests, network.event_loop))
}

/// Reads a pre-shared key in the go-ipfs `swarm.key` format.
pub fn load_psk(path: &std::path::Path) -> anyhow::Result<PreSharedKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read psk_file {}", path.display()))?;
    text.parse::<PreSharedKey>().map_err(|e| {
        anyhow!(
            "psk_file {} is not a pre-shared key (\"/key/swarm/psk/1.0.0/\", \"/base16/\", 64 hex digits): {e}",
            path.display()
        )
    })
}

/// A fresh pre-shared key in the `swarm.key` format.
pub fn new_psk_text() -> String {
    let key: [u8; 32] = rand::random();
    format!("/key/swarm/psk/1.0.0/\n/base16/\n{}\n", hex::encode(key))
}
