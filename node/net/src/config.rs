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
