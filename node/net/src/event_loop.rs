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
use libp2p::swarm::{DialError, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify, kad, mdns};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};

use super::client::Command;
use super::codec::TrafficCounters;
use super::transfer::OutgoingStore;
use super::{Behaviour, BehaviourEvent, InboundRequest, KAD_PROTOCOL, peer_id_of, shares_topic};

/// How often pending announcements are re-checked (subscriptions, deadlines).
const ANNOUNCE_TICK: Duration = Duration::from_millis(100);

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
    pending_dials: HashMap<PeerId, Vec<Reply<()>>>,
    pending_bootstrap: HashMap<kad::QueryId, Reply<()>>,
    pending_find: HashMap<kad::QueryId, (PeerId, Reply<Vec<Multiaddr>>)>,
    pending_announces: Vec<PendingAnnounce>,
    /// Responses carrying the last chunk of a share: a pulled share is
    /// counted as sent once one of them has been written.
    last_chunk_responses: HashSet<InboundRequestId>,
    /// Requests handed to the program and not answered yet.
    in_flight: InFlight,
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
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        requests: mpsc::Sender<InboundRequest>,
        announcements: mpsc::Sender<(PeerId, ShareAnnouncement)>,
        counters: Arc<TrafficCounters>,
        federation_id: String,
        topic: Option<IdentTopic>,
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
        }
    }

    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(ANNOUNCE_TICK);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.handle_event(event).await,
                command = self.commands.recv() => match command {
                    Some(c) => self.handle_command(c),
                    None => return,
                },
                _ = tick.tick(), if !self.pending_announces.is_empty() => self.poll_announces(),
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
                if let Some(reply) = self.pending_listen.remove(&listener_id) {
                    let _ = reply.send(Ok(address));
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
            }
            SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                for reply in self.pending_dials.remove(&peer_id).unwrap_or_default() {
                    let _ = reply.send(Ok(()));
                }
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
                }
                if info.protocols.contains(&KAD_PROTOCOL)
                    && let Some(kad) = self.swarm.behaviour_mut().kademlia.as_mut()
                {
                    for addr in addrs {
                        kad.add_address(&peer_id, addr);
                    }
                }
            }
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
            request_response::Event::Message { peer, message, .. } => match message {
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
                    if let Some(reply) = self.pending_requests.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some(reply) = self.pending_requests.remove(&request_id) {
                    let _ = reply.send(Err(anyhow!("request to {peer} failed: {error}")));
                }
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
            request_response::Event::ResponseSent { request_id, .. } => {
                self.in_flight.finish(&request_id);
                if self.last_chunk_responses.remove(&request_id) {
                    self.counters.pulled_share_served();
                }
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
            Command::AddAddress { peer, addr } => self.swarm.add_peer_address(peer, addr),
            Command::Request {
                peer,
                message,
                reply,
            } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .request_response
                    .send_request(&peer, message);
                self.pending_requests.insert(id, reply);
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
                    let _ = reply.send(Ok(()));
                    return;
                }
                for addr in &addrs {
                    self.swarm.add_peer_address(peer, addr.clone());
                }
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
