//! The messages of an fd federation.
//!
//! Two conversations share one message type so one codec serves both:
//! - member → coordinator: [`JoinRequest`] → `Welcome`/`JoinRefused`;
//!   [`RoundMetrics`] → `Ack`/`Refused`.
//! - coordinator → member: `Control` ([`SignedControl`]: a signed round
//!   announcement or `Done`) → `Ack`/`Refused`.
//! - member ↔ member: `Share` ([`LogitShare`]) → `ShareAccepted`/`ShareRejected`.
//!
//! Any request may be answered `Refused { code: "busy" }` when its sender
//! has too many requests in flight.
//!
//! The coordinator never sees private data and never needs the logits: it
//! only learns who is a member, where they listen, and the metrics they report.

use serde::{Deserialize, Serialize};

use crate::control::SignedControl;
use crate::digest::Digest;
use crate::error::ProtocolError;
use crate::identity::PublicKey;
use crate::share::LogitShare;

/// A federation member as others see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// Ed25519 public key: signs the member's shares and is its libp2p identity.
    pub key: PublicKey,
    /// Human-readable name, for logs and tables.
    pub name: String,
    /// Multiaddresses the member listens on.
    pub addrs: Vec<String>,
}

/// Longest member name, in characters.
pub const MAX_NAME_CHARS: usize = 64;
/// Most listen addresses a member may announce, and the longest one, in bytes.
pub const MAX_ADDRS: usize = 8;
pub const MAX_ADDR_BYTES: usize = 256;

impl Member {
    /// What a coordinator checks before it writes a member into its state,
    /// its files and every announcement: the name is 1 to
    /// [`MAX_NAME_CHARS`] characters without control characters other than
    /// a newline (files quote it, logs escape it), and the addresses are
    /// few and short.
    pub fn check(&self) -> Result<(), ProtocolError> {
        let chars = self.name.chars().count();
        if chars == 0 || chars > MAX_NAME_CHARS {
            return Err(ProtocolError::InvalidField {
                field: "member.name",
                reason: format!("{chars} characters; 1 to {MAX_NAME_CHARS} allowed"),
            });
        }
        if let Some(c) = self.name.chars().find(|c| c.is_control() && *c != '\n') {
            return Err(ProtocolError::InvalidField {
                field: "member.name",
                reason: format!("control character {:?} is not allowed", c),
            });
        }
        if self.addrs.len() > MAX_ADDRS {
            return Err(ProtocolError::InvalidField {
                field: "member.addrs",
                reason: format!(
                    "{} addresses; at most {MAX_ADDRS} allowed",
                    self.addrs.len()
                ),
            });
        }
        if let Some(a) = self.addrs.iter().find(|a| a.len() > MAX_ADDR_BYTES) {
            return Err(ProtocolError::InvalidField {
                field: "member.addrs",
                reason: format!(
                    "an address of {} bytes; at most {MAX_ADDR_BYTES} allowed",
                    a.len()
                ),
            });
        }
        Ok(())
    }
}

/// The public dataset every member holds and has verified.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublicSetDescriptor {
    /// Where it comes from, for humans (e.g. "fashion-mnist train, 5000 samples").
    pub source: String,
    /// Number of samples in the public set.
    pub samples: u64,
    /// SHA-256 over the bytes of those samples, in order.
    pub digest: Digest,
}

/// What every member agrees on before the first round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FederationManifest {
    pub federation_id: String,
    pub public_set: PublicSetDescriptor,
    pub classes: u32,
    pub rounds: u64,
    /// Public samples predicted and shared per round.
    pub subset_size: u32,
    /// Seed for the per-round public subsets.
    pub seed: u64,
}

/// A node asks to join.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinRequest {
    pub federation_id: String,
    pub member: Member,
    /// Digest of the public set the node holds; must equal the manifest's.
    pub public_set_digest: Digest,
    pub train_samples: u64,
}

/// The coordinator opens a round. Travels inside a [`SignedControl`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundAnnouncement {
    pub federation_id: String,
    pub round: u64,
    /// Shares arriving after this instant (Unix milliseconds) are not waited for.
    pub deadline_unix_ms: u64,
    /// Current members, including the receiver.
    pub members: Vec<Member>,
}

