//! Reader for the CIFAR-10 "binary version" (`cifar-10-binary.tar.gz`).
//!
//! The archive unpacks to a folder `cifar-10-batches-bin/` holding five
//! training batches `data_batch_1.bin` .. `data_batch_5.bin` and one
//! `test_batch.bin`. Each file is a bare sequence of 3073-byte records: one
//! label byte (0..=9), then 3072 pixel bytes — the 1024 red values of the
//! 32×32 image row by row, then the green, then the blue. That is exactly
//! [`Dataset`]'s channel-major layout with `shape = [3, 32, 32]`, so records
//! are split, not rearranged.
//!
//! There is no header, so a truncated download can only be detected by its
//! size: every file must be a whole, non-zero number of records, and the
//! error says how many whole records and stray bytes it holds. The batches
//! are looked for in `dir` and then in its immediate subfolders (so `dir` may
//! be the folder the archive was unpacked into); all six must be in the same
//! place, and a missing one is named. Training batches are concatenated in
//! order 1..5, so the sample order (and hence the public set) is the same on
//! every machine.

use std::path::{Path, PathBuf};

use super::{DataError, DataSplits, Dataset, read_file, search_places};

/// Classes in CIFAR-10.
pub const CLASSES: usize = 10;
/// Sample layout: channels, height, width.
pub const SHAPE: [usize; 3] = [3, 32, 32];
/// Pixel bytes per image (3 · 32 · 32).
pub const PIXELS: usize = 3072;
/// Bytes per record: the label byte and the pixels.
pub const RECORD: usize = 1 + PIXELS;
/// The training batches, in the order they are concatenated.
pub const TRAIN_BATCHES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// The test batch.
pub const TEST_BATCH: &str = "test_batch.bin";

/// Loads the six batches found under `dir`.
pub fn load(dir: &Path) -> Result<DataSplits, DataError> {
    let place = locate(dir)?;
    let mut train = empty();
    for name in TRAIN_BATCHES {
        read_batch(&place.join(name), &mut train)?;
    }
    let mut test = empty();
    read_batch(&place.join(TEST_BATCH), &mut test)?;
    tracing::debug!(
        train = train.len(),
        test = test.len(),
        dir = %place.display(),
        "loaded cifar10"
    );
    Ok(DataSplits {
        train,
        test,
        source: format!("cifar10 ({})", place.display()),
    })
}

/// The folder holding the batches: the first search place with
/// `data_batch_1.bin`, which must then hold the other five too.
fn locate(dir: &Path) -> Result<PathBuf, DataError> {
    let first = TRAIN_BATCHES[0];
    let place = search_places(dir)
        .into_iter()
        .find(|p| p.join(first).is_file())
        .ok_or_else(|| DataError::Missing {
            dir: dir.to_path_buf(),
            file: first.into(),
            tried: vec![first.into()],
        })?;
    for name in TRAIN_BATCHES.iter().chain([&TEST_BATCH]) {
        if !place.join(name).is_file() {
            return Err(DataError::Missing {
                dir: place.clone(),
                file: (*name).into(),
                tried: vec![(*name).into()],
            });
        }
    }
    Ok(place)
}

fn empty() -> Dataset {
    Dataset {
        pixels: Vec::new(),
        labels: Vec::new(),
        features: PIXELS,
        shape: SHAPE,
        classes: CLASSES,
    }
}

