//! Members behind NATs: AutoNAT, circuit relay v2 and hole punching (DCUtR).
//!
//! # Design
//!
//! Organisations' machines accept no inbound connection; they may dial out.
//! Most pairs of members therefore still connect directly: whoever can be
//! dialled is dialled, and a connection carries requests both ways, so a
//! member behind a NAT that pushes its share to a public member has also
//! opened the path that member's share comes back on. Only two members that
//! are both unreachable need help, and libp2p's answer is the one used here:
//!
//! 1. **AutoNAT** (v1, client and server in every node): a node asks peers
//!    (the coordinator first, as a configured server) to dial it back at its
//!    observed address. A failed dial-back makes it `Private`.
//! 2. **Relay v2**: a private node (or one configured `mode = "always"`)
//!    listens on `<relay>/p2p/<relay id>/p2p-circuit`, i.e. reserves a slot
//!    on each of its relays (by default the coordinator, which serves by
//!    default; members may opt in with `serve = true`). Every node adds
//!    `<relay>/p2p-circuit/p2p/<peer>` to the addresses it dials a member
//!    at, beside the member's own, so a member that holds a reservation is
//!    reached through the circuit when nothing else answers.
//! 3. **DCUtR**: the node that accepted a relayed connection starts hole
//!    punching (both sides dial each other's observed addresses at a
//!    synchronised moment). When a direct connection to a peer exists, the
//!    relayed ones to it are closed after [`RELAYED_GRACE`], so shares in
//!    flight finish and later ones go direct.
//!
//! Shares travel over whichever connection exists, but a share larger than
//! `max_relayed_share_bytes` is never pushed over a relayed one (the push is
//! retried until a direct connection appears or the round's deadline
//! passes), nor pulled over one ([`super::RelayedOnly`]; the puller retries
//! for a minute):
//! relays are limited in bytes and time, and someone pays for them. Every
//! share answered over a circuit is counted (`shares_relayed`) so operators
//! see what their relay carries.
//!
//! Trust: relaying changes nothing about who a peer is. The circuit carries
//! Noise + Yamux end to end (the relay sees ciphertext), the remote's PeerId
//! is authenticated by Noise as on a direct connection, and the allow-list
//! applies to relayed connections as to direct ones. A relay can drop or
//! delay what it carries, as any router can, and cannot alter it. A relay
//! serves within [`super::RelayLimits`] (reservations, circuits, bytes and
//! seconds per circuit) and libp2p's per-peer and per-IP rate limits, so a
//! member cannot make the coordinator carry unbounded traffic.

use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId, autonat, relay};

use super::RelayLimits;

/// How long a relayed connection to a peer stays open after a direct one
/// to the same peer was established: requests in flight on it finish.
pub const RELAYED_GRACE: Duration = Duration::from_secs(2);

/// How long after a failed reservation (relay unreachable, refused, or the
/// reservation's listener closed) it is tried again.
pub const RESERVATION_RETRY: Duration = Duration::from_secs(5);

/// The relay v2 server settings for `limits`, with libp2p's default rate
/// limits (per peer and per IP) on reservations and circuits.
pub fn server_config(limits: &RelayLimits) -> relay::Config {
    relay::Config {
        max_reservations: limits.max_reservations,
        max_circuits: limits.max_circuits,
        max_circuit_bytes: limits.max_circuit_bytes,
        max_circuit_duration: Duration::from_secs(limits.max_circuit_secs),
        ..relay::Config::default()
    }
}

/// AutoNAT v1 settings: the first probe soon after start (members join
/// within seconds), and private addresses allowed, because federations run
/// inside private networks as often as across the internet.
pub fn autonat_config() -> autonat::Config {
    autonat::Config {
        boot_delay: Duration::from_secs(1),
        retry_interval: Duration::from_secs(30),
        throttle_server_period: Duration::from_secs(5),
        only_global_ips: false,
        ..autonat::Config::default()
    }
}

/// The address of `peer` through `relay` (at `relay_addr`, without
/// `/p2p/<relay>`): `<relay_addr>/p2p/<relay>/p2p-circuit`. The swarm
/// appends `/p2p/<peer>` when it dials.
pub fn circuit_addr(relay: PeerId, relay_addr: &Multiaddr) -> Multiaddr {
    relay_addr
        .clone()
        .with(Protocol::P2p(relay))
        .with(Protocol::P2pCircuit)
}

/// Whether `addr` goes through a relay.
pub fn is_circuit(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn circuit_addresses_name_the_relay_and_are_recognised() {
        let relay = PeerId::random();
        let addr: Multiaddr = "/ip4/10.0.0.1/tcp/7000".parse().unwrap();
        let circuit = circuit_addr(relay, &addr);
        assert_eq!(
            circuit.to_string(),
            format!("/ip4/10.0.0.1/tcp/7000/p2p/{relay}/p2p-circuit")
        );
        assert!(is_circuit(&circuit));
        assert!(!is_circuit(&addr));
    }

    #[test]
    fn server_limits_come_from_the_config() {
        let limits = RelayLimits {
            max_reservations: 3,
            max_circuits: 2,
            max_circuit_bytes: 1000,
            max_circuit_secs: 9,
        };
        let c = server_config(&limits);
        assert_eq!(
            (c.max_reservations, c.max_circuits, c.max_circuit_bytes),
            (3, 2, 1000)
        );
        assert_eq!(c.max_circuit_duration, Duration::from_secs(9));
    }
}