/// What a node reports after a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundMetrics {
    pub federation_id: String,
    pub round: u64,
    pub node: PublicKey,
    pub name: String,
    /// Test accuracy after distillation, in [0, 1].
    pub test_accuracy: f64,
    /// Test accuracy after local training, before distillation.
    pub local_accuracy: f64,
    /// Bytes this node wrote to peers this round (share frames).
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Size of one encoded share frame.
    pub share_bytes: u64,
    pub shares_sent: u32,
    pub shares_aggregated: u32,
    /// Shares rejected since the previous report.
    pub shares_rejected: u32,
    /// Rejections since the node started, by [`crate::RejectReason`] code.
    pub rejections: Vec<(String, u64)>,
    /// Mean cross-entropy of the last local epoch.
    pub train_loss: f64,
    /// Mean distillation loss of the last distillation epoch (0 when none ran).
    pub distill_loss: f64,
    pub train_seconds: f64,
    pub predict_seconds: f64,
    /// Encoding the payload and signing the share.
    pub encode_seconds: f64,
    /// From the first push until the round closed: sending, then waiting for peers.
    pub network_seconds: f64,
    /// Validating (signature, shape, values) and decoding the peers' shares.
    pub verify_seconds: f64,
    pub aggregate_seconds: f64,
    pub distill_seconds: f64,
    /// Saving the member's learning state after the round.
    #[serde(default)]
    pub checkpoint_seconds: f64,
    /// Whether the round met its quorum and distilled (false: the member
    /// kept its locally trained student for this round).
    #[serde(default)]
    pub distilled: bool,
    /// Fraction of the round's public rows kept in the teacher after the
    /// receiver's filter (e.g. on the peers' [`crate::RowWeights`]), in
    /// [0, 1]: 1 when nothing is filtered, 0 when the member did not distil.
    #[serde(default)]
    pub teacher_rows_kept: f64,
    /// Accuracy on the member's held-out validation split of the student it
    /// kept this round; `None` without a validation split.
    #[serde(default)]
    pub validation_accuracy: Option<f64>,
    /// The round's distillation lowered validation accuracy beyond the
    /// member's tolerance and was undone: the member kept its locally
    /// trained student.
    #[serde(default)]
    pub rolled_back: bool,
    /// Of `shares_sent`, the shares pushed over a relayed connection
    /// (circuit relay v2) rather than a direct one.
    #[serde(default)]
    pub shares_relayed: u32,
}

impl RoundMetrics {
    /// A report of `round` by member `node` with every measurement at zero,
    /// to be filled in (`RoundMetrics { test_accuracy, ..RoundMetrics::new(..) }`).
    pub fn new(federation_id: &str, round: u64, node: PublicKey, name: &str) -> Self {
        RoundMetrics {
            federation_id: federation_id.to_string(),
            round,
            node,
            name: name.to_string(),
            test_accuracy: 0.0,
            local_accuracy: 0.0,
            bytes_sent: 0,
            bytes_received: 0,
            share_bytes: 0,
            shares_sent: 0,
            shares_aggregated: 0,
            shares_rejected: 0,
            rejections: Vec::new(),
            train_loss: 0.0,
            distill_loss: 0.0,
            train_seconds: 0.0,
            predict_seconds: 0.0,
            encode_seconds: 0.0,
            network_seconds: 0.0,
            verify_seconds: 0.0,
            aggregate_seconds: 0.0,
            distill_seconds: 0.0,
            checkpoint_seconds: 0.0,
            shares_relayed: 0,
            distilled: false,
            validation_accuracy: None,
            rolled_back: false,
            teacher_rows_kept: 0.0,
        }
    }
}

/// Longest round a report may claim for one step, in seconds (a week): a
/// bound well past any real round, so that a sum over rounds stays finite.
pub const MAX_REPORTED_SECONDS: f64 = 7.0 * 24.0 * 3600.0;

