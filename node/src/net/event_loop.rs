//! The task that owns the swarm.

use std::collections::HashMap;

use anyhow::anyhow;
use fd_protocol::Message;
use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, Swarm};
use tokio::sync::{mpsc, oneshot};

use super::InboundRequest;
use super::client::Command;
use super::codec::FdCodec;

type Behaviour = request_response::Behaviour<FdCodec>;

/// Runs the swarm until every [`super::Client`] is dropped.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    requests: mpsc::Sender<InboundRequest>,
    pending_listen: HashMap<ListenerId, oneshot::Sender<anyhow::Result<Multiaddr>>>,
    pending_requests: HashMap<OutboundRequestId, oneshot::Sender<anyhow::Result<Message>>>,
}

impl EventLoop {
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        requests: mpsc::Sender<InboundRequest>,
    ) -> Self {
        EventLoop {
            swarm,
            commands,
            requests,
            pending_listen: HashMap::new(),
            pending_requests: HashMap::new(),
        }
    }

    pub async fn run(mut self) {
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.handle_event(event).await,
                command = self.commands.recv() => match command {
                    Some(c) => self.handle_command(c),
                    None => return,
                },
            }
        }
    }

    async fn handle_event(&mut self, event: SwarmEvent<request_response::Event<Message, Message>>) {
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
            SwarmEvent::Behaviour(request_response::Event::Message { peer, message, .. }) => {
                match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => {
                        let inbound = InboundRequest {
                            peer,
                            message: request,
                            channel,
                        };
                        if self.requests.send(inbound).await.is_err() {
                            tracing::debug!("inbound request dropped: nobody is listening");
                        }
                    }
                    request_response::Message::Response {
                        request_id,
                        response,
                    } => {
                        if let Some(reply) = self.pending_requests.remove(&request_id) {
                            let _ = reply.send(Ok(response));
                        }
                    }
                }
            }
            SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            }) => {
                if let Some(reply) = self.pending_requests.remove(&request_id) {
                    let _ = reply.send(Err(anyhow!("request to {peer} failed: {error}")));
                }
            }
            SwarmEvent::Behaviour(request_response::Event::InboundFailure {
                peer, error, ..
            }) => {
                tracing::debug!(%peer, %error, "inbound request failed");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(?peer_id, %error, "dial failed");
            }
            _ => {}
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
                let id = self.swarm.behaviour_mut().send_request(&peer, message);
                self.pending_requests.insert(id, reply);
            }
            Command::Respond { channel, message } => {
                if self
                    .swarm
                    .behaviour_mut()
                    .send_response(channel, message)
                    .is_err()
                {
                    tracing::debug!("response dropped: the requester went away");
                }
            }
        }
    }
}
