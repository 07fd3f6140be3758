//! The `[federation]` table and what reading configs needs in common.
//!
//! Shared by a member's `node.toml` (fd-node wraps it in its `NodeConfig`)
//! and the coordinator's config, so it lives below both: who the members are
//! (PeerIds, hence here beside [`crate::membership`]), when rounds run (a
//! [`Schedule`] for federations without a coordinator), the quorum, and the
//! public set's size and seed, from which [`FederationConfig::manifest`]
//! derives the manifest every member checks. No ML type appears here.

use std::path::{Path, PathBuf};

use fd_data::DataSplits;
use fd_data::public::{public_set_digest, split_public};
use fd_protocol::{FederationManifest, PublicSetDescriptor};
use serde::{Deserialize, Serialize};

/// Errors reading or checking a config file; each names the file and field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: field `{field}` {reason}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        reason: String,
    },
}

/// The `[federation]` table, shared by nodes and the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    pub id: String,
    pub rounds: u64,
    #[serde(default = "default_public_size")]
    pub public_size: usize,
    #[serde(default = "default_subset_size")]
    pub subset_size: usize,
    #[serde(default)]
    pub seed: u64,
    /// PeerIds of the members. When given, only they (and the coordinator and
    /// bootstrap peers) may connect, join and send shares; empty = an open
    /// federation where anyone holding the public set may join.
    #[serde(default)]
    pub members: Vec<String>,
    /// Fraction of the round's expected peer shares that must have arrived
    /// when the deadline passes for the round to distil; below it the member
    /// keeps its locally trained student for that round.
    #[serde(default = "default_quorum")]
    pub quorum: f64,
    /// Round clock without a coordinator: round r opens at
    /// `start_unix + (r − 1) · round_secs`.
    #[serde(default)]
    pub schedule: Option<Schedule>,
}

/// A deterministic round schedule, known to every member from the config.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// When round 1 opens (Unix seconds).
    pub start_unix: u64,
    /// Seconds between the openings of consecutive rounds.
    pub round_secs: u64,
    /// Seconds after its opening at which a round stops waiting for shares.
    pub share_deadline_secs: u64,
}

impl Schedule {
    /// When `round` opens and when it stops waiting for shares (Unix ms).
    pub fn window_ms(&self, round: u64) -> (u64, u64) {
        let open = (self.start_unix + (round.max(1) - 1) * self.round_secs) * 1000;
        (open, open + self.share_deadline_secs * 1000)
    }

    /// The round whose share window is open at `now_ms`, or the next one to
    /// open; rounds whose window has closed are over for a member that missed them.
    pub fn current_round(&self, now_ms: u64) -> u64 {
        let start = self.start_unix * 1000;
        if now_ms < start {
            return 1;
        }
        let elapsed = now_ms - start;
        let round = elapsed / (self.round_secs * 1000) + 1;
        if elapsed % (self.round_secs * 1000) < self.share_deadline_secs * 1000 {
            round
        } else {
            round + 1
        }
    }
}

fn default_quorum() -> f64 {
    0.5
}

fn default_public_size() -> usize {
    5000
}

fn default_subset_size() -> usize {
    2000
}

impl FederationConfig {
    /// Checks every field; the error names the field (`federation.…`) and why.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.id.is_empty() {
            return Err(("federation.id", "must not be empty".into()));
        }
        if self.rounds == 0 {
            return Err(("federation.rounds", "must be at least 1".into()));
        }
        if !(0.0..=1.0).contains(&self.quorum) {
            return Err((
                "federation.quorum",
                format!("must be a fraction in [0, 1], got {}", self.quorum),
            ));
        }
        for (i, member) in self.members.iter().enumerate() {
            if let Err(e) = crate::membership::member_key(member) {
                return Err((
                    "federation.members",
                    format!("entry {i} (`{member}`) is not an Ed25519 PeerId: {e}"),
                ));
            }
        }
        if let Some(s) = &self.schedule
            && (s.round_secs == 0
                || s.share_deadline_secs == 0
                || s.share_deadline_secs >= s.round_secs)
        {
            return Err((
                "federation.schedule",
                format!(
                    "needs 0 < share_deadline_secs ({}) < round_secs ({})",
                    s.share_deadline_secs, s.round_secs
                ),
            ));
        }
        if self.subset_size == 0 || self.subset_size > self.public_size {
            return Err((
                "federation.subset_size",
                format!(
                    "must be between 1 and public_size ({}), got {}",
                    self.public_size, self.subset_size
                ),
            ));
        }
        Ok(())
    }

    /// The member keys of `members` (an empty list: an open federation).
    pub fn member_keys(&self) -> Vec<fd_protocol::PublicKey> {
        self.members
            .iter()
            .filter_map(|m| crate::membership::member_key(m).ok())
            .collect()
    }

    /// The manifest this federation implies for the given data: the digest
    /// is computed over the public samples actually used.
    pub fn manifest(&self, splits: &DataSplits) -> Result<FederationManifest, fd_data::DataError> {
        let split = split_public(splits.train.len(), self.public_size, self.seed)?;
        Ok(FederationManifest {
            federation_id: self.id.clone(),
            public_set: PublicSetDescriptor {
                source: format!("{}: {} training samples", splits.source, split.public.len()),
                samples: split.public.len() as u64,
                digest: public_set_digest(&splits.train, &split.public),
            },
            classes: splits.train.classes as u32,
            rounds: self.rounds,
            subset_size: self.subset_size as u32,
            seed: self.seed,
        })
    }
}

