//! `fd-node doctor`: can this member reach its federation from where it runs?
//!
//! # Design
//!
//! Members sit in different organisations, behind firewalls their operators
//! do not all control, so "the round never started" has to be narrowed down
//! before anyone reads logs. The doctor builds the member's own swarm (same
//! key, allow-list, transports and pre-shared key as `fd-node run`), dials
//! every peer the config names, one address at a time, and reports per peer:
//! reachable or not, over which transport, direct or through a relay (a
//! member that has reserved a slot on the coordinator is reached at its
//! circuit address when its own cannot be dialled), the time to an
//! established connection (transport and security handshake:
//! about one round trip on QUIC, two to three on TCP + Noise), and, when it
//! fails, the reason and what to open where.
//!
//! Peers it knows an address for: the coordinator and the bootstrap peers.
//! Listed members are found through the bootstrap peers' Kademlia when there
//! are any; with a coordinator only, their addresses come from its round
//! announcements, which a doctor does not join for, so they are reported as
//! not checked rather than guessed.
//!
//! The doctor listens nowhere and sends no fd message: a peer sees a
//! connection (and identify, and Kademlia lookups) and nothing else, so
//! nothing is refused or counted against the doctor's member.

use std::fmt;
use std::time::{Duration, Instant};

use fd_protocol::SigningKey;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

use crate::config::NodeConfig;
use fd_net::{self as net, Client, Network};

/// What the doctor found for one peer.
#[derive(Debug, Clone)]
pub struct Probe {
    /// "coordinator", "bootstrap 0", "member 2", …
    pub role: String,
    pub peer: PeerId,
    /// The address dialled; `None` when none was known.
    pub addr: Option<Multiaddr>,
    pub outcome: Outcome,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    /// A connection was established, `connect` after the dial began;
    /// `relayed`: through a circuit relay, not direct.
    Reachable { connect: Duration, relayed: bool },
    /// No connection: why, and what to open where.
    Unreachable { reason: String, hint: String },
    /// Not dialled (no address known).
    NotChecked { reason: String },
}

impl Probe {
    fn transport(&self) -> &'static str {
        match &self.addr {
            Some(addr) if net::is_quic(addr) => "quic",
            Some(_) => "tcp",
            None => "-",
        }
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addr = self
            .addr
            .as_ref()
            .map_or_else(|| self.peer.to_string(), |a| a.to_string());
        match &self.outcome {
            Outcome::Reachable { connect, relayed } => write!(
                f,
                "{:<12} reachable    {:<4} {:<7} connect {:>7.1} ms  {addr}",
                self.role,
                self.transport(),
                if *relayed { "relayed" } else { "direct" },
                connect.as_secs_f64() * 1e3
            ),
            Outcome::Unreachable { reason, hint } => write!(
                f,
                "{:<12} UNREACHABLE  {:<4} {addr}\n             reason: {reason}\n             fix: {hint}",
                self.role,
                self.transport()
            ),
            Outcome::NotChecked { reason } => {
                write!(f, "{:<12} not checked  {addr}: {reason}", self.role)
            }
        }
    }
}

/// Dials every peer `config` names and reports each (see the module doc).
/// Each dial may take up to `timeout`.
pub async fn diagnose(
    config: &NodeConfig,
    key: &SigningKey,
    timeout: Duration,
) -> anyhow::Result<Vec<Probe>> {
    let Network {
        client, event_loop, ..
    } = net::new_with(key, &crate::runtime::net_config(config)?)?;
    let event_loop = tokio::spawn(event_loop.run());
    let mut probes = Vec::new();
    let named = config
        .coordinator
        .iter()
        .map(|a| ("coordinator".to_string(), a))
        .chain(
            config
                .bootstrap
                .iter()
                .enumerate()
                .map(|(i, a)| (format!("bootstrap {i}"), a)),
        );
    for (role, text) in named {
        let (peer, addr) = net::split_peer_addr(&text.parse()?)?;
        probes.push(dial(&client, role, peer, addr, timeout).await);
    }
    let me = net::peer_id_of(&key.public_key())?;
    let known: Vec<PeerId> = probes.iter().map(|p| p.peer).collect();
    for (i, member_key) in config.federation.member_keys().iter().enumerate() {
        let peer = net::peer_id_of(member_key)?;
        if peer == me || known.contains(&peer) {
            continue;
        }
        let role = format!("member {i}");
        if config.bootstrap.is_empty() {
            probes.push(Probe {
                role,
                peer,
                addr: None,
                outcome: Outcome::NotChecked {
                    reason: "its address comes with the coordinator's round announcements; \
                             run the member, or list bootstrap peers to find it through Kademlia"
                        .into(),
                },
            });
            continue;
        }
        let found = tokio::time::timeout(timeout, client.find_peer(peer)).await;
        match found {
            Ok(Ok(addrs)) if !addrs.is_empty() => {
                // One address per member: QUIC first, as `fd-node run` dials.
                let addr = net::prefer_quic(addrs).remove(0);
                let addr = strip_peer(addr);
                probes.push(dial(&client, role, peer, addr, timeout).await);
            }
            other => probes.push(Probe {
                role,
                peer,
                addr: None,
                outcome: Outcome::Unreachable {
                    reason: match other {
                        Ok(Err(e)) => format!("Kademlia did not find it: {e:#}"),
                        Err(_) => format!("Kademlia did not find it within {timeout:?}"),
                        Ok(Ok(_)) => "Kademlia found no address for it".into(),
                    },
                    hint: "the member is not running, or has not reached any bootstrap peer yet"
                        .into(),
                },
            }),
        }
    }
    event_loop.abort();
    Ok(probes)
}

