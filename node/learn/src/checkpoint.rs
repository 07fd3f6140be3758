//! Checkpoints of a member's learning state, so that a node killed with
//! `kill -9` resumes at the next round with exactly the state it had.
//!
//! Design:
//! - What is saved: the federation and member it belongs to, the last
//!   completed round, and [`Learner::state_bytes`](crate::learner::Learner::state_bytes)
//!   (student record with running statistics, optimizer moments and step
//!   counts, shuffling RNG position). Data, partition and public set are not
//!   saved: every member derives them from its config and seed.
//! - `weights_digest` (SHA-256 of the little-endian weights) is stored so
//!   logs and tests can show that the restored weights are the saved ones;
//!   fd-node's `LocalMember::restore` checks it.
//! - Durability: [`Checkpoint::save`] goes through
//!   [`fd_data::fsutil::write_atomic`] (temporary file beside the target, fsync,
//!   rename, fsync of the folder), so after a crash at any point the path
//!   holds either the old checkpoint or the new one, whole. A temporary file
//!   left behind by a kill is never read.
//! - Integrity: the file ends with a SHA-256 over everything before it, so a
//!   truncated or corrupted file is reported ([`CheckpointError`], naming the
//!   file) rather than loaded.
//!
//! File layout: [`fd_data::fsutil::seal`] (magic `"FDCKPT\0\n"`, version,
//! body length, bincode 2 body, SHA-256 trailer) of the [`Checkpoint`]
//! itself. Version 1 was a hand-written body; such files are refused with
//! their version named (pre-1.0: delete the file, the member re-runs from
//! round 1).

use std::path::{Path, PathBuf};

use fd_data::fsutil::{SealError, seal, unseal};
use fd_protocol::{Digest, PublicKey};

const MAGIC: &[u8; 8] = b"FDCKPT\0\n";
/// Bump when the fields change.
pub const CHECKPOINT_VERSION: u32 = 2;

/// One member's learning state after a completed round.
#[derive(Debug, Clone, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct Checkpoint {
    pub federation_id: String,
    #[bincode(with_serde)]
    pub member: PublicKey,
    /// The last completed round; training resumes at `round + 1`.
    pub round: u64,
    /// [`Learner::state_bytes`](crate::learner::Learner::state_bytes).
    pub learner: Vec<u8>,
    /// [`Learner::weights_digest`](crate::learner::Learner::weights_digest) at save time.
    #[bincode(with_serde)]
    pub weights_digest: Digest,
}

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {}: not a checkpoint file (bad magic)", path.display())]
    BadMagic { path: PathBuf },
    #[error("checkpoint {}: format version {version} is not supported (expected {CHECKPOINT_VERSION})", path.display())]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("checkpoint {}: truncated or padded: {len} bytes, the header promises {expected}", path.display())]
    Length {
        path: PathBuf,
        len: usize,
        expected: u64,
    },
    #[error("checkpoint {}: checksum mismatch, the file is corrupt", path.display())]
    Checksum { path: PathBuf },
    #[error("checkpoint {}: malformed body: {reason}", path.display())]
    Malformed { path: PathBuf, reason: String },
}

impl Checkpoint {
    /// The file contents (see the module doc).
    pub fn encode(&self) -> Vec<u8> {
        seal(MAGIC, CHECKPOINT_VERSION, self)
    }

