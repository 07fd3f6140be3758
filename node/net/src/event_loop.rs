//! The task that owns the swarm.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::anyhow;
use fd_protocol::transfer::ShareAnnouncement;
use fd_protocol::{Message, RejectReason};
use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, InboundRequestId, OutboundRequestId};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, autonat, dcutr, identify, kad, mdns, relay};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};

use super::client::{Command, Connected};
use super::codec::TrafficCounters;
use super::relay_use::{RESERVATION_RETRY, circuit_addr};
use super::transfer::OutgoingStore;
use super::{
    Behaviour, BehaviourEvent, InboundRequest, KAD_PROTOCOL, RelayMode, RelayUse, peer_id_of,
    shares_topic,
};

/// How often pending announcements are re-checked (subscriptions, deadlines).
const ANNOUNCE_TICK: Duration = Duration::from_millis(100);

/// How long the larger PeerId of two members waits before dialling the
/// other through a relay (see [`EventLoop::add_circuit_addresses`]).
const CIRCUIT_DEFER: Duration = Duration::from_secs(1);

/// How long a node with relay mode `always` waits for its first listen
/// address before it reserves anyway; it reserves as soon as it listens.
/// The program asks it to listen right after starting it, so this only
/// runs out for a node that listens nowhere.
///
/// Why wait: a TCP dial made before the node listens cannot leave from the
/// listen port, so the relay (and identify) would observe an ephemeral
/// port, DCUtR would hand peers that port as this node's hole-punching
/// address, and the peers' dials would be dropped by this node's NAT
/// (measured: members 1 and 2 of `tests/tests/nat.rs` stayed relayed in 3
/// of 18 runs this way).
const FIRST_RESERVATION_GRACE: Duration = Duration::from_secs(1);

/// How often a pending announcement redials the peers it waits for.
const ANNOUNCE_REDIAL: Duration = Duration::from_secs(1);

type Reply<T> = oneshot::Sender<anyhow::Result<T>>;

/// An announcement waiting for its peers to subscribe.
struct PendingAnnounce {
    data: Vec<u8>,
    wait_for: Vec<PeerId>,
    deadline: Instant,
    next_dial: Instant,
    reply: Reply<()>,
}

/// Runs the swarm until every [`super::Client`] is dropped.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    requests: mpsc::Sender<InboundRequest>,
    announcements: mpsc::Sender<(PeerId, ShareAnnouncement)>,
    counters: Arc<TrafficCounters>,
    federation_id: String,
    topic: Option<IdentTopic>,
    outgoing: OutgoingStore,
    pending_listen: HashMap<ListenerId, Reply<Multiaddr>>,
    pending_requests: HashMap<OutboundRequestId, Reply<Message>>,
    pending_dials: HashMap<PeerId, Vec<Reply<Connected>>>,
    pending_bootstrap: HashMap<kad::QueryId, Reply<()>>,
    pending_find: HashMap<kad::QueryId, (PeerId, Reply<Vec<Multiaddr>>)>,
    pending_announces: Vec<PendingAnnounce>,
    /// Responses carrying the last chunk of a share: a pulled share is
    /// counted as sent once one of them has been written.
    last_chunk_responses: HashSet<InboundRequestId>,
    /// Requests handed to the program and not answered yet.
    in_flight: InFlight,
    relays: RelayState,
}

/// What the event loop tracks about relays and relayed connections
/// (see [`super::relay_use`]).
struct RelayState {
    config: RelayUse,
    /// Whether this node should hold reservations (mode `always`, or
    /// `auto` once AutoNAT found it private).
    wanted: bool,
    /// Reservation listeners, by relay.
    reservations: HashMap<PeerId, ListenerId>,
    /// When to (re)try the relays without a reservation.
    retry_at: Option<Instant>,
    /// Whether this node listens on an address of its own (not a
    /// circuit). The first reservation waits for it, or for
    /// [`FIRST_RESERVATION_GRACE`]: see [`EventLoop::reserve`].
    listening: bool,
    /// Every open connection: its peer and whether it is relayed.
    connections: HashMap<ConnectionId, (PeerId, bool)>,
    /// Relayed connections this node dialled.
    dialled_relayed: HashSet<ConnectionId>,
    /// Relayed connections being closed (a direct one to their peer
    /// exists, or a duplicate).
    closing: HashSet<ConnectionId>,
    /// Requests held back until their peer's relayed connections are
    /// closed, so they go over the direct one (request-response spreads
    /// requests over all of a peer's connections).
    held: Vec<(PeerId, Message, Reply<Message>)>,
    /// Outbound requests not answered yet, by peer.
    outbound: HashMap<OutboundRequestId, PeerId>,
    /// When this node (the larger PeerId of the pair) first wanted to dial a
    /// peer it has no connection to: its circuit addresses are added only
    /// [`CIRCUIT_DEFER`] later (see [`EventLoop::add_circuit_addresses`]).
    circuit_deferred: HashMap<PeerId, Instant>,
    /// Peers' own (not relayed) addresses, from the program and from
    /// identify: dialled when only a relayed connection to the peer exists.
    direct_addrs: HashMap<PeerId, Vec<Multiaddr>>,
    /// Outbound `Share` requests not answered yet.
    share_requests: HashSet<OutboundRequestId>,
}