fn strip_peer(mut addr: Multiaddr) -> Multiaddr {
    if matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr.pop();
    }
    addr
}

async fn dial(
    client: &Client,
    role: String,
    peer: PeerId,
    addr: Multiaddr,
    timeout: Duration,
) -> Probe {
    let started = Instant::now();
    let result = tokio::time::timeout(timeout, client.dial(peer, vec![addr.clone()])).await;
    let outcome = match result {
        Ok(Ok(connected)) => Outcome::Reachable {
            connect: started.elapsed(),
            relayed: connected.relayed,
        },
        Ok(Err(e)) => Outcome::Unreachable {
            hint: hint(&addr, &format!("{e:#}")),
            reason: format!("{e:#}"),
        },
        Err(_) => Outcome::Unreachable {
            reason: format!("no connection within {timeout:?}"),
            hint: hint(&addr, "timed out"),
        },
    };
    let mut full = addr;
    full.push(Protocol::P2p(peer));
    Probe {
        role,
        peer,
        addr: Some(full),
        outcome,
    }
}

/// What to open, or check, for a dial of `addr` that failed with `error`.
fn hint(addr: &Multiaddr, error: &str) -> String {
    let (mut host, mut port) = (String::from("the peer"), String::from("its port"));
    for p in addr.iter() {
        match p {
            Protocol::Ip4(ip) => host = ip.to_string(),
            Protocol::Ip6(ip) => host = ip.to_string(),
            Protocol::Dns(name) | Protocol::Dns4(name) | Protocol::Dns6(name) => {
                host = name.to_string()
            }
            Protocol::Tcp(p) | Protocol::Udp(p) => port = p.to_string(),
            _ => {}
        }
    }
    let lower = error.to_lowercase();
    if lower.contains("denied") || lower.contains("not allowed") || lower.contains("blocked") {
        return "the peer refuses this PeerId: add it (`fd-node peer-id`) to the federation's \
                `members` on every member and the coordinator"
            .into();
    }
    if lower.contains("pnet") || (lower.contains("handshake") && !lower.contains("timed out")) {
        return "the connection opened but the handshake failed: a closed network needs the \
                same psk_file on both sides, and the address must end in the peer's own PeerId"
            .into();
    }
    if net::is_quic(addr) {
        format!(
            "no QUIC answer from {host} UDP {port}: is the peer running and listening there? \
             Its firewall must allow inbound UDP {port}; this host's must allow outbound UDP \
             to it and the replies (a stateful UDP rule)"
        )
    } else {
        format!(
            "no TCP connection to {host} port {port}: is the peer running and listening there? \
             Its firewall must allow inbound TCP {port}; this host's must allow outbound TCP \
             to it"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_name_the_transport_port_and_side_to_open() {
        let tcp: Multiaddr = "/ip4/10.0.0.7/tcp/7000".parse().unwrap();
        let quic: Multiaddr = "/ip4/10.0.0.7/udp/7001/quic-v1".parse().unwrap();
        let h = hint(&tcp, "Connection refused (os error 111)");
        assert!(h.contains("inbound TCP 7000") && h.contains("10.0.0.7"), "{h}");
        let h = hint(&quic, "timed out");
        assert!(h.contains("inbound UDP 7001") && h.contains("outbound UDP"), "{h}");
        let h = hint(&tcp, "Failed to negotiate transport protocol(s): pnet handshake");
        assert!(h.contains("psk_file"), "{h}");
        let h = hint(&tcp, "connection denied by allow list");
        assert!(h.contains("members"), "{h}");
    }
}