impl RoundMetrics {
    /// What a coordinator checks before it writes a member's report into its
    /// state, metrics.csv and the round's summary: every accuracy and
    /// fraction is a finite number in [0, 1], every loss finite and not
    /// negative, every duration finite and in [0, [`MAX_REPORTED_SECONDS`]],
    /// and the rejection counts name known [`crate::RejectReason`] codes,
    /// each at most once. The error names the field.
    pub fn check(&self) -> Result<(), ProtocolError> {
        fn invalid(field: &'static str, reason: String) -> ProtocolError {
            ProtocolError::InvalidField { field, reason }
        }
        let fractions = [
            ("test_accuracy", Some(self.test_accuracy)),
            ("local_accuracy", Some(self.local_accuracy)),
            ("teacher_rows_kept", Some(self.teacher_rows_kept)),
            ("validation_accuracy", self.validation_accuracy),
        ];
        for (field, value) in fractions {
            if let Some(v) = value
                && !(0.0..=1.0).contains(&v)
            {
                return Err(invalid(field, format!("{v} is not a fraction in [0, 1]")));
            }
        }
        if self.shares_relayed > self.shares_sent {
            return Err(invalid(
                "shares_relayed",
                format!(
                    "{} relayed of {} shares sent",
                    self.shares_relayed, self.shares_sent
                ),
            ));
        }
        for (field, v) in [("train_loss", self.train_loss), ("distill_loss", self.distill_loss)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(field, format!("{v} is not a finite, non-negative loss")));
            }
        }
        let durations = [
            ("train_seconds", self.train_seconds),
            ("predict_seconds", self.predict_seconds),
            ("encode_seconds", self.encode_seconds),
            ("network_seconds", self.network_seconds),
            ("verify_seconds", self.verify_seconds),
            ("aggregate_seconds", self.aggregate_seconds),
            ("distill_seconds", self.distill_seconds),
            ("checkpoint_seconds", self.checkpoint_seconds),
        ];
        for (field, v) in durations {
            if !(0.0..=MAX_REPORTED_SECONDS).contains(&v) {
                return Err(invalid(
                    field,
                    format!("{v} is not a duration in [0, {MAX_REPORTED_SECONDS}] seconds"),
                ));
            }
        }
        if self.rejections.len() > crate::RejectReason::ALL.len() {
            return Err(invalid(
                "rejections",
                format!(
                    "{} entries; at most one per reason ({})",
                    self.rejections.len(),
                    crate::RejectReason::ALL.len()
                ),
            ));
        }
        for (i, (code, _)) in self.rejections.iter().enumerate() {
            if !crate::RejectReason::ALL.iter().any(|r| r.as_str() == code) {
                return Err(invalid(
                    "rejections",
                    format!("{:?} is not a rejection reason", truncated(code, 40)),
                ));
            }
            if self.rejections[..i].iter().any(|(c, _)| c == code) {
                return Err(invalid("rejections", format!("{code:?} listed twice")));
            }
        }
        Ok(())
    }
}

/// At most `chars` characters of `text`, for quoting untrusted text in errors.
fn truncated(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

/// Everything that travels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    Join(JoinRequest),
    Welcome {
        manifest: FederationManifest,
        members: Vec<Member>,
    },
    JoinRefused {
        reason: String,
    },
    /// A round announcement or the federation's end, signed by the coordinator.
    Control(SignedControl),
    Share(LogitShare),
    ShareAccepted,
    ShareRejected {
        /// A [`crate::RejectReason`] code.
        code: String,
        reason: String,
    },
    Metrics(RoundMetrics),
    Ack,
    /// A request that is not a share was refused (control message, report,
    /// or any request while its sender is over its limit: code `busy`).
    Refused {
        /// A [`crate::RejectReason`] code.
        code: String,
        reason: String,
    },
    /// A share too large to push whole can be pulled from its sender (the
    /// gossip payload on `/fd/<federation>/shares`; see [`crate::transfer`]).
    ShareAvailable(crate::transfer::ShareAnnouncement),
    /// Asks a share's sender for chunk `index` of the share it announced
    /// with `digest` for `round`. Answered with `Chunk` or `ChunkUnavailable`.
    FetchChunk {
        round: u64,
        digest: Digest,
        index: u32,
    },
    /// Bytes `index × CHUNK_BYTES ..` of an announced share.
    Chunk {
        index: u32,
        data: Vec<u8>,
    },
    /// The sender no longer holds (or never held) the requested chunk.
    ChunkUnavailable {
        reason: String,
    },
    /// A step of secure aggregation among the round's members (see
    /// [`crate::secagg`]); answered with `Ack` or `Refused`.
    SecAgg(crate::secagg::SecAggMessage),
}