impl RelayState {
    fn new(config: RelayUse) -> Self {
        let wanted = config.mode == RelayMode::Always && !config.relays.is_empty();
        RelayState {
            wanted,
            retry_at: wanted.then(|| Instant::now() + FIRST_RESERVATION_GRACE),
            listening: false,
            config,
            reservations: HashMap::new(),
            connections: HashMap::new(),
            dialled_relayed: HashSet::new(),
            closing: HashSet::new(),
            held: Vec::new(),
            outbound: HashMap::new(),
            direct_addrs: HashMap::new(),
            circuit_deferred: HashMap::new(),
            share_requests: HashSet::new(),
        }
    }

    fn has_direct(&self, peer: &PeerId) -> bool {
        self.connections
            .values()
            .any(|(p, relayed)| p == peer && !relayed)
    }

    fn has_relayed(&self, peer: &PeerId) -> bool {
        self.connections
            .values()
            .any(|(p, relayed)| p == peer && *relayed)
    }

    /// Whether the tick has relay work: reservations to retry.
    fn busy(&self) -> bool {
        self.retry_at.is_some()
    }

    /// Relayed connections to `peer` that may be closed now: a direct
    /// connection exists and no request to or from `peer` is in flight
    /// (`inbound` of them), so closing fails nothing.
    fn superseded(&self, peer: &PeerId, inbound: usize) -> Vec<ConnectionId> {
        if !self.has_direct(peer) || inbound > 0 || self.outbound.values().any(|p| p == peer) {
            return Vec::new();
        }
        self.connections
            .iter()
            .filter(|(id, (p, relayed))| p == peer && *relayed && !self.closing.contains(id))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Remembers `addr` as one of `peer`'s own addresses (bounded: at most
    /// [`fd_protocol::MAX_ADDRS`] per peer, 4096 peers).
    fn remember_direct(&mut self, peer: PeerId, addr: &Multiaddr) {
        if super::relay_use::is_circuit(addr) {
            return;
        }
        if self.direct_addrs.len() >= 4096 && !self.direct_addrs.contains_key(&peer) {
            self.direct_addrs.clear();
        }
        let addrs = self.direct_addrs.entry(peer).or_default();
        if !addrs.contains(addr) {
            if addrs.len() >= fd_protocol::MAX_ADDRS {
                addrs.remove(0);
            }
            addrs.push(addr.clone());
        }
    }

    fn closing_to(&self, peer: &PeerId) -> bool {
        self.closing
            .iter()
            .any(|id| self.connections.get(id).is_some_and(|(p, _)| p == peer))
    }
}

/// Requests handed to the program and not answered yet, per peer: the
/// admission control that keeps one peer's flood from filling the queue
/// every peer shares (see [`super::MAX_IN_FLIGHT_PER_PEER`]).
#[derive(Default)]
struct InFlight {
    by_request: HashMap<InboundRequestId, PeerId>,
    by_peer: HashMap<PeerId, usize>,
    /// Busy refusals per peer not logged yet, and when that peer's last
    /// line was written: one line per peer per second, with the count.
    busy_unlogged: HashMap<PeerId, (u64, Option<Instant>)>,
}

impl InFlight {
    /// Why a request from `peer` may not be queued now, if it may not.
    fn refuse(&self, peer: &PeerId) -> Option<(usize, &'static str)> {
        if self.by_peer.get(peer).copied().unwrap_or(0) >= super::MAX_IN_FLIGHT_PER_PEER {
            Some((super::MAX_IN_FLIGHT_PER_PEER, "per peer"))
        } else if self.by_request.len() >= super::MAX_IN_FLIGHT {
            Some((super::MAX_IN_FLIGHT, "for all peers together"))
        } else {
            None
        }
    }

    fn start(&mut self, request: InboundRequestId, peer: PeerId) {
        self.by_request.insert(request, peer);
        *self.by_peer.entry(peer).or_default() += 1;
    }

    /// The request was answered (or its requester went away).
    fn finish(&mut self, request: &InboundRequestId) {
        if let Some(peer) = self.by_request.remove(request)
            && let Some(n) = self.by_peer.get_mut(&peer)
        {
            *n -= 1;
            if *n == 0 {
                self.by_peer.remove(&peer);
            }
        }
    }

    /// Counts a busy refusal of `peer`; logs at most once a second per peer.
    fn busy(&mut self, peer: PeerId, limit: usize, scope: &str) {
        let now = Instant::now();
        let (count, logged) = self.busy_unlogged.entry(peer).or_default();
        *count += 1;
        if logged.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1)) {
            tracing::warn!(%peer, reason = "busy", refused = *count, limit, "requests refused: too many in flight {scope}");
            *count = 0;
            *logged = Some(now);
        }
        if self.busy_unlogged.len() > 4096 {
            // Bounded memory even under a flood of identities.
            self.busy_unlogged.retain(|_, (n, _)| *n > 0);
        }
    }
}

