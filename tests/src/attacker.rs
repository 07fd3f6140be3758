//! An attacker built only on fd's public crate API: its own libp2p swarm
//! (`fd_net`), the real codec and signatures (`fd_protocol`). The
//! process tests point it at real `fd-node` and `fd-coordinator` processes
//! and play an outsider (a key that never joined) or a malicious member (a
//! key that joined honestly and then misbehaves).

use std::time::Duration;

use fd_node::inbox::subset_for;
use fd_net::{self as net, Client, InboundRequest};
use fd_net::split_peer_addr;
use fd_protocol::{
    Control, FederationManifest, JoinRequest, LogitShare, Member, Message, PayloadEncoding,
    RoundAnnouncement, SignedControl, SigningKey,
};
use libp2p::PeerId;
use tokio::sync::mpsc;

/// One attacking identity with its swarm.
pub struct Attacker {
    pub key: SigningKey,
    pub client: Client,
    pub requests: mpsc::Receiver<InboundRequest>,
    /// How it presents itself (its listen address included).
    pub me: Member,
}

impl Attacker {
    /// A swarm for the key seeded with `seed`, listening on 127.0.0.1.
    pub async fn new(seed: u8, name: &str) -> Attacker {
        let key = SigningKey::from_seed([seed; 32]);
        let (client, requests, event_loop) = net::new(&key).expect("the attacker's swarm");
        tokio::spawn(event_loop.run());
        let listen = client
            .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
            .await
            .expect("listens on 127.0.0.1");
        let me = Member {
            key: key.public_key(),
            name: name.to_string(),
            addrs: vec![listen.to_string()],
        };
        Attacker {
            key,
            client,
            requests,
            me,
        }
    }

    pub fn peer_id(&self) -> PeerId {
        self.client.local_peer_id()
    }

    /// Learns where a peer listens from its full address (`…/p2p/<id>`).
    pub async fn learn(&self, full_address: &str) -> PeerId {
        let (peer, addr) = split_peer_addr(&full_address.parse().unwrap()).unwrap();
        self.client.add_address(peer, addr).await.unwrap();
        peer
    }

    /// Learns a member's addresses from its announcement entry.
    pub async fn learn_member(&self, member: &Member) -> PeerId {
        let peer = net::peer_id_of(&member.key).unwrap();
        for addr in &member.addrs {
            self.client
                .add_address(peer, addr.parse().unwrap())
                .await
                .unwrap();
        }
        peer
    }

    /// One request, no retry; a transport failure is an `Err`.
    pub async fn send(&self, peer: PeerId, message: Message) -> anyhow::Result<Message> {
        match tokio::time::timeout(Duration::from_secs(20), self.client.request(peer, message))
            .await
        {
            Ok(answer) => answer,
            Err(_) => Err(anyhow::anyhow!("no answer in 20 s")),
        }
    }

    /// Joins through the coordinator as an ordinary member would.
    pub async fn join(&self, coordinator: PeerId, manifest: &FederationManifest) -> Message {
        let join = Message::Join(JoinRequest {
            federation_id: manifest.federation_id.clone(),
            member: self.me.clone(),
            public_set_digest: manifest.public_set.digest,
            train_samples: 100,
        });
        fd_net::request_with_retry(&self.client, coordinator, join, 20)
            .await
            .expect("the coordinator answers a join")
    }

    /// A round announcement signed with the attacker's own key.
    pub fn forged_round(
        &self,
        manifest: &FederationManifest,
        round: u64,
        deadline_unix_ms: u64,
        members: Vec<Member>,
    ) -> Message {
        self.signed(Control::Round(RoundAnnouncement {
            federation_id: manifest.federation_id.clone(),
            round,
            deadline_unix_ms,
            members,
        }))
    }

    /// `Done`, signed with the attacker's own key.
    pub fn forged_done(&self, manifest: &FederationManifest) -> Message {
        self.signed(Control::Done {
            federation_id: manifest.federation_id.clone(),
            rounds: manifest.rounds,
        })
    }

    /// `control` signed by the attacker but naming `coordinator` as signer.
    pub fn impersonated(&self, control: Control, coordinator: &fd_protocol::PublicKey) -> Message {
        let Message::Control(mut signed) = self.signed(control) else {
            unreachable!("signed() builds a control message")
        };
        signed.coordinator = *coordinator;
        Message::Control(signed)
    }

    fn signed(&self, control: Control) -> Message {
        Message::Control(SignedControl::sign(control, &self.key).unwrap())
    }

    /// A share of `round` signed by the attacker: every row's mass on class 0.
    pub fn share(&self, manifest: &FederationManifest, round: u64) -> LogitShare {
        let classes = manifest.classes as usize;
        let logits: Vec<f32> = (0..manifest.subset_size as usize * classes)
            .map(|i| if i % classes == 0 { 20.0 } else { -20.0 })
            .collect();
        LogitShare::new_signed(
            &self.key,
            &manifest.federation_id,
            subset_for(manifest, round),
            manifest.classes,
            100,
            PayloadEncoding::F32Le,
            &logits,
        )
        .unwrap()
    }
}

/// The reason code of a refusal (`ShareRejected` or `Refused`), `None` for
/// anything that was not refused.
pub fn refusal_code(answer: &Message) -> Option<&str> {
    match answer {
        Message::ShareRejected { code, .. } | Message::Refused { code, .. } => Some(code),
        _ => None,
    }
}