impl Message {
    /// The variant's name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Join(_) => "Join",
            Message::Welcome { .. } => "Welcome",
            Message::JoinRefused { .. } => "JoinRefused",
            Message::Control(_) => "Control",
            Message::Share(_) => "Share",
            Message::ShareAccepted => "ShareAccepted",
            Message::ShareRejected { .. } => "ShareRejected",
            Message::Metrics(_) => "Metrics",
            Message::Ack => "Ack",
            Message::Refused { .. } => "Refused",
            Message::ShareAvailable(_) => "ShareAvailable",
            Message::FetchChunk { .. } => "FetchChunk",
            Message::Chunk { .. } => "Chunk",
            Message::ChunkUnavailable { .. } => "ChunkUnavailable",
            Message::SecAgg(_) => "SecAgg",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RejectReason, SigningKey};

    fn report() -> RoundMetrics {
        RoundMetrics {
            test_accuracy: 0.8,
            local_accuracy: 0.6,
            teacher_rows_kept: 1.0,
            validation_accuracy: Some(0.7),
            train_loss: 0.4,
            distill_loss: 0.2,
            train_seconds: 1.5,
            rejections: vec![("busy".into(), 3), ("wrong_round".into(), 1)],
            ..RoundMetrics::new("f", 1, SigningKey::from_seed([1; 32]).public_key(), "m")
        }
    }

    #[test]
    fn a_report_a_member_can_have_measured_passes() {
        report().check().unwrap();
        let every_reason = RoundMetrics {
            rejections: RejectReason::ALL.iter().map(|r| (r.as_str().into(), 1)).collect(),
            ..report()
        };
        every_reason.check().unwrap();
        // Bounds are inclusive.
        RoundMetrics {
            test_accuracy: 0.0,
            local_accuracy: 1.0,
            network_seconds: MAX_REPORTED_SECONDS,
            validation_accuracy: None,
            ..report()
        }
        .check()
        .unwrap();
    }

    #[test]
    fn each_impossible_value_is_refused_naming_its_field() {
        let cases: Vec<(&str, RoundMetrics)> = vec![
            ("test_accuracy", RoundMetrics { test_accuracy: f64::NAN, ..report() }),
            ("local_accuracy", RoundMetrics { local_accuracy: 1.0001, ..report() }),
            ("teacher_rows_kept", RoundMetrics { teacher_rows_kept: -0.1, ..report() }),
            ("validation_accuracy", RoundMetrics { validation_accuracy: Some(f64::NAN), ..report() }),
            ("train_loss", RoundMetrics { train_loss: -1.0, ..report() }),
            ("distill_loss", RoundMetrics { distill_loss: f64::INFINITY, ..report() }),
            ("verify_seconds", RoundMetrics { verify_seconds: -0.5, ..report() }),
            ("checkpoint_seconds", RoundMetrics { checkpoint_seconds: MAX_REPORTED_SECONDS * 2.0, ..report() }),
            ("aggregate_seconds", RoundMetrics { aggregate_seconds: f64::NAN, ..report() }),
            ("rejections", RoundMetrics { rejections: vec![("made_up".into(), 1)], ..report() }),
            ("rejections", RoundMetrics { rejections: vec![("busy".into(), 1), ("busy".into(), 2)], ..report() }),
            ("rejections", RoundMetrics { rejections: vec![("busy".into(), 1); 20], ..report() }),
            ("shares_relayed", RoundMetrics { shares_relayed: 2, shares_sent: 1, ..report() }),
        ];
        for (field, bad) in cases {
            match bad.check() {
                Err(e @ ProtocolError::InvalidField { field: f, .. }) if f == field => {
                    assert_eq!(e.reason(), RejectReason::InvalidField);
                    assert!(e.to_string().contains(field), "{e}");
                }
                other => panic!("a bad `{field}` gave {other:?}"),
            }
        }
    }

    #[test]
    fn an_unknown_code_is_quoted_shortened_in_the_error() {
        let long = "x".repeat(10_000);
        let e = RoundMetrics { rejections: vec![(long, 1)], ..report() }.check().unwrap_err();
        assert!(e.to_string().len() < 200, "{e}");
    }
}