impl EventLoop {
    // One argument per part the event loop owns; a struct of them would
    // only be unpacked here.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        requests: mpsc::Sender<InboundRequest>,
        announcements: mpsc::Sender<(PeerId, ShareAnnouncement)>,
        counters: Arc<TrafficCounters>,
        federation_id: String,
        topic: Option<IdentTopic>,
        relay: RelayUse,
    ) -> Self {
        EventLoop {
            swarm,
            commands,
            requests,
            announcements,
            counters,
            federation_id,
            topic,
            outgoing: OutgoingStore::default(),
            pending_listen: HashMap::new(),
            pending_requests: HashMap::new(),
            pending_dials: HashMap::new(),
            pending_bootstrap: HashMap::new(),
            pending_find: HashMap::new(),
            pending_announces: Vec::new(),
            last_chunk_responses: HashSet::new(),
            in_flight: InFlight::default(),
            relays: RelayState::new(relay),
        }
    }

    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(ANNOUNCE_TICK);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        for (relay, addr) in self.relays.config.relays.clone() {
            self.swarm.add_peer_address(relay, addr.clone());
            // The relays are asked first whether this node can be dialled back.
            self.swarm
                .behaviour_mut()
                .autonat
                .add_server(relay, Some(addr));
        }
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.handle_event(event).await,
                command = self.commands.recv() => match command {
                    Some(c) => self.handle_command(c),
                    None => return,
                },
                _ = tick.tick(), if !self.pending_announces.is_empty() || self.relays.busy() => {
                    self.poll_announces();
                    self.poll_relays();
                }
            }
        }
    }

    /// Reserves on relays without a reservation when due.
    fn poll_relays(&mut self) {
        if self.relays.retry_at.is_some_and(|at| Instant::now() >= at) {
            self.relays.retry_at = None;
            if self.relays.wanted {
                self.reserve();
            }
        }
    }

    /// Closes `peer`'s relayed connections if a direct one exists and none
    /// of its requests is in flight; true if any is closing now.
    fn close_superseded(&mut self, peer: PeerId) -> bool {
        let inbound = self.in_flight.by_peer.get(&peer).copied().unwrap_or(0);
        for connection in self.relays.superseded(&peer, inbound) {
            tracing::debug!(%peer, "closing the relayed connection: a direct one exists");
            if self.swarm.close_connection(connection) {
                self.relays.closing.insert(connection);
            }
        }
        self.relays.closing_to(&peer)
    }

    /// Two members behind NATs that push to each other at the same moment
    /// open two relayed connections, and the two hole punches they start
    /// (one per connection, in opposite roles) spoil each other. Both sides
    /// keep the one dialled by the smaller PeerId and close the other; a
    /// request on it fails and is retried on the one kept.
    fn close_duplicate_relayed(&mut self, peer: PeerId) {
        let local = *self.swarm.local_peer_id();
        let relayed: Vec<ConnectionId> = self
            .relays
            .connections
            .iter()
            .filter(|(id, (p, relayed))| *p == peer && *relayed && !self.relays.closing.contains(id))
            .map(|(id, _)| *id)
            .collect();
        if relayed.len() < 2 {
            return;
        }
        // Close the connections dialled by the larger PeerId.
        let close_ours = local > peer;
        for id in relayed {
            if self.relays.dialled_relayed.contains(&id) == close_ours {
                tracing::debug!(%peer, "closing a duplicate relayed connection");
                if self.swarm.close_connection(id) {
                    self.relays.closing.insert(id);
                }
            }
        }
    }

    /// With only a relayed connection to `peer`, dials its own addresses:
    /// a member behind a NAT reaches a public one at once this way (hole
    /// punching, started by the other side, covers two NATed members).
    fn dial_direct(&mut self, peer: PeerId) {
        if self.relays.has_direct(&peer) {
            return;
        }
        let Some(addrs) = self.relays.direct_addrs.get(&peer).cloned() else {
            return;
        };
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::NotDialing)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, %e, "no direct dial");
        }
    }

    /// Sends the requests held for `peer` once none of its connections is closing.
    fn release_held(&mut self, peer: PeerId) {
        if self.relays.closing_to(&peer) {
            return;
        }
        let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.relays.held)
            .into_iter()
            .partition(|(p, _, _)| *p == peer);
        self.relays.held = later;
        for (peer, message, reply) in now {
            self.send_request(peer, message, reply);
        }
    }

    fn send_request(&mut self, peer: PeerId, message: Message, reply: Reply<Message>) {
        let share = matches!(message, Message::Share(_));
        let id = self
            .swarm
            .behaviour_mut()
            .request_response
            .send_request(&peer, message);
        if share {
            self.relays.share_requests.insert(id);
        }
        self.relays.outbound.insert(id, peer);
        self.pending_requests.insert(id, reply);
    }

    /// Listens on a circuit through every relay this node has no
    /// reservation on and is connected to, which reserves a slot there;
    /// dials the others, and reserves once connected (the relay client's
    /// own dial would be dropped while another dial to the relay, a join
    /// say, is in progress, closing the reservation's listener). When the
    /// first call comes: see [`FIRST_RESERVATION_GRACE`].
    fn reserve(&mut self) {
        for (relay, addr) in self.relays.config.relays.clone() {
            if self.relays.reservations.contains_key(&relay) {
                continue;
            }
            if !self.swarm.is_connected(&relay) {
                let opts = DialOpts::peer_id(relay)
                    .addresses(vec![addr])
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build();
                if let Err(e) = self.swarm.dial(opts) {
                    tracing::debug!(%relay, %e, "dialling the relay");
                }
                continue;
            }
            let circuit = circuit_addr(relay, &addr);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(listener) => {
                    tracing::debug!(%relay, %circuit, "reserving a slot on the relay");
                    self.relays.reservations.insert(relay, listener);
                }
                Err(e) => {
                    tracing::warn!(%relay, %circuit, "cannot reserve a slot on the relay: {e}");
                    self.relays.retry_at = Some(Instant::now() + RESERVATION_RETRY);
                }
            }
        }
    }

    /// A reservation's listener went away: try again later.
    fn reservation_lost(&mut self, listener_id: ListenerId, reason: &str) -> bool {
        let Some(relay) = self
            .relays
            .reservations
            .iter()
            .find(|(_, l)| **l == listener_id)
            .map(|(r, _)| *r)
        else {
            return false;
        };
        self.relays.reservations.remove(&relay);
        tracing::warn!(%relay, reason, "reservation on the relay lost; retrying in {} s", RESERVATION_RETRY.as_secs());
        if self.relays.wanted {
            self.relays.retry_at = Some(Instant::now() + RESERVATION_RETRY);
        }
        true
    }

    fn handle_relay_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Autonat(autonat::Event::StatusChanged { old, new }) => {
                tracing::info!(?old, ?new, "AutoNAT: reachability from outside changed");
                let private = matches!(new, autonat::NatStatus::Private);
                if private
                    && self.relays.config.mode == RelayMode::Auto
                    && !self.relays.config.relays.is_empty()
                    && !self.relays.wanted
                {
                    tracing::info!(relays = self.relays.config.relays.len(), "not reachable from outside: reserving a slot on the relays");
                    self.relays.wanted = true;
                    self.reserve();
                }
            }
            BehaviourEvent::RelayClient(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal: false,
                ..
            }) => {
                tracing::info!(relay = %relay_peer_id, "reachable through the relay");
            }
            BehaviourEvent::RelayClient(event) => tracing::debug!(?event, "relay client"),
            BehaviourEvent::Relay(event) => match event {
                relay::Event::ReservationReqDenied {
                    src_peer_id,
                    status,
                } => {
                    self.counters.relay_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(peer = %src_peer_id, reason = "relay_refused", ?status, "relay: reservation refused");
                }
                relay::Event::CircuitReqDenied {
                    src_peer_id,
                    dst_peer_id,
                    status,
                } => {
                    self.counters.relay_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(peer = %src_peer_id, to = %dst_peer_id, reason = "relay_refused", ?status, "relay: circuit refused");
                }
                event => tracing::debug!(?event, "relay"),
            },
            BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            }) => match result {
                Ok(_) => {
                    tracing::info!(peer = %remote_peer_id, "direct connection by hole punching");
                }
                Err(e) => {
                    tracing::info!(peer = %remote_peer_id, "hole punching failed, staying relayed: {e}");
                }
            },
            _ => {}
        }
    }

    /// Adds `peer`'s address through each relay, so a member that holds a
    /// reservation there is reached when its own addresses cannot be
    /// dialled. Added again on every call: the swarm forgets an address
    /// whose dial failed (before the member had reserved, say).
    ///
    /// Two members behind NATs push to each other at the same moment; if
    /// both dialled through the relay they would hold two relayed
    /// connections and start two hole punches that spoil each other. So the
    /// member with the larger PeerId waits [`CIRCUIT_DEFER`] (from its first
    /// attempt since it last connected to the peer) before it dials through
    /// the relay: by then the other's relayed connection has usually
    /// arrived and carries its request; if the other never dials, the push
    /// retries through the relay a moment later.
    fn add_circuit_addresses(&mut self, peer: PeerId) {
        let local = *self.swarm.local_peer_id();
        if local > peer && !self.swarm.is_connected(&peer) {
            if self.relays.circuit_deferred.len() > 4096 {
                self.relays.circuit_deferred.clear();
            }
            let first = *self
                .relays
                .circuit_deferred
                .entry(peer)
                .or_insert_with(Instant::now);
            if first.elapsed() < CIRCUIT_DEFER {
                return;
            }
        }
        for (relay, addr) in self.relays.config.relays.clone() {
            if relay != peer && peer != local {
                self.swarm.add_peer_address(peer, circuit_addr(relay, &addr));
            }
        }
    }

    async fn handle_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                tracing::debug!(%address, "listening");
                // A relay hands its own addresses to the members that
                // reserve on it, and libp2p refuses reservations while it
                // has none: a relay is by definition dialable where it
                // listens (the members' configs name that address).
                let own = !super::relay_use::is_circuit(&address);
                if self.swarm.behaviour().relay.is_enabled() && own {
                    self.swarm.add_external_address(address.clone());
                }
                if let Some(reply) = self.pending_listen.remove(&listener_id) {
                    let _ = reply.send(Ok(address));
                }
                if own && !self.relays.listening {
                    self.relays.listening = true;
                    // The first reservation was waiting for this.
                    if self.relays.wanted && self.relays.reservations.is_empty() {
                        self.relays.retry_at = Some(Instant::now());
                        self.poll_relays();
                    }
                }
            }
            SwarmEvent::ListenerError { listener_id, error }
            | SwarmEvent::ListenerClosed {
                listener_id,
                reason: Err(error),
                ..
            } => {
                if let Some(reply) = self.pending_listen.remove(&listener_id) {
                    let _ = reply.send(Err(anyhow!("listener failed: {error}")));
                }
                self.reservation_lost(listener_id, &error.to_string());
            }
            SwarmEvent::ListenerClosed { listener_id, .. } => {
                self.reservation_lost(listener_id, "closed");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                let relayed = endpoint.is_relayed();
                self.relays
                    .connections
                    .insert(connection_id, (peer_id, relayed));
                self.relays.circuit_deferred.remove(&peer_id);
                if !relayed
                    && self.relays.wanted
                    && !self.relays.reservations.contains_key(&peer_id)
                    && self.relays.config.relays.iter().any(|(r, _)| *r == peer_id)
                {
                    self.reserve();
                }
                if relayed {
                    tracing::debug!(peer = %peer_id, "relayed connection");
                    if endpoint.is_dialer() {
                        self.relays.dialled_relayed.insert(connection_id);
                    }
                    self.close_duplicate_relayed(peer_id);
                    self.dial_direct(peer_id);
                }
                self.close_superseded(peer_id);
                for reply in self.pending_dials.remove(&peer_id).unwrap_or_default() {
                    let _ = reply.send(Ok(Connected { relayed }));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                ..
            } => {
                self.relays.connections.remove(&connection_id);
                self.relays.closing.remove(&connection_id);
                self.relays.dialled_relayed.remove(&connection_id);
                self.release_held(peer_id);
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(?peer_id, %error, "dial failed");
                if let Some(peer) = peer_id
                    && !self.swarm.is_connected(&peer)
                {
                    for reply in self.pending_dials.remove(&peer).unwrap_or_default() {
                        let _ = reply.send(Err(anyhow!("dialling {peer} failed: {error}")));
                    }
                }
            }
            SwarmEvent::IncomingConnectionError { error, .. } => {
                tracing::debug!(%error, "inbound connection failed");
            }
            SwarmEvent::Behaviour(BehaviourEvent::RequestResponse(event)) => {
                self.handle_request_response(event).await
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(event)) => self.handle_gossip(event),
            SwarmEvent::Behaviour(BehaviourEvent::Kademlia(event)) => self.handle_kad(event),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                // The peer's own listen addresses (over its authenticated
                // connection, so they can only be about itself): a member
                // that restarted on a new address is dialled there from now
                // on, without waiting for the next round announcement. At
                // most as many as a member may announce.
                let addrs: Vec<Multiaddr> = info
                    .listen_addrs
                    .into_iter()
                    .take(fd_protocol::MAX_ADDRS)
                    .collect();
                for addr in &addrs {
                    self.swarm.add_peer_address(peer_id, addr.clone());
                    self.relays.remember_direct(peer_id, addr);
                }
                if self.relays.has_relayed(&peer_id) {
                    self.dial_direct(peer_id);
                }
                if info.protocols.contains(&KAD_PROTOCOL)
                    && let Some(kad) = self.swarm.behaviour_mut().kademlia.as_mut()
                {
                    for addr in addrs {
                        kad.add_address(&peer_id, addr);
                    }
                }
            }
            SwarmEvent::Behaviour(
                event @ (BehaviourEvent::Autonat(_)
                | BehaviourEvent::RelayClient(_)
                | BehaviourEvent::Relay(_)
                | BehaviourEvent::Dcutr(_)),
            ) => self.handle_relay_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    tracing::debug!(%peer, %addr, "discovered on the LAN");
                    self.swarm.add_peer_address(peer, addr.clone());
                    if let Some(kad) = self.swarm.behaviour_mut().kademlia.as_mut() {
                        kad.add_address(&peer, addr);
                    }
                    self.dial_if_disconnected(peer);
                }
            }
            _ => {}
        }
    }

    async fn handle_request_response(&mut self, event: request_response::Event<Message, Message>) {
        match event {
            request_response::Event::Message {
                peer,
                message,
                connection_id,
            } => match message {
                request_response::Message::Request {
                    request,
                    channel,
                    request_id,
                } => {
                    self.handle_request(peer, request_id, request, channel)
                        .await
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    self.relays.outbound.remove(&request_id);
                    if self.relays.share_requests.remove(&request_id) {
                        self.counters.shares_sent.fetch_add(1, Ordering::Relaxed);
                        if self
                            .relays
                            .connections
                            .get(&connection_id)
                            .is_some_and(|(_, relayed)| *relayed)
                        {
                            self.counters.shares_relayed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    if let Some(reply) = self.pending_requests.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                    self.close_superseded(peer);
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                self.relays.share_requests.remove(&request_id);
                self.relays.outbound.remove(&request_id);
                if let Some(reply) = self.pending_requests.remove(&request_id) {
                    let _ = reply.send(Err(anyhow!("request to {peer} failed: {error}")));
                }
                self.close_superseded(peer);
            }
            request_response::Event::InboundFailure {
                peer,
                error,
                request_id,
                ..
            } => {
                self.in_flight.finish(&request_id);
                self.last_chunk_responses.remove(&request_id);
                tracing::debug!(%peer, %error, "inbound request failed");
            }
            request_response::Event::ResponseSent {
                request_id, peer, ..
            } => {
                self.in_flight.finish(&request_id);
                if self.last_chunk_responses.remove(&request_id) {
                    self.counters.pulled_share_served();
                }
                self.close_superseded(peer);
            }
        }
    }

    /// Chunk requests and pushed announcements are answered here; everything
    /// else goes to the program.
    async fn handle_request(
        &mut self,
        peer: PeerId,
        request_id: InboundRequestId,
        message: Message,
        channel: request_response::ResponseChannel<Message>,
    ) {
        let answer = match message {
            Message::FetchChunk {
                round,
                digest,
                index,
            } => {
                let (answer, last) = self.outgoing.answer(&peer, round, &digest, index);
                if last {
                    self.last_chunk_responses.insert(request_id);
                }
                answer
            }
            Message::ShareAvailable(announcement) => {
                match self.check_announcement(peer, &announcement) {
                    Ok(()) => {
                        self.deliver_announcement(peer, announcement);
                        Message::Ack
                    }
                    Err((code, reason)) => {
                        tracing::debug!(%peer, reason, "announcement refused");
                        Message::ShareRejected {
                            code: code.as_str().to_string(),
                            reason,
                        }
                    }
                }
            }
            // Never awaits: a full queue is answered `busy`, so the swarm
            // keeps serving every other peer whatever one peer sends.
            message => match self.in_flight.refuse(&peer) {
                Some((limit, scope)) => {
                    self.counters.requests_busy.fetch_add(1, Ordering::Relaxed);
                    self.in_flight.busy(peer, limit, scope);
                    busy(&peer, limit)
                }
                None => {
                    let inbound = InboundRequest {
                        peer,
                        message,
                        channel,
                    };
                    match self.requests.try_send(inbound) {
                        Ok(()) => {
                            self.in_flight.start(request_id, peer);
                            return;
                        }
                        Err(mpsc::error::TrySendError::Full(inbound)) => {
                            self.counters.requests_busy.fetch_add(1, Ordering::Relaxed);
                            self.in_flight
                                .busy(peer, super::MAX_IN_FLIGHT, "in the queue");
                            let answer = busy(&peer, super::MAX_IN_FLIGHT);
                            if self
                                .swarm
                                .behaviour_mut()
                                .request_response
                                .send_response(inbound.channel, answer)
                                .is_err()
                            {
                                tracing::debug!(%peer, "response dropped: the requester went away");
                            }
                            return;
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            tracing::debug!("inbound request dropped: nobody is listening");
                            return;
                        }
                    }
                }
            },
        };
        if self
            .swarm
            .behaviour_mut()
            .request_response
            .send_response(channel, answer)
            .is_err()
        {
            self.last_chunk_responses.remove(&request_id);
            tracing::debug!(%peer, "response dropped: the requester went away");
        }
    }

    /// An announcement authored by `author` (gossip source or requester) is
    /// for this federation, within the limits, and from its own sender.
    fn check_announcement(
        &self,
        author: PeerId,
        announcement: &ShareAnnouncement,
    ) -> Result<(), (RejectReason, String)> {
        announcement
            .check(&self.federation_id)
            .map_err(|e| (e.reason(), e.to_string()))?;
        let sender = peer_id_of(&announcement.sender)
            .map_err(|e| (RejectReason::InvalidField, e.to_string()))?;
        if sender != author {
            return Err((
                RejectReason::UnknownSender,
                format!("{author} announced a share from {sender}"),
            ));
        }
        Ok(())
    }

    fn deliver_announcement(&mut self, author: PeerId, announcement: ShareAnnouncement) {
        match self.announcements.try_send((author, announcement)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(%author, "share announcement dropped: the program is not keeping up");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::debug!(%author, "share announcement dropped: nobody is listening");
            }
        }
    }

    fn handle_gossip(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                self.counters.gossip_received(message.data.len());
                let verdict = self.check_gossip(&message);
                let acceptance = match &verdict {
                    Ok(_) => MessageAcceptance::Accept,
                    Err(reason) => {
                        tracing::debug!(%propagation_source, reason, "gossip message refused");
                        MessageAcceptance::Reject
                    }
                };
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
                if let Ok((author, announcement)) = verdict {
                    self.deliver_announcement(author, announcement);
                }
            }
            gossipsub::Event::Subscribed { peer_id, topic } => {
                tracing::debug!(%peer_id, %topic, "peer subscribed");
                self.poll_announces();
            }
            _ => {}
        }
    }

    fn check_gossip(
        &self,
        message: &gossipsub::Message,
    ) -> Result<(PeerId, ShareAnnouncement), String> {
        if self.topic.as_ref().map(|t| t.hash()) != Some(message.topic.clone()) {
            return Err(format!("message on foreign topic {}", message.topic));
        }
        let author = message.source.ok_or("unsigned message")?;
        let announcement = match fd_protocol::decode(&message.data) {
            Ok(Message::ShareAvailable(a)) => a,
            Ok(_) => return Err("not a share announcement".into()),
            Err(e) => return Err(e.to_string()),
        };
        self.check_announcement(author, &announcement)
            .map_err(|(_, reason)| reason)?;
        Ok((author, announcement))
    }

    fn handle_kad(&mut self, event: kad::Event) {
        let kad::Event::OutboundQueryProgressed {
            id, result, step, ..
        } = event
        else {
            return;
        };
        match result {
            kad::QueryResult::Bootstrap(result) => {
                if (result.is_err() || step.last)
                    && let Some(reply) = self.pending_bootstrap.remove(&id)
                {
                    let _ = reply.send(
                        result
                            .map(|_| ())
                            .map_err(|e| anyhow!("Kademlia bootstrap failed: {e}")),
                    );
                }
            }
            kad::QueryResult::GetClosestPeers(result) => {
                let Some((target, _)) = self.pending_find.get(&id) else {
                    return;
                };
                let target = *target;
                let (peers, failed) = match result {
                    Ok(ok) => (ok.peers, None),
                    Err(kad::GetClosestPeersError::Timeout { peers, .. }) => {
                        (peers, Some("the query timed out"))
                    }
                };
                let mut addrs = transport_addresses(
                    &target,
                    peers
                        .into_iter()
                        .filter(|p| p.peer_id == target)
                        .flat_map(|p| p.addrs),
                );
                if addrs.is_empty() && (step.last || failed.is_some()) {
                    addrs = self.routing_table_addresses(&target);
                }
                if addrs.is_empty() && !(step.last || failed.is_some()) {
                    return;
                }
                let (_, reply) = self.pending_find.remove(&id).expect("checked above");
                if let Some(mut query) = self
                    .swarm
                    .behaviour_mut()
                    .kademlia
                    .as_mut()
                    .and_then(|k| k.query_mut(&id))
                {
                    query.finish();
                }
                if addrs.is_empty() {
                    let _ = reply.send(Err(anyhow!(
                        "peer {target} not found through Kademlia{}",
                        failed.map(|f| format!(" ({f})")).unwrap_or_default()
                    )));
                } else {
                    for addr in &addrs {
                        self.swarm.add_peer_address(target, addr.clone());
                    }
                    let _ = reply.send(Ok(addrs));
                }
            }
            _ => {}
        }
    }

    /// Addresses of `peer` in the Kademlia routing table.
    fn routing_table_addresses(&mut self, peer: &PeerId) -> Vec<Multiaddr> {
        let Some(kad) = self.swarm.behaviour_mut().kademlia.as_mut() else {
            return Vec::new();
        };
        let mut addrs = Vec::new();
        for bucket in kad.kbuckets() {
            for entry in bucket.iter() {
                if entry.node.key.preimage() == peer {
                    addrs.extend(entry.node.value.iter().cloned());
                }
            }
        }
        transport_addresses(peer, addrs)
    }

    fn dial_if_disconnected(&mut self, peer: PeerId) {
        if self.swarm.is_connected(&peer) {
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, %e, "cannot dial");
        }
    }

    /// Peers subscribed to the share topic.
    fn subscribed_peers(&self) -> HashSet<PeerId> {
        let Some(topic) = &self.topic else {
            return HashSet::new();
        };
        let hash = topic.hash();
        self.swarm
            .behaviour()
            .gossipsub
            .all_peers()
            .filter(|(_, topics)| topics.contains(&&hash))
            .map(|(peer, _)| *peer)
            .collect()
    }

    /// Publishes on the share topic; the number of peers it went to.
    fn publish(&mut self, data: &[u8]) -> anyhow::Result<usize> {
        let topic = self
            .topic
            .clone()
            .ok_or_else(|| anyhow!("no federation set: there is no topic to announce on"))?;
        let recipients = self.subscribed_peers().len();
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(topic.clone(), data.to_vec())
        {
            Ok(_) => {
                self.counters.gossip_sent(data.len(), recipients);
                Ok(recipients)
            }
            Err(gossipsub::PublishError::Duplicate) => {
                tracing::debug!("announcement already published");
                Ok(0)
            }
            Err(e) => Err(anyhow!("publishing on {topic} failed: {e}")),
        }
    }

    /// Publishes every pending announcement whose peers are all subscribed
    /// or whose deadline passed; redials missing peers now and then.
    fn poll_announces(&mut self) {
        if self.pending_announces.is_empty() {
            return;
        }
        let now = Instant::now();
        let subscribed = self.subscribed_peers();
        for mut pending in std::mem::take(&mut self.pending_announces) {
            let missing: Vec<PeerId> = pending
                .wait_for
                .iter()
                .filter(|p| !subscribed.contains(p))
                .copied()
                .collect();
            if missing.is_empty() {
                let _ = pending.reply.send(self.publish(&pending.data).map(|_| ()));
            } else if now >= pending.deadline {
                let result = if subscribed.is_empty() {
                    Err(anyhow!(
                        "nobody subscribed to the share topic within the timeout"
                    ))
                } else {
                    self.publish(&pending.data).map(|_| ())
                };
                let missing = missing
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                tracing::warn!(
                    missing,
                    "share announced without peers that never subscribed"
                );
                let _ = pending.reply.send(result);
            } else {
                if now >= pending.next_dial {
                    for peer in &missing {
                        self.dial_if_disconnected(*peer);
                    }
                    pending.next_dial = now + ANNOUNCE_REDIAL;
                }
                self.pending_announces.push(pending);
            }
        }
    }

    fn handle_command(&mut self, command: Command) {
        match command {
            Command::Listen { addr, reply } => match self.swarm.listen_on(addr) {
                Ok(id) => {
                    self.pending_listen.insert(id, reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(anyhow!("cannot listen: {e}")));
                }
            },
            Command::AddAddress { peer, addr } => {
                self.relays.remember_direct(peer, &addr);
                self.swarm.add_peer_address(peer, addr);
                self.add_circuit_addresses(peer);
            }
            Command::Request {
                peer,
                message,
                reply,
            } => {
                if let Message::Share(s) = &message
                    && self.relays.has_relayed(&peer)
                    && !self.relays.has_direct(&peer)
                    && let Ok(len) = fd_protocol::codec::share_frame_len(s)
                    && len as u64 > self.relays.config.max_relayed_share_bytes
                {
                    let _ = reply.send(Err(super::RelayedOnly {
                        peer,
                        bytes: len as u64,
                        limit: self.relays.config.max_relayed_share_bytes,
                    }
                    .into()));
                    return;
                }
                if self.close_superseded(peer) {
                    self.relays.held.push((peer, message, reply));
                } else {
                    self.send_request(peer, message, reply);
                }
            }
            Command::Respond { channel, message } => {
                if self
                    .swarm
                    .behaviour_mut()
                    .request_response
                    .send_response(channel, message)
                    .is_err()
                {
                    tracing::debug!("response dropped: the requester went away");
                }
            }
            Command::Dial { peer, addrs, reply } => {
                if self.swarm.is_connected(&peer) {
                    let relayed = !self.relays.has_direct(&peer);
                    if relayed {
                        self.dial_direct(peer);
                    }
                    let _ = reply.send(Ok(Connected { relayed }));
                    return;
                }
                for addr in &addrs {
                    self.swarm.add_peer_address(peer, addr.clone());
                }
                self.add_circuit_addresses(peer);
                let opts = DialOpts::peer_id(peer)
                    .addresses(addrs)
                    .extend_addresses_through_behaviour()
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build();
                match self.swarm.dial(opts) {
                    Ok(()) | Err(DialError::DialPeerConditionFalse(_)) => {
                        self.pending_dials.entry(peer).or_default().push(reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(anyhow!("cannot dial {peer}: {e}")));
                    }
                }
            }
            Command::ConnectedPeers { reply } => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::Bootstrap { addrs, reply } => {
                for (peer, addr) in &addrs {
                    self.swarm.add_peer_address(*peer, addr.clone());
                    if let Some(kad) = self.swarm.behaviour_mut().kademlia.as_mut() {
                        kad.add_address(peer, addr.clone());
                    }
                    self.dial_if_disconnected(*peer);
                }
                match self.swarm.behaviour_mut().kademlia.as_mut() {
                    Some(kad) => match kad.bootstrap() {
                        Ok(id) => {
                            self.pending_bootstrap.insert(id, reply);
                        }
                        Err(e) => {
                            let _ = reply.send(Err(anyhow!("Kademlia bootstrap: {e}")));
                        }
                    },
                    None => {
                        let _ = reply.send(Ok(()));
                    }
                }
            }
            Command::FindPeer { peer, reply } => {
                if !self.swarm.behaviour().kademlia.is_enabled() {
                    let _ = reply.send(Err(anyhow!("Kademlia is off: cannot look up {peer}")));
                    return;
                }
                let known = self.routing_table_addresses(&peer);
                if !known.is_empty() {
                    for addr in &known {
                        self.swarm.add_peer_address(peer, addr.clone());
                    }
                    let _ = reply.send(Ok(known));
                    return;
                }
                let kad = self
                    .swarm
                    .behaviour_mut()
                    .kademlia
                    .as_mut()
                    .expect("checked above");
                let id = kad.get_closest_peers(peer);
                self.pending_find.insert(id, (peer, reply));
            }
            Command::OfferShare {
                announcement,
                bytes,
            } => {
                self.outgoing
                    .insert(announcement.round, announcement.digest, bytes);
            }
            Command::Announce {
                announcement,
                wait_for,
                timeout,
                reply,
            } => {
                // Only the peers it is announced to may pull it.
                self.outgoing
                    .restrict(announcement.round, &announcement.digest, &wait_for);
                let data = match fd_protocol::encode(&Message::ShareAvailable(announcement)) {
                    Ok(data) => data,
                    Err(e) => {
                        let _ = reply.send(Err(anyhow!("cannot encode the announcement: {e}")));
                        return;
                    }
                };
                if self.topic.is_none() {
                    let _ = reply.send(Err(anyhow!(
                        "no federation set: there is no topic to announce on"
                    )));
                    return;
                }
                let local = *self.swarm.local_peer_id();
                let mut wait_for: Vec<PeerId> =
                    wait_for.into_iter().filter(|p| *p != local).collect();
                wait_for.sort();
                wait_for.dedup();
                for peer in &wait_for {
                    self.dial_if_disconnected(*peer);
                }
                let now = Instant::now();
                self.pending_announces.push(PendingAnnounce {
                    data,
                    wait_for,
                    deadline: now + timeout,
                    next_dial: now + ANNOUNCE_REDIAL,
                    reply,
                });
                self.poll_announces();
            }
            Command::SetFederation {
                federation_id,
                reply,
            } => {
                let gossip = &mut self.swarm.behaviour_mut().gossipsub;
                if let Some(old) = self.topic.take() {
                    gossip.unsubscribe(&old);
                }
                let result = if federation_id.is_empty() {
                    Ok(())
                } else {
                    let topic = shares_topic(&federation_id);
                    match gossip.subscribe(&topic) {
                        Ok(_) => {
                            self.topic = Some(topic);
                            Ok(())
                        }
                        Err(e) => Err(anyhow!("cannot subscribe to {topic}: {e}")),
                    }
                };
                self.federation_id = federation_id;
                let _ = reply.send(result);
            }
            Command::AllowPeer { peer, allow } => {
                if let Some(list) = self.swarm.behaviour_mut().allowed.as_mut() {
                    if allow {
                        list.allow_peer(peer);
                    } else {
                        list.disallow_peer(peer);
                    }
                }
            }
        }
    }
}

/// `addrs` without a trailing `/p2p/<peer>` (identify reports them with it),
/// deduplicated.
fn transport_addresses(
    peer: &PeerId,
    addrs: impl IntoIterator<Item = Multiaddr>,
) -> Vec<Multiaddr> {
    let mut out: Vec<Multiaddr> = Vec::new();
    for mut addr in addrs {
        if let Some(Protocol::P2p(id)) = addr.iter().last() {
            if id != *peer {
                continue;
            }
            addr.pop();
        }
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    out
}

/// The answer to a request refused for load.
fn busy(peer: &PeerId, limit: usize) -> Message {
    let e = fd_protocol::ProtocolError::Busy {
        peer: peer.to_string(),
        limit,
    };
    Message::Refused {
        code: e.reason().as_str().to_string(),
        reason: e.to_string(),
    }
}
