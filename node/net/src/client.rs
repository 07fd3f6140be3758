//! The handle through which the program drives the swarm.

use std::borrow::Borrow;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use fd_protocol::{Message, RejectReason};
use fd_protocol::transfer::{MAX_SHARE_BYTES, ShareAnnouncement};
use libp2p::request_response::ResponseChannel;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

use super::codec::{Traffic, TrafficCounters};
use super::transfer;

/// What [`Client::dial`] got: a connection to the peer, and whether it is
/// relayed (through a circuit relay) rather than direct.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connected {
    pub relayed: bool,
}

/// Commands the [`super::EventLoop`] executes on the swarm.
#[derive(Debug)]
pub(crate) enum Command {
    Listen {
        addr: Multiaddr,
        reply: oneshot::Sender<anyhow::Result<Multiaddr>>,
    },
    AddAddress {
        peer: PeerId,
        addr: Multiaddr,
    },
    Request {
        peer: PeerId,
        message: Message,
        reply: oneshot::Sender<anyhow::Result<Message>>,
    },
    Respond {
        channel: ResponseChannel<Message>,
        message: Message,
    },
    Dial {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        reply: oneshot::Sender<anyhow::Result<Connected>>,
    },
    ConnectedPeers {
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    Bootstrap {
        addrs: Vec<(PeerId, Multiaddr)>,
        reply: oneshot::Sender<anyhow::Result<()>>,
    },
    FindPeer {
        peer: PeerId,
        reply: oneshot::Sender<anyhow::Result<Vec<Multiaddr>>>,
    },
    OfferShare {
        announcement: ShareAnnouncement,
        bytes: Arc<Vec<u8>>,
    },
    Announce {
        announcement: ShareAnnouncement,
        wait_for: Vec<PeerId>,
        timeout: Duration,
        reply: oneshot::Sender<anyhow::Result<()>>,
    },
    SetFederation {
        federation_id: String,
        reply: oneshot::Sender<anyhow::Result<()>>,
    },
    AllowPeer {
        peer: PeerId,
        allow: bool,
    },
}

/// Cloneable handle to the network event loop.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    local_peer_id: PeerId,
    counters: Arc<TrafficCounters>,
    /// Larger shares are not moved over a relayed connection
    /// ([`super::RelayUse::max_relayed_share_bytes`]).
    max_relayed_share_bytes: u64,
}

/// A share of `bytes` was not pulled from `peer`: the only connection to it
/// is relayed, and the share is over `max_relayed_share_bytes`. A direct
/// dial was started; try again later.
#[derive(Debug, thiserror::Error)]
#[error(
    "{peer} is connected through a relay only, and a share of {bytes} bytes is over max_relayed_share_bytes ({limit}): waiting for a direct connection"
)]
pub struct RelayedOnly {
    pub peer: PeerId,
    pub bytes: u64,
    pub limit: u64,
}

impl Client {
    pub(crate) fn new(
        commands: mpsc::Sender<Command>,
        local_peer_id: PeerId,
        counters: Arc<TrafficCounters>,
        max_relayed_share_bytes: u64,
    ) -> Self {
        Client {
            commands,
            local_peer_id,
            counters,
            max_relayed_share_bytes,
        }
    }

    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// Bytes sent and received so far.
    pub fn traffic(&self) -> Traffic {
        self.counters.snapshot()
    }

    /// The live counters behind [`Self::traffic`] (e.g. for telemetry).
    pub fn counters(&self) -> Arc<TrafficCounters> {
        self.counters.clone()
    }

    async fn send(&self, command: Command) -> anyhow::Result<()> {
        self.commands
            .send(command)
            .await
            .map_err(|_| anyhow!("the network event loop has stopped"))
    }

