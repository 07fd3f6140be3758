//! Reader and writer for the IDX format Fashion-MNIST and MNIST ship in.
//!
//! An IDX file is a 4-byte magic (two zero bytes, a type code — 0x08 for
//! unsigned bytes — and the number of dimensions), one big-endian `u32` per
//! dimension, then the data. Images are `0x00000803` (n × rows × cols), labels
//! `0x00000801` (n).
//!
//! Files are read whole into memory (60 000 images are 47 MB) and gzip is
//! detected by its magic bytes `1f 8b`, not by the file name, because
//! downloads are routinely unpacked by browsers while keeping `.gz` (or the
//! reverse). The byte count is checked against the header so that a truncated
//! download fails loudly here instead of silently yielding fewer samples.
//! Writing is always raw (uncompressed); it is used by tests and for exports.

use std::io::{Read, Write};
use std::path::Path;

use super::DataError;

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

/// Reads an IDX3 image file: returns `(n, rows, cols, pixels)` with
/// `pixels.len() == n * rows * cols`, row-major.
pub fn read_images(path: &Path) -> Result<(usize, usize, usize, Vec<u8>), DataError> {
    let mut bytes = read_maybe_gzipped(path)?;
    let header = parse_header(path, &bytes, IMAGES_MAGIC, 3, "images (idx3)")?;
    let (n, rows, cols) = (header[0], header[1], header[2]);
    let offset = 4 + 4 * 3;
    let body = n
        .checked_mul(rows)
        .and_then(|x| x.checked_mul(cols))
        .ok_or_else(|| format_err(path, format!("header size {n}×{rows}×{cols} overflows")))?;
    check_length(path, bytes.len(), offset, body)?;
    bytes.drain(..offset);
    Ok((n, rows, cols, bytes))
}

/// Reads an IDX1 label file.
pub fn read_labels(path: &Path) -> Result<Vec<u8>, DataError> {
    let mut bytes = read_maybe_gzipped(path)?;
    let header = parse_header(path, &bytes, LABELS_MAGIC, 1, "labels (idx1)")?;
    let n = header[0];
    let offset = 4 + 4;
    check_length(path, bytes.len(), offset, n)?;
    bytes.drain(..offset);
    Ok(bytes)
}

/// Writes raw (uncompressed) IDX3 images; `pixels.len()` must be a multiple of `rows * cols`.
pub fn write_images(path: &Path, rows: usize, cols: usize, pixels: &[u8]) -> Result<(), DataError> {
    let per = rows * cols;
    if per == 0 || !pixels.len().is_multiple_of(per) {
        return Err(format_err(
            path,
            format!(
                "{} pixel bytes are not a whole number of {rows}×{cols} images",
                pixels.len()
            ),
        ));
    }
    let n = pixels.len() / per;
    let dims = [n, rows, cols]
        .map(|d| to_u32(path, d))
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    write_idx(path, IMAGES_MAGIC, &dims, pixels)
}

/// Writes a raw (uncompressed) IDX1 label file.
pub fn write_labels(path: &Path, labels: &[u8]) -> Result<(), DataError> {
    let n = to_u32(path, labels.len())?;
    write_idx(path, LABELS_MAGIC, &[n], labels)
}

