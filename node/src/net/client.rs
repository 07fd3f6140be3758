//! The handle through which the program drives the swarm.

use std::sync::Arc;

use anyhow::{Context as _, anyhow};
use fd_protocol::Message;
use libp2p::request_response::ResponseChannel;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

use super::codec::{Traffic, TrafficCounters};

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
}

/// Cloneable handle to the network event loop.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    local_peer_id: PeerId,
    counters: Arc<TrafficCounters>,
}

impl Client {
    pub(crate) fn new(
        commands: mpsc::Sender<Command>,
        local_peer_id: PeerId,
        counters: Arc<TrafficCounters>,
    ) -> Self {
        Client {
            commands,
            local_peer_id,
            counters,
        }
    }

    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// Bytes sent and received so far.
    pub fn traffic(&self) -> Traffic {
        self.counters.snapshot()
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
}
