//! A member's identity on disk.
//!
//! The key file holds the 32-byte Ed25519 secret seed as 64 hex characters.
//! It is created on first use with permissions 0600 and written atomically
//! (temporary file, fsync, rename), so a crash never leaves half a key. A key
//! file that others can read is refused: a leaked key lets anyone sign
//! shares in this member's name.

use std::fs;
use std::path::{Path, PathBuf};

use fd_protocol::SigningKey;

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key file {path} does not hold a 64-character hex Ed25519 seed")]
    Format { path: PathBuf },
}

/// Loads the key at `path`, creating a new one if the file does not exist.
/// Returns the key and whether it was created.
pub fn load_or_create(path: &Path) -> Result<(SigningKey, bool), KeyFileError> {
    match fs::metadata(path) {
        Ok(_) => load(path).map(|k| (k, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SigningKey::generate();
            write(path, &key)?;
            Ok((key, true))
        }
        Err(source) => Err(KeyFileError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Loads an existing key file.
pub fn load(path: &Path) -> Result<SigningKey, KeyFileError> {
    let read_err = |source| KeyFileError::Read {
        path: path.to_owned(),
        source,
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(path).map_err(read_err)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
    }
    let text = fs::read_to_string(path).map_err(read_err)?;
    let digest = fd_protocol::Digest::from_hex(&text).ok_or_else(|| KeyFileError::Format {
        path: path.to_owned(),
    })?;
    Ok(SigningKey::from_seed(digest.0))
}

/// Writes `key` to `path` atomically with permissions 0600.
pub fn write(path: &Path, key: &SigningKey) -> Result<(), KeyFileError> {
    let write_err = |source| KeyFileError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(write_err)?;
    let text = format!("{}\n", fd_protocol::Digest(*key.seed()).to_hex());
    fd_data::fsutil::write_atomic(path, text.as_bytes(), 0o600).map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reloaded_and_world_readable_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let (a, created) = load_or_create(&path).unwrap();
        assert!(created);
        let (b, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(a.public_key(), b.public_key());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
            let err = load(&path).unwrap_err();
            assert!(matches!(err, KeyFileError::Permissions { .. }));
            assert!(err.to_string().contains("chmod 600"));
        }
    }

    #[test]
    fn garbage_is_a_format_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.key");
        write(&path, &SigningKey::from_seed([1; 32])).unwrap();
        fs::write(&path, "not hex").unwrap();
        assert!(matches!(load(&path), Err(KeyFileError::Format { .. })));
    }
}