    /// Parses [`Self::encode`]'s output; `path` only names the file in errors.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Checkpoint, CheckpointError> {
        let path = path.to_path_buf();
        unseal(MAGIC, CHECKPOINT_VERSION, bytes).map_err(|e| match e {
            SealError::BadMagic => CheckpointError::BadMagic { path },
            SealError::UnsupportedVersion { found, .. } => CheckpointError::UnsupportedVersion {
                path,
                version: found,
            },
            SealError::Length { len, expected } => CheckpointError::Length {
                path,
                len,
                expected,
            },
            SealError::Checksum => CheckpointError::Checksum { path },
            SealError::Malformed(reason) => CheckpointError::Malformed { path, reason },
        })
    }

    /// Writes the checkpoint to `path` atomically (see the module doc).
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        fd_data::fsutil::write_atomic(path, &self.encode(), 0o600).map_err(|source| {
            CheckpointError::Io {
                path: path.to_path_buf(),
                source,
            }
        })
    }

    /// Reads the checkpoint at `path`; `Ok(None)` when there is none yet.
    pub fn load(path: &Path) -> Result<Option<Checkpoint>, CheckpointError> {
        match std::fs::read(path) {
            Ok(bytes) => Self::decode(&bytes, path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CheckpointError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fd_data::fsutil::SEAL_HEADER as HEADER;
    use fd_protocol::digest::sha256;

    fn sample(round: u64) -> Checkpoint {
        let learner: Vec<u8> = (0..10_000u32)
            .map(|i| (i * 7 + round as u32) as u8)
            .collect();
        Checkpoint {
            federation_id: "fed-ü".into(),
            member: PublicKey([9; 32]),
            round,
            weights_digest: sha256(&learner),
            learner,
        }
    }

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("member.ckpt");
        assert!(Checkpoint::load(&path).unwrap().is_none());
        sample(3).save(&path).unwrap();
        assert_eq!(Checkpoint::load(&path).unwrap(), Some(sample(3)));
        sample(4).save(&path).unwrap();
        assert_eq!(Checkpoint::load(&path).unwrap(), Some(sample(4)));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_truncated_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("member.ckpt");
        let bytes = sample(1).encode();
        for len in [0, 5, 8, 15, HEADER, HEADER + 100, bytes.len() - 1] {
            std::fs::write(&path, &bytes[..len]).unwrap();
            let err = Checkpoint::load(&path).unwrap_err();
            assert!(
                matches!(err, CheckpointError::Length { .. }),
                "{len}: {err}"
            );
            assert!(err.to_string().contains("member.ckpt"), "{err}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        std::fs::write(&path, &longer).unwrap();
        assert!(matches!(
            Checkpoint::load(&path),
            Err(CheckpointError::Length { .. })
        ));
    }

    #[test]
    fn a_flipped_byte_anywhere_is_an_error() {
        let path = Path::new("x.ckpt");
        let bytes = sample(1).encode();
        // Every byte of the header and body, and a sample of the learner state.
        let positions = (0..HEADER + 120).chain((HEADER + 120..bytes.len()).step_by(97));
        for i in positions.chain([bytes.len() - 1]) {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(Checkpoint::decode(&bad, path).is_err(), "byte {i}");
        }
        let mut bad = bytes.clone();
        bad[HEADER + 40] ^= 1;
        let err = Checkpoint::decode(&bad, path).unwrap_err();
        assert!(matches!(err, CheckpointError::Checksum { .. }), "{err}");
        bad = bytes;
        bad[8] = 1;
        assert!(matches!(
            Checkpoint::decode(&bad, path),
            Err(CheckpointError::UnsupportedVersion { version: 1, .. })
        ));
        assert!(matches!(
            Checkpoint::decode(b"PK\x03\x04 something else", path),
            Err(CheckpointError::BadMagic { .. })
        ));
    }

    /// A kill during `save` leaves at most a temporary file beside the
    /// checkpoint (never a half-written checkpoint); loading ignores it.
    #[test]
    fn a_kill_during_save_leaves_the_old_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("member.ckpt");
        sample(1).save(&path).unwrap();
        let new = sample(2).encode();
        // What write_atomic had written when the kill came: part of the new file.
        std::fs::write(
            dir.path().join(".member.ckpt.4242-0.tmp"),
            &new[..new.len() / 2],
        )
        .unwrap();
        assert_eq!(Checkpoint::load(&path).unwrap(), Some(sample(1)));
        // The next save succeeds beside the stray file.
        sample(2).save(&path).unwrap();
        assert_eq!(Checkpoint::load(&path).unwrap(), Some(sample(2)));
    }

    #[test]
    fn saving_into_a_missing_folder_is_an_io_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing/member.ckpt");
        let err = sample(1).save(&path).unwrap_err();
        assert!(matches!(err, CheckpointError::Io { .. }), "{err}");
        assert!(err.to_string().contains("member.ckpt"), "{err}");
    }

    /// Prints the size of a checkpoint and the time of `save` (docs quote
    /// them); asserts only the size: the weights plus Adam's two moments,
    /// with a small overhead for names, ids and the RNG.
    #[test]
    fn checkpoint_size_and_save_time() {
        use crate::device::DeviceKind;
        use crate::learner::{Learner, TrainingConfig};
        use crate::model::{InputShape, ModelConfig};
        use fd_data::DataSource;

        let data = DataSource::Synthetic {
            seed: 3,
            train: 256,
            test: 10,
        }
        .load()
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        for model in [ModelConfig::default(), ModelConfig::FedAvgCnn {}] {
            // Adam: the largest state (weights and two moments).
            let mut learner = Learner::new(
                &model,
                TrainingConfig {
                    optimizer: crate::learner::OptimizerKind::Adam,
                    ..TrainingConfig::default()
                },
                DeviceKind::Flex,
                InputShape::new(data.train.shape),
                data.train.classes,
            );
            learner.train_local(&data.train, &(0..64).collect::<Vec<_>>());
            let path = dir.path().join(format!("{}.ckpt", model.name()));
            let start = std::time::Instant::now();
            let checkpoint = Checkpoint {
                federation_id: "f".into(),
                member: PublicKey([0; 32]),
                round: 1,
                learner: learner.state_bytes(),
                weights_digest: learner.weights_digest(),
            };
            let capture = start.elapsed();
            checkpoint.save(&path).unwrap();
            let total = start.elapsed();
            let size = std::fs::metadata(&path).unwrap().len() as usize;
            let params = learner.student().params();
            println!(
                "{}: {params} params, checkpoint {size} bytes ({:.2} MiB), \
                 state capture {:.1} ms, capture + save {:.1} ms",
                model.name(),
                size as f64 / (1 << 20) as f64,
                capture.as_secs_f64() * 1e3,
                total.as_secs_f64() * 1e3,
            );
            let state = 3 * 4 * params;
            assert!(
                size >= state && size < state + 64 * 1024,
                "{}: {size} bytes for {params} params",
                model.name()
            );
        }
    }
}