    /// Starts listening; returns the bound address (port 0 resolved).
    pub async fn listen(&self, addr: Multiaddr) -> anyhow::Result<Multiaddr> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Listen { addr, reply }).await?;
        rx.await
            .context("the network event loop dropped a listen reply")?
    }

    /// Tells the swarm where `peer` can be dialled.
    pub async fn add_address(&self, peer: PeerId, addr: Multiaddr) -> anyhow::Result<()> {
        self.send(Command::AddAddress { peer, addr }).await
    }

    /// Tells the swarm where `member` listens (its announced addresses,
    /// QUIC first, or, without any, whatever Kademlia finds); returns its
    /// PeerId.
    pub async fn add_member(&self, member: &fd_protocol::Member) -> anyhow::Result<PeerId> {
        let peer = super::peer_id_of(&member.key)?;
        let parsed = member.addrs.iter().filter_map(|a| a.parse().ok()).collect();
        let mut known = false;
        for addr in super::prefer_quic(parsed) {
            self.add_address(peer, addr).await?;
            known = true;
        }
        if !known
            && !self.connected_peers().await?.contains(&peer)
            && let Err(e) = self.find_peer(peer).await
        {
            tracing::debug!(%peer, "no address found for the member yet: {e:#}");
        }
        Ok(peer)
    }

    /// Sends `message` to `peer` (dialling if needed) and waits for its answer.
    pub async fn request(&self, peer: PeerId, message: Message) -> anyhow::Result<Message> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Request {
            peer,
            message,
            reply,
        })
        .await?;
        rx.await
            .context("the network event loop dropped a request reply")?
    }

    /// Answers an inbound request.
    pub async fn respond(
        &self,
        channel: ResponseChannel<Message>,
        message: Message,
    ) -> anyhow::Result<()> {
        self.send(Command::Respond { channel, message }).await
    }

    /// Dials `peer` at `addrs` (plus any address already known for it) and
    /// waits until a connection is established. Ok at once if connected.
    pub async fn dial(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> anyhow::Result<Connected> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Dial { peer, addrs, reply }).await?;
        rx.await
            .context("the network event loop dropped a dial reply")?
    }

    /// Peers with at least one open connection.
    pub async fn connected_peers(&self) -> anyhow::Result<Vec<PeerId>> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::ConnectedPeers { reply }).await?;
        rx.await
            .context("the network event loop dropped a connected-peers reply")
    }

    /// Joins the Kademlia network through `addrs` (each ending in
    /// `/p2p/<peer id>`): adds them to the routing table, dials them and runs
    /// a Kademlia bootstrap; returns when the bootstrap finished. With
    /// Kademlia off it only dials.
    pub async fn bootstrap(&self, addrs: Vec<Multiaddr>) -> anyhow::Result<()> {
        let addrs = addrs
            .into_iter()
            .map(|a| super::split_peer_addr(&a))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (reply, rx) = oneshot::channel();
        self.send(Command::Bootstrap { addrs, reply }).await?;
        rx.await
            .context("the network event loop dropped a bootstrap reply")?
    }

    /// Addresses of `peer` found through Kademlia (routing table, else a
    /// closest-peers query). They are also handed to the swarm, so a later
    /// [`Client::request`] to `peer` can dial it by id.
    pub async fn find_peer(&self, peer: PeerId) -> anyhow::Result<Vec<Multiaddr>> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::FindPeer { peer, reply }).await?;
        rx.await
            .context("the network event loop dropped a find-peer reply")?
    }

    /// Keeps `bytes` (an encoded share, [`fd_protocol::encode_share`]) in
    /// the event loop so that peers can fetch it in chunks; the event loop
    /// answers their `FetchChunk` requests itself. Fails if `bytes` do not
    /// match `announcement` (length, SHA-256) or exceed the limit.
    ///
    /// Takes the announcement by value or by reference.
    pub async fn offer_share(
        &self,
        announcement: impl Borrow<ShareAnnouncement>,
        bytes: Arc<Vec<u8>>,
    ) -> anyhow::Result<()> {
        let announcement = announcement.borrow();
        if bytes.len() > MAX_SHARE_BYTES {
            bail!(
                "share of {} bytes exceeds the limit of {MAX_SHARE_BYTES} bytes",
                bytes.len()
            );
        }
        announcement
            .verify(&bytes)
            .context("offered bytes do not match their announcement")?;
        self.send(Command::OfferShare {
            announcement: announcement.clone(),
            bytes,
        })
        .await
    }

    /// [`Client::offer_share`] without the checks: lets tests play a sender
    /// whose bytes do not match what it announces.
    #[cfg(test)]
    pub(crate) async fn offer_share_unchecked(
        &self,
        announcement: &ShareAnnouncement,
        bytes: Arc<Vec<u8>>,
    ) -> anyhow::Result<()> {
        self.send(Command::OfferShare {
            announcement: announcement.clone(),
            bytes,
        })
        .await
    }

    /// Publishes `announcement` on the federation's gossip topic, after
    /// waiting (at most `timeout`) until every peer in `wait_for` is
    /// connected and subscribed to the topic, dialling those that are not.
    /// At the deadline it publishes to whoever is subscribed and logs the
    /// missing peers (a member may simply be offline; push the announcement
    /// to it later as a `ShareAvailable` request if it matters). Fails only
    /// if the announcement could not be published at all: no federation
    /// set, or nobody subscribed. Publishing the same announcement again is
    /// a no-op (gossip message ids are content hashes).
    ///
    /// Takes the announcement by value or by reference.
    pub async fn announce(
        &self,
        announcement: impl Borrow<ShareAnnouncement>,
        wait_for: Vec<PeerId>,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let announcement = announcement.borrow();
        let (reply, rx) = oneshot::channel();
        self.send(Command::Announce {
            announcement: announcement.clone(),
            wait_for,
            timeout,
            reply,
        })
        .await?;
        rx.await
            .context("the network event loop dropped an announce reply")?
    }

    /// Pulls the share `announcement` describes from `peer` in chunks and
    /// returns its bytes once each chunk's length, the total and the SHA-256
    /// digest match; decode with [`fd_protocol::decode_share`] and validate.
    ///
    /// A share over `max_relayed_share_bytes` is not pulled over a relayed
    /// connection: with only such a connection to `peer` (after dialling
    /// it), this fails with [`RelayedOnly`] at once, and a direct dial has
    /// been started (the event loop dials a peer's own addresses whenever
    /// only a relayed connection to it exists).
    pub async fn fetch_share(
        &self,
        peer: PeerId,
        announcement: &ShareAnnouncement,
    ) -> anyhow::Result<Vec<u8>> {
        if announcement.bytes > self.max_relayed_share_bytes
            && self.dial(peer, Vec::new()).await?.relayed
        {
            return Err(RelayedOnly {
                peer,
                bytes: announcement.bytes,
                limit: self.max_relayed_share_bytes,
            }
            .into());
        }
        transfer::fetch(self, peer, announcement).await
    }

    /// Switches the share-announcement topic to `/fd/<federation_id>/shares`
    /// (unsubscribing from the previous one), and the federation inbound
    /// announcements are checked against.
    pub async fn set_federation(&self, federation_id: &str) -> anyhow::Result<()> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::SetFederation {
            federation_id: federation_id.to_string(),
            reply,
        })
        .await?;
        rx.await
            .context("the network event loop dropped a set-federation reply")?
    }

    /// Adds `peer` to (or, with `allow = false`, removes it from and
    /// disconnects it) the allow-list. No effect on an open network
    /// ([`super::NetConfig::allowed`] = `None`).
    pub async fn allow_peer(&self, peer: PeerId, allow: bool) -> anyhow::Result<()> {
        self.send(Command::AllowPeer { peer, allow }).await
    }
}

/// Sends a request, retrying transport failures and `busy` answers with a
/// growing pause.
pub async fn request_with_retry(
    client: &Client,
    peer: PeerId,
    message: Message,
    attempts: u32,
) -> anyhow::Result<Message> {
    let mut last = None;
    for attempt in 0..attempts.max(1) {
        match client.request(peer, message.clone()).await {
            Ok(Message::Refused { code, reason }) if code == RejectReason::Busy.as_str() => {
                tracing::debug!(%peer, attempt, "peer busy: {reason}");
                last = Some(anyhow!("{peer} stayed busy: {reason}"));
            }
            Ok(answer) => return Ok(answer),
            Err(e) => {
                tracing::debug!(%peer, attempt, "request failed: {e:#}");
                last = Some(e);
            }
        }
        tokio::time::sleep(Duration::from_millis(250 * (attempt as u64 + 1))).await;
    }
    Err(last.unwrap_or_else(|| anyhow!("no attempt made")))
}