fn format_err(path: &Path, reason: String) -> DataError {
    DataError::Format {
        path: path.to_path_buf(),
        format: "IDX",
        reason,
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn to_u32(path: &Path, d: usize) -> Result<u32, DataError> {
    u32::try_from(d)
        .map_err(|_| format_err(path, format!("dimension {d} does not fit in IDX's u32")))
}

fn read_maybe_gzipped(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(io_err(path))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        // MultiGzDecoder: some tools write concatenated gzip members.
        flate2::read::MultiGzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| format_err(path, format!("corrupt or truncated gzip stream: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Checks the magic and returns the `dims` dimension sizes.
fn parse_header(
    path: &Path,
    bytes: &[u8],
    magic: u32,
    dims: usize,
    what: &str,
) -> Result<Vec<usize>, DataError> {
    let header_len = 4 + 4 * dims;
    let word = |i: usize| u32::from_be_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
    // Magic first: "this is a labels file, not images" is the more useful message.
    if bytes.len() >= 4 && word(0) != magic {
        let found = word(0);
        return Err(format_err(
            path,
            format!("magic number {found:#010x}, expected {magic:#010x} for {what}"),
        ));
    }
    if bytes.len() < header_len {
        return Err(format_err(
            path,
            format!(
                "only {} bytes, shorter than the {header_len}-byte {what} header",
                bytes.len()
            ),
        ));
    }
    Ok((1..=dims).map(|i| word(i) as usize).collect())
}

fn check_length(path: &Path, actual: usize, offset: usize, body: usize) -> Result<(), DataError> {
    let expected = offset + body;
    if actual < expected {
        return Err(format_err(
            path,
            format!("truncated: header promises {expected} bytes, file has {actual}"),
        ));
    }
    if actual > expected {
        return Err(format_err(
            path,
            format!(
                "{} trailing bytes: header promises {expected} bytes, file has {actual}",
                actual - expected
            ),
        ));
    }
    Ok(())
}

fn write_idx(path: &Path, magic: u32, dims: &[u32], body: &[u8]) -> Result<(), DataError> {
    let mut out = Vec::with_capacity(4 + 4 * dims.len() + body.len());
    out.extend_from_slice(&magic.to_be_bytes());
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(body);
    let mut file = std::fs::File::create(path).map_err(io_err(path))?;
    file.write_all(&out).map_err(io_err(path))?;
    file.flush().map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DataSource, IMAGE_PIXELS};
    use flate2::{Compression, write::GzEncoder};
    use std::path::PathBuf;

    fn gzip_file(raw: &Path, gz: &Path) {
        let data = std::fs::read(raw).unwrap();
        let mut enc = GzEncoder::new(Vec::new(), Compression::default());
        enc.write_all(&data).unwrap();
        std::fs::write(gz, enc.finish().unwrap()).unwrap();
    }

    #[test]
    fn round_trip_raw_and_gz() {
        let dir = tempfile::tempdir().unwrap();
        let pixels: Vec<u8> = (0..3 * 4 * 5).map(|i| (i * 7) as u8).collect();
        let labels = vec![3u8, 1, 4];
        let ip = dir.path().join("img");
        let lp = dir.path().join("lab");
        write_images(&ip, 4, 5, &pixels).unwrap();
        write_labels(&lp, &labels).unwrap();
        assert_eq!(read_images(&ip).unwrap(), (3, 4, 5, pixels.clone()));
        assert_eq!(read_labels(&lp).unwrap(), labels);

        // Named without .gz on purpose: detection is by magic bytes.
        let igz = dir.path().join("img-compressed");
        let lgz = dir.path().join("lab.gz");
        gzip_file(&ip, &igz);
        gzip_file(&lp, &lgz);
        assert_eq!(read_images(&igz).unwrap(), (3, 4, 5, pixels));
        assert_eq!(read_labels(&lgz).unwrap(), labels);
    }

    #[test]
    fn truncated_file_names_path_and_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let ip = dir.path().join("train-images-idx3-ubyte");
        write_images(&ip, 2, 2, &[1u8; 12]).unwrap();
        let full = std::fs::read(&ip).unwrap();
        std::fs::write(&ip, &full[..full.len() - 5]).unwrap();
        let e = read_images(&ip).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, DataError::Format { .. }));
        assert!(msg.contains(&ip.display().to_string()), "{msg}");
        assert!(msg.contains("28") && msg.contains("23"), "{msg}");

        // A truncated gzip stream is a format error too, naming the file.
        let gz = dir.path().join("labels.gz");
        write_labels(&ip, &[1u8; 100]).unwrap();
        gzip_file(&ip, &gz);
        let data = std::fs::read(&gz).unwrap();
        std::fs::write(&gz, &data[..data.len() / 2]).unwrap();
        let msg = read_labels(&gz).unwrap_err().to_string();
        assert!(msg.contains("labels.gz"), "{msg}");
    }

    #[test]
    fn wrong_magic_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let lp = dir.path().join("labels");
        write_labels(&lp, &[1, 2, 3]).unwrap();
        let msg = read_images(&lp).unwrap_err().to_string();
        assert!(msg.contains("magic") && msg.contains("labels"), "{msg}");
        let e = read_labels(&dir.path().join("absent")).unwrap_err();
        assert!(matches!(e, DataError::Io { .. }));
        assert!(e.to_string().contains("absent"));
    }

    fn write_fake_fashion(dir: &Path, train: usize, train_labels: usize, gz: bool) -> PathBuf {
        let put = |name: &str, n_img: usize, n_lab: usize| {
            let ip = dir.join(format!("{name}-images-idx3-ubyte"));
            let lp = dir.join(format!("{name}-labels-idx1-ubyte"));
            let pixels: Vec<u8> = (0..n_img * IMAGE_PIXELS).map(|i| (i % 251) as u8).collect();
            write_images(&ip, 28, 28, &pixels).unwrap();
            write_labels(&lp, &(0..n_lab).map(|i| (i % 10) as u8).collect::<Vec<_>>()).unwrap();
            if gz {
                for p in [&ip, &lp] {
                    gzip_file(p, &PathBuf::from(format!("{}.gz", p.display())));
                    std::fs::remove_file(p).unwrap();
                }
            }
        };
        put("train", train, train_labels);
        put("t10k", 4, 4);
        dir.to_path_buf()
    }

    #[test]
    fn fake_fashion_loads_raw_and_gz_and_in_subfolder() {
        let dir = tempfile::tempdir().unwrap();
        write_fake_fashion(dir.path(), 12, 12, false);
        let s = DataSource::FashionMnist {
            dir: dir.path().into(),
        }
        .load()
        .unwrap();
        assert_eq!((s.train.len(), s.test.len()), (12, 4));
        assert_eq!(s.train.labels[..3], [0, 1, 2]);

        let dir2 = tempfile::tempdir().unwrap();
        let sub = dir2.path().join("fashion");
        std::fs::create_dir(&sub).unwrap();
        write_fake_fashion(&sub, 12, 12, true);
        let s2 = DataSource::FashionMnist {
            dir: dir2.path().into(),
        }
        .load()
        .unwrap();
        assert_eq!(s.train, s2.train);
        assert_eq!(s.test, s2.test);
    }

    #[test]
    fn mnist_reads_the_same_files_any_image_size() {
        let dir = tempfile::tempdir().unwrap();
        write_fake_fashion(dir.path(), 6, 6, true);
        let m = DataSource::Mnist {
            dir: dir.path().into(),
        }
        .load()
        .unwrap();
        let f = DataSource::FashionMnist {
            dir: dir.path().into(),
        }
        .load()
        .unwrap();
        assert_eq!((m.train.clone(), m.test.clone()), (f.train, f.test));
        assert!(m.source.starts_with("mnist ("), "{}", m.source);
        assert_eq!((m.train.shape, m.train.features), ([1, 28, 28], 784));

        // Other image sizes load (models reshape by `shape`) if train and test agree.
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_images(&d.join("train-images-idx3-ubyte"), 2, 3, &[7; 12]).unwrap();
        write_labels(&d.join("train-labels-idx1-ubyte"), &[1, 2]).unwrap();
        write_images(&d.join("t10k-images-idx3-ubyte"), 2, 3, &[9; 6]).unwrap();
        write_labels(&d.join("t10k-labels-idx1-ubyte"), &[3]).unwrap();
        let s = DataSource::Mnist { dir: d.into() }.load().unwrap();
        assert_eq!((s.train.shape, s.train.features), ([1, 2, 3], 6));
        assert_eq!((s.train.len(), s.test.len(), s.test.classes), (2, 1, 10));
    }

    #[test]
    fn image_label_count_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        write_fake_fashion(dir.path(), 12, 11, true);
        let e = DataSource::FashionMnist {
            dir: dir.path().into(),
        }
        .load()
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(
                e,
                DataError::Mismatch {
                    images: 12,
                    labels: 11,
                    ..
                }
            ),
            "{msg}"
        );
        assert!(
            msg.contains("image count 12") && msg.contains("label count 11"),
            "{msg}"
        );
        assert!(msg.contains("train-images-idx3-ubyte.gz"), "{msg}");
        assert!(msg.contains("train-labels-idx1-ubyte.gz"), "{msg}");
    }

    #[test]
    fn wrong_image_size_and_bad_label_rejected() {
        let dir = tempfile::tempdir().unwrap();
        write_fake_fashion(dir.path(), 2, 2, false);
        write_images(&dir.path().join("t10k-images-idx3-ubyte"), 2, 2, &[0; 8]).unwrap();
        let msg = DataSource::FashionMnist {
            dir: dir.path().into(),
        }
        .load()
        .unwrap_err()
        .to_string();
        assert!(msg.contains("2×2") && msg.contains("t10k-images"), "{msg}");

        let dir = tempfile::tempdir().unwrap();
        write_fake_fashion(dir.path(), 2, 2, false);
        write_labels(&dir.path().join("train-labels-idx1-ubyte"), &[0, 10]).unwrap();
        let msg = DataSource::FashionMnist {
            dir: dir.path().into(),
        }
        .load()
        .unwrap_err()
        .to_string();
        assert!(
            msg.contains("label 10") && msg.contains("train-labels"),
            "{msg}"
        );
    }
}
