//! Writing files so that a crash never leaves half of one, and sealing what
//! goes into them so that damage is found on reading.
//!
//! One implementation for every file fd persists (keys, metrics, results,
//! plots, checkpoints): write a temporary file beside the target, fsync it,
//! rename it over the target, fsync the folder so the rename itself survives
//! a power loss, and remove the temporary file if anything failed.
//!
//! Binary state (checkpoints, a learner's state, the best student) is
//! [`seal`]ed: a magic and a version say what it is, bincode 2 (derived
//! `Encode`/`Decode`, not a hand-written layout) says what is in it, and a
//! SHA-256 trailer says it is whole:
//!
//! ```text
//! magic        8 bytes, names the kind of file
//! u32 LE       format version
//! u64 LE       body length n
//! body         n bytes, bincode 2 (standard config) of the value
//! [u8; 32]     SHA-256 of everything above
//! ```

use std::fs;
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use fd_protocol::digest::sha256;

/// Replaces `path` with `bytes` atomically; a new file gets permissions `mode` (Unix).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a file path", path.display()),
        )
    })?;
    // Unique per process and call, so concurrent writers never share a temporary file.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tmp = path.with_file_name(format!(
        ".{}.{}-{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let result = (|| {
        let mut file = options.open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_parent(path)
}

/// Fsyncs the folder holding `path`: a rename is durable only once its folder is.
fn sync_parent(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        fs::File::open(parent)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Bytes of a sealed value before its body: magic, version, body length.
pub const SEAL_HEADER: usize = 8 + 4 + 8;
/// Bytes of a sealed value after its body: the SHA-256 trailer.
pub const SEAL_TRAILER: usize = 32;

/// Why [`unseal`] refused bytes; callers add which file or state it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("bad magic (not this kind of file)")]
    BadMagic,
    #[error("format version {found} is not supported (expected {expected})")]
    UnsupportedVersion { found: u32, expected: u32 },
    #[error("truncated or padded: {len} bytes, the header promises {expected}")]
    Length { len: usize, expected: u64 },
    #[error("checksum mismatch, the contents are corrupt")]
    Checksum,
    #[error("malformed body: {0}")]
    Malformed(String),
}

/// `value` sealed under `magic` and `version` (layout in the module doc).
pub fn seal<T: bincode::Encode>(magic: &[u8; 8], version: u32, value: &T) -> Vec<u8> {
    let body = bincode::encode_to_vec(value, bincode::config::standard())
        .expect("encoding into memory cannot fail");
    let mut out = Vec::with_capacity(SEAL_HEADER + body.len() + SEAL_TRAILER);
    out.extend_from_slice(magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    let checksum = sha256(&out);
    out.extend_from_slice(&checksum.0);
    out
}

/// The value [`seal`] sealed under `magic` and `version`. Checks, in order:
/// the magic (bytes cut inside it count as truncated, not foreign), the
/// version, the length the header promises, the checksum, and that the body
/// decodes to exactly its length.
pub fn unseal<T: bincode::Decode<()>>(
    magic: &[u8; 8],
    version: u32,
    bytes: &[u8],
) -> Result<T, SealError> {
    let shortest = (SEAL_HEADER + SEAL_TRAILER) as u64;
    if bytes.len() < magic.len() || &bytes[..magic.len()] != magic {
        if bytes.len() < magic.len() && magic.starts_with(bytes) {
            return Err(SealError::Length {
                len: bytes.len(),
                expected: shortest,
            });
        }
        return Err(SealError::BadMagic);
    }
    if bytes.len() < SEAL_HEADER {
        return Err(SealError::Length {
            len: bytes.len(),
            expected: shortest,
        });
    }
    let found = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if found != version {
        return Err(SealError::UnsupportedVersion {
            found,
            expected: version,
        });
    }
    let body_len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    let expected = body_len.saturating_add(shortest);
    if bytes.len() as u64 != expected {
        return Err(SealError::Length {
            len: bytes.len(),
            expected,
        });
    }
    let (content, checksum) = bytes.split_at(bytes.len() - SEAL_TRAILER);
    if sha256(content).0 != checksum {
        return Err(SealError::Checksum);
    }
    let body = &content[SEAL_HEADER..];
    let (value, read) = bincode::decode_from_slice(body, bincode::config::standard())
        .map_err(|e| SealError::Malformed(e.to_string()))?;
    if read != body.len() {
        return Err(SealError::Malformed(format!(
            "{} bytes after the value",
            body.len() - read
        )));
    }
    Ok(value)
}

/// Milliseconds since the Unix epoch (round deadlines travel in this unit).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, bincode::Encode, bincode::Decode)]
    struct Sample {
        name: String,
        round: u64,
        bytes: Vec<u8>,
    }

    #[test]
    fn a_sealed_value_opens_and_every_kind_of_damage_is_named() {
        const MAGIC: &[u8; 8] = b"FDTEST\0\n";
        let value = Sample {
            name: "ü".into(),
            round: 7,
            bytes: (0..1000u32).map(|i| i as u8).collect(),
        };
        let sealed = seal(MAGIC, 3, &value);
        assert_eq!(unseal::<Sample>(MAGIC, 3, &sealed), Ok(value));
        assert_eq!(
            unseal::<Sample>(MAGIC, 4, &sealed),
            Err(SealError::UnsupportedVersion {
                found: 3,
                expected: 4
            })
        );
        assert_eq!(
            unseal::<Sample>(b"OTHER\0\0\n", 3, &sealed),
            Err(SealError::BadMagic)
        );
        for len in [0, 5, 8, SEAL_HEADER, sealed.len() - 1] {
            assert!(
                matches!(
                    unseal::<Sample>(MAGIC, 3, &sealed[..len]),
                    Err(SealError::Length { .. })
                ),
                "{len}"
            );
        }
        for i in SEAL_HEADER..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert_eq!(
                unseal::<Sample>(MAGIC, 3, &bad),
                Err(SealError::Checksum),
                "byte {i}"
            );
        }
        // A valid seal around a body of another type is malformed, not accepted.
        let other = seal(MAGIC, 3, &(1u8, 2u8));
        assert!(matches!(
            unseal::<Sample>(MAGIC, 3, &other),
            Err(SealError::Malformed(_))
        ));
    }

    #[test]
    fn replaces_contents_with_the_given_mode_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.txt");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        assert!(write_atomic(&dir.path().join("missing/f.txt"), b"x", 0o644).is_err());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