/// Resolves `path` against `base` unless it is absolute.
pub fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_owned()
    } else {
        base.join(path)
    }
}

/// How a node stays reachable behind a NAT or a firewall that allows
/// outbound connections only (libp2p circuit relay v2, AutoNAT, DCUtR), and
/// whether it relays for others: the `[relay]` table of a node's config.
///
/// A member behind a NAT dials out to everyone it can; what it cannot do is
/// accept a connection. So it reserves a slot on a relay (by default the
/// coordinator), is reachable at `<relay>/p2p-circuit/p2p/<itself>`, and a
/// peer that connects there is upgraded to a direct connection by hole
/// punching (DCUtR) when both NATs allow it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// When to reserve a slot on the relays.
    #[serde(default)]
    pub mode: RelayMode,
    /// Relays (`/ip4/…/tcp/…/p2p/<id>`); empty: the coordinator.
    #[serde(default)]
    pub relays: Vec<String>,
    /// Shares larger than this (bytes on the wire) are not pushed over a
    /// relayed circuit: the push waits for a direct connection (hole
    /// punching) until the round's deadline. A relay's circuits are limited
    /// in bytes and time, and its operator pays for the traffic.
    #[serde(default = "default_max_relayed_share_bytes")]
    pub max_relayed_share_bytes: u64,
    /// Relay for other members, within `limits`.
    #[serde(default)]
    pub serve: bool,
    #[serde(default)]
    pub limits: RelayLimits,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            mode: RelayMode::default(),
            relays: Vec::new(),
            max_relayed_share_bytes: default_max_relayed_share_bytes(),
            serve: false,
            limits: RelayLimits::default(),
        }
    }
}

fn default_max_relayed_share_bytes() -> u64 {
    1 << 20
}

/// When a node reserves a slot on its relays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RelayMode {
    /// When AutoNAT finds the node unreachable from outside (its peers,
    /// the coordinator first, fail to dial it back).
    #[default]
    Auto,
    /// From the start: the operator knows the node is behind a NAT.
    Always,
    /// Never: the node accepts inbound connections itself.
    Off,
}

/// What a relay grants (libp2p relay v2 server limits).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayLimits {
    /// Members holding a slot at once.
    pub max_reservations: usize,
    /// Relayed connections open at once (all members together).
    pub max_circuits: usize,
    /// Bytes one relayed connection may carry, both directions together,
    /// before the relay closes it (the next share opens a new one).
    pub max_circuit_bytes: u64,
    /// Seconds one relayed connection may stay open.
    pub max_circuit_secs: u64,
}

impl Default for RelayLimits {
    fn default() -> Self {
        // Sized for fd: a few members behind NATs, shares of ~100 KB per
        // round (2,000 × 10 f32), hole punching usually taking over after
        // the first share.
        RelayLimits {
            max_reservations: 128,
            max_circuits: 64,
            max_circuit_bytes: 4 << 20,
            max_circuit_secs: 600,
        }
    }
}

impl RelayConfig {
    /// Checks every field; the error names the field (`relay.…`) and why.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        for (i, addr) in self.relays.iter().enumerate() {
            let parsed: libp2p::Multiaddr = addr.parse().map_err(|e| {
                ("relay.relays", format!("entry {i} (`{addr}`) is not a multiaddress: {e}"))
            })?;
            if !matches!(parsed.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(_))) {
                return Err((
                    "relay.relays",
                    format!("entry {i} (`{addr}`) must end in /p2p/<the relay's PeerId>"),
                ));
            }
        }
        if self.max_relayed_share_bytes == 0 {
            return Err(("relay.max_relayed_share_bytes", "must be at least 1".into()));
        }
        self.limits.validate()
    }
}

impl RelayLimits {
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let l = self;
        for (field, value) in [
            ("relay.limits.max_reservations", l.max_reservations as u64),
            ("relay.limits.max_circuits", l.max_circuits as u64),
            ("relay.limits.max_circuit_bytes", l.max_circuit_bytes),
            ("relay.limits.max_circuit_secs", l.max_circuit_secs),
        ] {
            if value == 0 {
                return Err((field, "must be at least 1".into()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod relay_config_tests {
    use super::*;

    #[test]
    fn relay_config_errors_name_the_field() {
        let mut c = RelayConfig {
            relays: vec!["/ip4/10.0.0.1/tcp/7000".into()],
            ..RelayConfig::default()
        };
        let (field, reason) = c.validate().unwrap_err();
        assert_eq!(field, "relay.relays");
        assert!(reason.contains("/p2p/"), "{reason}");
        c.relays = vec!["not an address".into()];
        assert_eq!(c.validate().unwrap_err().0, "relay.relays");
        c.relays.clear();
        c.limits.max_circuit_bytes = 0;
        assert_eq!(c.validate().unwrap_err().0, "relay.limits.max_circuit_bytes");
        c.limits = RelayLimits::default();
        assert!(c.validate().is_ok());
        let parsed: RelayConfig = toml::from_str("mode = \"always\"\nserve = true").unwrap();
        assert_eq!((parsed.mode, parsed.serve), (RelayMode::Always, true));
        assert!(toml::from_str::<RelayConfig>("mode = \"sometimes\"").is_err());
    }
}
