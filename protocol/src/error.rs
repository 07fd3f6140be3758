//! Typed errors for decoding and validating messages (shares, control
//! messages, reports) and for refusing requests.
//!
//! Every way a message can be refused has its own variant, and each maps to a
//! short [`RejectReason`] code so nodes can count rejections by reason in
//! their metrics without parsing strings.

use crate::identity::PublicKey;

/// Why a message or share was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    #[error("unsupported protocol version {got} (this build speaks version {expected})")]
    UnsupportedVersion { got: u16, expected: u16 },
    #[error("message of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge { size: usize, max: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("could not encode message: {0}")]
    Encode(String),
    #[error("bad signature on a share claiming to be from {sender}")]
    BadSignature { sender: PublicKey },
    #[error("shape mismatch in `{field}`: expected {expected}, got {got}")]
    ShapeMismatch {
        field: &'static str,
        expected: String,
        got: String,
    },
    #[error("share has {got} row weights for {rows} rows (one per row, or none)")]
    BadWeights { rows: u32, got: usize },
    #[error("non-finite value at position {index} of the payload")]
    NonFinite { index: usize },
    #[error("share belongs to federation `{got}`, expected `{expected}`")]
    WrongFederation { expected: String, got: String },
    #[error("share is for round {got}, expected round {expected}")]
    WrongRound { expected: u64, got: u64 },
    #[error("share describes a different public subset: {0}")]
    SubsetMismatch(String),
    #[error("share from {0}, which is not a member of this federation")]
    UnknownSender(PublicKey),
    #[error("invalid value in `{field}`: {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("share is for round {got}, which is not open yet (open: {open})")]
    FutureRound { open: u64, got: u64 },
    #[error("control message from {peer}, which is not the coordinator")]
    NotCoordinator { peer: String },
    #[error("forged control message: {0}")]
    ForgedControl(String),
    #[error("{kind} for round {got} is older than round {latest}, already announced")]
    StaleAnnouncement {
        kind: &'static str,
        latest: u64,
        got: u64,
    },
    #[error("report names {named}, but came from {peer}")]
    NotSender { named: String, peer: String },
    #[error("too many requests from {peer} in flight (limit {limit}); try again later")]
    Busy { peer: String, limit: usize },
    #[error("this peer does not take `{0}` requests")]
    Unexpected(&'static str),
}

/// Short, stable codes for counting rejections (metrics labels, CSV columns).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    Version,
    TooLarge,
    Malformed,
    BadSignature,
    Shape,
    BadWeights,
    NonFinite,
    WrongFederation,
    WrongRound,
    Subset,
    UnknownSender,
    InvalidField,
    FutureRound,
    NotCoordinator,
    ForgedAnnouncement,
    StaleAnnouncement,
    NotSender,
    Busy,
    Unexpected,
}

impl RejectReason {
    /// Every reason, in declaration order.
    pub const ALL: [RejectReason; 19] = [
        RejectReason::Version,
        RejectReason::TooLarge,
        RejectReason::Malformed,
        RejectReason::BadSignature,
        RejectReason::Shape,
        RejectReason::BadWeights,
        RejectReason::NonFinite,
        RejectReason::WrongFederation,
        RejectReason::WrongRound,
        RejectReason::Subset,
        RejectReason::UnknownSender,
        RejectReason::InvalidField,
        RejectReason::FutureRound,
        RejectReason::NotCoordinator,
        RejectReason::ForgedAnnouncement,
        RejectReason::StaleAnnouncement,
        RejectReason::NotSender,
        RejectReason::Busy,
        RejectReason::Unexpected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Version => "version",
            RejectReason::TooLarge => "too_large",
            RejectReason::Malformed => "malformed",
            RejectReason::BadSignature => "bad_signature",
            RejectReason::Shape => "shape",
            RejectReason::BadWeights => "bad_weights",
            RejectReason::NonFinite => "non_finite",
            RejectReason::WrongFederation => "wrong_federation",
            RejectReason::WrongRound => "wrong_round",
            RejectReason::Subset => "subset",
            RejectReason::UnknownSender => "unknown_sender",
            RejectReason::InvalidField => "invalid_field",
            RejectReason::FutureRound => "future_round",
            RejectReason::NotCoordinator => "not_coordinator",
            RejectReason::ForgedAnnouncement => "forged_announcement",
            RejectReason::StaleAnnouncement => "stale_announcement",
            RejectReason::NotSender => "not_sender",
            RejectReason::Busy => "busy",
            RejectReason::Unexpected => "unexpected_message",
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ProtocolError {
    pub fn reason(&self) -> RejectReason {
        match self {
            ProtocolError::UnsupportedVersion { .. } => RejectReason::Version,
            ProtocolError::TooLarge { .. } => RejectReason::TooLarge,
            ProtocolError::Malformed(_) | ProtocolError::Encode(_) => RejectReason::Malformed,
            ProtocolError::BadSignature { .. } => RejectReason::BadSignature,
            ProtocolError::ShapeMismatch { .. } => RejectReason::Shape,
            ProtocolError::BadWeights { .. } => RejectReason::BadWeights,
            ProtocolError::NonFinite { .. } => RejectReason::NonFinite,
            ProtocolError::WrongFederation { .. } => RejectReason::WrongFederation,
            ProtocolError::WrongRound { .. } => RejectReason::WrongRound,
            ProtocolError::SubsetMismatch(_) => RejectReason::Subset,
            ProtocolError::UnknownSender(_) => RejectReason::UnknownSender,
            ProtocolError::InvalidField { .. } => RejectReason::InvalidField,
            ProtocolError::FutureRound { .. } => RejectReason::FutureRound,
            ProtocolError::NotCoordinator { .. } => RejectReason::NotCoordinator,
            ProtocolError::ForgedControl(_) => RejectReason::ForgedAnnouncement,
            ProtocolError::StaleAnnouncement { .. } => RejectReason::StaleAnnouncement,
            ProtocolError::NotSender { .. } => RejectReason::NotSender,
            ProtocolError::Busy { .. } => RejectReason::Busy,
            ProtocolError::Unexpected(_) => RejectReason::Unexpected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RejectReason;

    /// Position of each reason in [`RejectReason::ALL`]: a match without a
    /// wildcard, so a new reason does not compile until it is listed here.
    fn position(r: RejectReason) -> usize {
        use RejectReason::*;
        match r {
            Version => 0,
            TooLarge => 1,
            Malformed => 2,
            BadSignature => 3,
            Shape => 4,
            BadWeights => 5,
            NonFinite => 6,
            WrongFederation => 7,
            WrongRound => 8,
            Subset => 9,
            UnknownSender => 10,
            InvalidField => 11,
            FutureRound => 12,
            NotCoordinator => 13,
            ForgedAnnouncement => 14,
            StaleAnnouncement => 15,
            NotSender => 16,
            Busy => 17,
            Unexpected => 18,
        }
    }

    #[test]
    fn all_lists_every_reason_once_with_distinct_codes() {
        for (i, r) in RejectReason::ALL.iter().enumerate() {
            assert_eq!(position(*r), i, "{r}");
        }
        let mut codes: Vec<&str> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), RejectReason::ALL.len());
    }
}