/// Appends the records of one batch file to `out`.
pub fn read_batch(path: &Path, out: &mut Dataset) -> Result<(), DataError> {
    let bytes = read_file(path)?;
    let format_err = |reason: String| DataError::Format {
        path: path.to_path_buf(),
        format: "CIFAR-10 batch",
        reason,
    };
    if bytes.is_empty() {
        return Err(format_err("the file is empty".into()));
    }
    if !bytes.len().is_multiple_of(RECORD) {
        let whole = bytes.len() / RECORD;
        return Err(format_err(format!(
            "size {} bytes is not a multiple of the {RECORD}-byte record (1 label + {PIXELS} pixels): \
             {whole} whole records and {} bytes left over; expected {} or {} bytes",
            bytes.len(),
            bytes.len() % RECORD,
            whole * RECORD,
            (whole + 1) * RECORD,
        )));
    }
    let n = bytes.len() / RECORD;
    out.pixels.reserve(n * PIXELS);
    out.labels.reserve(n);
    for (i, record) in bytes.chunks_exact(RECORD).enumerate() {
        let label = record[0];
        if label as usize >= CLASSES {
            return Err(format_err(format!(
                "record {i} (byte offset {}) has label {label}, not below {CLASSES}",
                i * RECORD
            )));
        }
        out.labels.push(label);
        out.pixels.extend_from_slice(&record[1..]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DataSource;

    /// A record whose pixels encode (batch, record, position), so the test
    /// can tell where every byte ended up.
    fn record(label: u8, batch: u8, i: u8) -> Vec<u8> {
        let mut r = vec![label];
        r.extend((0..PIXELS).map(|p| batch.wrapping_mul(50) ^ i.wrapping_mul(7) ^ (p % 251) as u8));
        r
    }

    /// Writes six batches with `per` records each; train batch b holds labels
    /// (b + i) % 10. Returns the folder.
    fn write_batches(dir: &Path, per: u8) {
        for (b, name) in TRAIN_BATCHES.iter().enumerate() {
            let bytes: Vec<u8> = (0..per)
                .flat_map(|i| record((b as u8 + i) % 10, b as u8, i))
                .collect();
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        let test: Vec<u8> = (0..per).flat_map(|i| record(9 - i % 10, 9, i)).collect();
        std::fs::write(dir.join(TEST_BATCH), test).unwrap();
    }

    #[test]
    fn loads_batches_in_order_channel_major() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("cifar-10-batches-bin");
        std::fs::create_dir(&sub).unwrap();
        write_batches(&sub, 3);
        // The folder above the unpacked one works too.
        let s = DataSource::Cifar10 {
            dir: dir.path().into(),
        }
        .load()
        .unwrap();
        assert_eq!((s.train.len(), s.test.len()), (15, 3));
        assert_eq!(s.train.shape, [3, 32, 32]);
        assert_eq!(s.train.features, 3072);
        assert_eq!(s.train.classes, 10);
        assert_eq!(
            s.train.labels,
            [0, 1, 2, 1, 2, 3, 2, 3, 4, 3, 4, 5, 4, 5, 6]
        );
        assert_eq!(s.test.labels, [9, 8, 7]);
        // Sample 4 is batch 2's record 1: its bytes, unchanged.
        assert_eq!(s.train.sample(4), &record(0, 1, 1)[1..]);
        assert_eq!(s.test.sample(2), &record(0, 9, 2)[1..]);
        assert!(s.source.contains("cifar-10-batches-bin"), "{}", s.source);
    }

    #[test]
    fn missing_batch_is_named() {
        let dir = tempfile::tempdir().unwrap();
        write_batches(dir.path(), 2);
        std::fs::remove_file(dir.path().join("data_batch_4.bin")).unwrap();
        let e = load(dir.path()).unwrap_err();
        assert!(
            matches!(&e, DataError::Missing { file, .. } if file == "data_batch_4.bin"),
            "{e}"
        );
        let empty = tempfile::tempdir().unwrap();
        let msg = load(empty.path()).unwrap_err().to_string();
        assert!(msg.contains("data_batch_1.bin"), "{msg}");
        assert!(msg.contains(&empty.path().display().to_string()), "{msg}");
    }

    #[test]
    fn ragged_or_empty_file_names_sizes() {
        let dir = tempfile::tempdir().unwrap();
        write_batches(dir.path(), 2);
        let p = dir.path().join("data_batch_2.bin");
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.truncate(2 * RECORD - 10);
        std::fs::write(&p, &bytes).unwrap();
        let e = load(dir.path()).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, DataError::Format { .. }), "{msg}");
        assert!(msg.contains("data_batch_2.bin"), "{msg}");
        assert!(msg.contains("6136 bytes"), "{msg}");
        assert!(msg.contains("3073"), "{msg}");
        assert!(
            msg.contains("1 whole records and 3063 bytes left over"),
            "{msg}"
        );
        assert!(msg.contains("expected 3073 or 6146 bytes"), "{msg}");

        write_batches(dir.path(), 2);
        std::fs::write(dir.path().join(TEST_BATCH), b"").unwrap();
        let msg = load(dir.path()).unwrap_err().to_string();
        assert!(
            msg.contains("test_batch.bin") && msg.contains("empty"),
            "{msg}"
        );
    }

    #[test]
    fn bad_label_names_record() {
        let dir = tempfile::tempdir().unwrap();
        write_batches(dir.path(), 2);
        let p = dir.path().join(TEST_BATCH);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[RECORD] = 10;
        std::fs::write(&p, &bytes).unwrap();
        let msg = load(dir.path()).unwrap_err().to_string();
        assert!(
            msg.contains("test_batch.bin") && msg.contains("record 1") && msg.contains("label 10"),
            "{msg}"
        );
    }
}
