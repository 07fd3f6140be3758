//! Labelled image data: where a node's samples come from and how they are cut up.
//!
//! Design:
//! * Everything is held in memory as raw bytes ([`Dataset`]): Fashion-MNIST is
//!   47 MB unpacked, and the synthetic set is the same shape, so there is no
//!   reason to stream. Bytes (not floats) are kept because they are what the
//!   public-set digest is computed over, and they are 4× smaller.
//! * A [`DataSource`] is plain configuration (deserialized from the node's TOML);
//!   [`DataSource::load`] turns it into [`DataSplits`]. `auto` exists so that a
//!   fresh machine without the Debian `dataset-fashion-mnist` package still runs
//!   end to end, on [`synthetic`] data of the same shape.
//! * Every random choice (synthetic samples, partitions, public split, round
//!   subsets) is deterministic in an explicit seed, because federation members
//!   must agree on the public set and experiments must be repeatable.
//!
//! Submodules: [`idx`] reads and writes the IDX files Fashion-MNIST ships as,
//! [`synthetic`] generates a stand-in dataset, [`partition`] splits private
//! data among nodes (IID or Dirichlet label skew), [`public`] carves out the
//! public set and picks each round's subset of it.

pub mod idx;
pub mod partition;
pub mod public;
pub mod synthetic;

use std::path::{Path, PathBuf};

use fd_protocol::digest::sha256;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Side length of the square images every source produces.
pub const IMAGE_SIDE: usize = 28;
/// Pixels per image (`IMAGE_SIDE²`), the model's input width.
pub const IMAGE_PIXELS: usize = 784;
/// Number of classes in Fashion-MNIST and in the synthetic stand-in.
pub const CLASSES: usize = 10;

/// Where the Debian package `dataset-fashion-mnist` installs its files.
pub const DEFAULT_FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// In-memory labelled images: `pixels` is n × features bytes, row-major, 0..=255.
/// Each sample is laid out channel-major as `shape` = [channels, height, width]
/// (tabular data: [1, 1, features]); `features` is their product.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub pixels: Vec<u8>,
    pub labels: Vec<u8>,
    pub features: usize,
    pub shape: [usize; 3],
    pub classes: usize,
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The pixel bytes of sample `i`. Panics if `i` is out of range, like slice indexing.
    pub fn sample(&self, i: usize) -> &[u8] {
        &self.pixels[i * self.features..(i + 1) * self.features]
    }

    /// A new dataset holding the given rows, in that order.
    pub fn select(&self, indices: &[usize]) -> Dataset {
        let mut pixels = Vec::with_capacity(indices.len() * self.features);
        for &i in indices {
            pixels.extend_from_slice(self.sample(i));
        }
        Dataset {
            pixels,
            labels: self.labels_of(indices),
            features: self.features,
            shape: self.shape,
            classes: self.classes,
        }
    }

    /// Pixels of the given rows scaled to f32 in [0, 1] (x / 255), row-major,
    /// `indices.len() × features`. No mean/std normalisation: the model owns
    /// any further preprocessing, and [0, 1] is what the synthetic generator
    /// and Fashion-MNIST have in common.
    pub fn features_f32(&self, indices: &[usize]) -> Vec<f32> {
        let mut out = Vec::with_capacity(indices.len() * self.features);
        for &i in indices {
            out.extend(self.sample(i).iter().map(|&b| f32::from(b) / 255.0));
        }
        out
    }

    /// Labels of the given rows, in that order.
    pub fn labels_of(&self, indices: &[usize]) -> Vec<u8> {
        indices.iter().map(|&i| self.labels[i]).collect()
    }

    /// Count of samples per class (length = `classes`).
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0usize; self.classes];
        for &l in &self.labels {
            // Labels are validated on load; a stray one is counted nowhere rather than panicking.
            if let Some(c) = counts.get_mut(l as usize) {
                *c += 1;
            }
        }
        counts
    }
}

/// Train and test splits of one source.
#[derive(Clone, Debug)]
pub struct DataSplits {
    pub train: Dataset,
    pub test: Dataset,
    /// Human-readable origin, e.g. `fashion-mnist (/usr/share/datasets/fashion-mnist)`
    /// or `synthetic (seed 7)`, for logs and reports.
    pub source: String,
}

fn default_fashion_dir() -> PathBuf {
    PathBuf::from(DEFAULT_FASHION_MNIST_DIR)
}
fn default_synthetic_seed() -> u64 {
    7
}
fn default_synthetic_train() -> usize {
    12_000
}
fn default_synthetic_test() -> usize {
    2_000
}

/// Where a node's data comes from. Deserialized from TOML like
///
/// ```toml
/// [data]
/// kind = "fashion-mnist"
/// dir = "/usr/share/datasets/fashion-mnist"
/// ```
/// ```toml
/// [data]
/// kind = "synthetic"
/// seed = 7
/// train = 12000
/// test = 2000
/// ```
/// or `kind = "auto"`: Fashion-MNIST from [`DEFAULT_FASHION_MNIST_DIR`] if its
/// files exist there, otherwise synthetic data with the defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DataSource {
    FashionMnist {
        #[serde(default = "default_fashion_dir")]
        dir: PathBuf,
    },
    Synthetic {
        #[serde(default = "default_synthetic_seed")]
        seed: u64,
        #[serde(default = "default_synthetic_train")]
        train: usize,
        #[serde(default = "default_synthetic_test")]
        test: usize,
    },
    #[default]
    Auto,
}

impl DataSource {
    /// Synthetic data with the default seed and sizes.
    pub fn default_synthetic() -> DataSource {
        DataSource::Synthetic {
            seed: default_synthetic_seed(),
            train: default_synthetic_train(),
            test: default_synthetic_test(),
        }
    }

    /// Replaces `Auto` by the concrete source it stands for on this machine;
    /// other sources are returned unchanged. Done separately from `load` so a
    /// node can log (and a coordinator can record) what was actually used.
    pub fn resolve(&self) -> DataSource {
        match self {
            DataSource::Auto => {
                let dir = default_fashion_dir();
                if FashionFiles::locate(&dir).is_ok() {
                    DataSource::FashionMnist { dir }
                } else {
                    DataSource::default_synthetic()
                }
            }
            other => other.clone(),
        }
    }

    /// Loads (or generates) the train and test splits.
    pub fn load(&self) -> Result<DataSplits, DataError> {
        match self.resolve() {
            DataSource::FashionMnist { dir } => load_fashion_mnist(&dir),
            DataSource::Synthetic { seed, train, test } => {
                if train == 0 {
                    return Err(DataError::Config {
                        field: "train",
                        reason: "synthetic train size must be at least 1".into(),
                    });
                }
                if test == 0 {
                    return Err(DataError::Config {
                        field: "test",
                        reason: "synthetic test size must be at least 1".into(),
                    });
                }
                Ok(synthetic::generate(seed, train, test))
            }
            DataSource::Auto => unreachable!("resolve() never returns Auto"),
        }
    }
}

/// Errors while loading, generating or splitting data. Each names the file
/// (or configuration field) and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid IDX file: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("image count {images} in {images_path} != label count {labels} in {labels_path}")]
    Mismatch {
        images: usize,
        images_path: PathBuf,
        labels: usize,
        labels_path: PathBuf,
    },
    #[error("no {file} (nor {file}.gz) found in {dir} or its subfolders")]
    Missing { dir: PathBuf, file: String },
    #[error("invalid data setting `{field}`: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("cannot partition the data: {reason}")]
    Partition { reason: String },
}

/// The four Fashion-MNIST files, as found on disk.
#[derive(Debug)]
struct FashionFiles {
    train_images: PathBuf,
    train_labels: PathBuf,
    test_images: PathBuf,
    test_labels: PathBuf,
}

impl FashionFiles {
    /// Finds the files under `dir`. The Debian package puts the four `.gz`
    /// files directly in the directory, but hand-made copies often sit in a
    /// subfolder (`fashion/`, `raw/`, ...), are already unpacked, or use the
    /// `train-images.idx3-ubyte` spelling, so all of those are accepted.
    fn locate(dir: &Path) -> Result<FashionFiles, DataError> {
        Ok(FashionFiles {
            train_images: find_idx_file(dir, "train-images-idx3-ubyte")?,
            train_labels: find_idx_file(dir, "train-labels-idx1-ubyte")?,
            test_images: find_idx_file(dir, "t10k-images-idx3-ubyte")?,
            test_labels: find_idx_file(dir, "t10k-labels-idx1-ubyte")?,
        })
    }
}

/// Looks for `name` in `dir`, then in each immediate subfolder (sorted, so the
/// choice is stable); in each place `.gz` first, then raw, then the
/// dot-spelling (`train-images.idx3-ubyte`) in both forms.
fn find_idx_file(dir: &Path, name: &str) -> Result<PathBuf, DataError> {
    let dotted = name.replacen("-idx", ".idx", 1);
    let candidates = [
        format!("{name}.gz"),
        name.to_string(),
        format!("{dotted}.gz"),
        dotted,
    ];
    let mut places = vec![dir.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut subdirs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        subdirs.sort();
        places.extend(subdirs);
    }
    for place in &places {
        for candidate in &candidates {
            let path = place.join(candidate);
            if path.is_file() {
                return Ok(path);
            }
        }
    }
    Err(DataError::Missing {
        dir: dir.to_path_buf(),
        file: name.to_string(),
    })
}

fn load_fashion_mnist(dir: &Path) -> Result<DataSplits, DataError> {
    let files = FashionFiles::locate(dir)?;
    let train = load_idx_pair(&files.train_images, &files.train_labels)?;
    let test = load_idx_pair(&files.test_images, &files.test_labels)?;
    tracing::debug!(
        train = train.len(),
        test = test.len(),
        dir = %dir.display(),
        "loaded fashion-mnist"
    );
    Ok(DataSplits {
        train,
        test,
        source: format!("fashion-mnist ({})", dir.display()),
    })
}

/// Reads one images file and its labels file and checks they belong together.
fn load_idx_pair(images_path: &Path, labels_path: &Path) -> Result<Dataset, DataError> {
    let (n, rows, cols, pixels) = idx::read_images(images_path)?;
    // The rest of the node (model input width, synthetic fallback) assumes 28×28.
    if rows != IMAGE_SIDE || cols != IMAGE_SIDE {
        return Err(DataError::Format {
            path: images_path.to_path_buf(),
            reason: format!("images are {rows}×{cols}, expected {IMAGE_SIDE}×{IMAGE_SIDE}"),
        });
    }
    let labels = idx::read_labels(labels_path)?;
    if labels.len() != n {
        return Err(DataError::Mismatch {
            images: n,
            images_path: images_path.to_path_buf(),
            labels: labels.len(),
            labels_path: labels_path.to_path_buf(),
        });
    }
    if let Some((i, &l)) = labels
        .iter()
        .enumerate()
        .find(|&(_, &l)| l as usize >= CLASSES)
    {
        return Err(DataError::Format {
            path: labels_path.to_path_buf(),
            reason: format!("label {l} at position {i} is not below {CLASSES}"),
        });
    }
    Ok(Dataset {
        pixels,
        labels,
        features: IMAGE_PIXELS,
        shape: [1, IMAGE_SIDE, IMAGE_SIDE],
        classes: CLASSES,
    })
}

/// A ChaCha8 generator for one purpose, seeded from SHA-256 of a domain tag and
/// the given numbers. Separate domains keep e.g. the public split and the
/// partition independent even when a user gives both the same seed, and the
/// derivation is portable, which matters for choices peers must agree on.
pub(crate) fn derived_rng(domain: &str, parts: &[u64]) -> ChaCha8Rng {
    let mut bytes = Vec::with_capacity(domain.len() + 1 + 8 * parts.len());
    bytes.extend_from_slice(domain.as_bytes());
    bytes.push(0);
    for p in parts {
        bytes.extend_from_slice(&p.to_le_bytes());
    }
    ChaCha8Rng::from_seed(sha256(&bytes).0)
}

/// Fisher–Yates shuffle drawing `u64`s, so the permutation does not depend on
/// the platform's `usize` width (peers on different machines must agree).
pub(crate) fn portable_shuffle<T>(items: &mut [T], rng: &mut ChaCha8Rng) {
    use rand::Rng;
    for i in (1..items.len()).rev() {
        let j = rng.random_range(0..=i as u64) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Dataset {
        Dataset {
            pixels: vec![0, 255, 10, 20, 30, 40],
            labels: vec![2, 0, 2],
            features: 2,
            shape: [1, 1, 2],
            classes: 3,
        }
    }

    #[test]
    fn dataset_accessors() {
        let d = tiny();
        assert_eq!(d.len(), 3);
        assert!(!d.is_empty());
        assert_eq!(d.sample(1), &[10, 20]);
        let s = d.select(&[2, 0]);
        assert_eq!(s.pixels, vec![30, 40, 0, 255]);
        assert_eq!(s.labels, vec![2, 2]);
        assert_eq!(d.features_f32(&[0]), vec![0.0, 1.0]);
        assert_eq!(d.labels_of(&[1, 1]), vec![0, 0]);
        assert_eq!(d.class_counts(), vec![1, 0, 2]);
    }

    #[test]
    fn data_source_from_toml() {
        #[derive(Deserialize)]
        struct Cfg {
            data: DataSource,
        }
        let c: Cfg = toml::from_str("[data]\nkind = \"fashion-mnist\"\ndir = \"/x\"\n").unwrap();
        assert_eq!(c.data, DataSource::FashionMnist { dir: "/x".into() });
        let c: Cfg = toml::from_str("[data]\nkind = \"fashion-mnist\"\n").unwrap();
        assert_eq!(
            c.data,
            DataSource::FashionMnist {
                dir: DEFAULT_FASHION_MNIST_DIR.into()
            }
        );
        let c: Cfg =
            toml::from_str("[data]\nkind = \"synthetic\"\nseed = 3\ntrain = 100\n").unwrap();
        assert_eq!(
            c.data,
            DataSource::Synthetic {
                seed: 3,
                train: 100,
                test: 2000
            }
        );
        let c: Cfg = toml::from_str("[data]\nkind = \"synthetic\"\n").unwrap();
        assert_eq!(c.data, DataSource::default_synthetic());
        let c: Cfg = toml::from_str("[data]\nkind = \"auto\"\n").unwrap();
        assert_eq!(c.data, DataSource::Auto);
        assert!(toml::from_str::<Cfg>("[data]\nkind = \"synthetic\"\nsed = 3\n").is_err());
        assert!(toml::from_str::<Cfg>("[data]\nkind = \"cifar\"\n").is_err());
        assert_eq!(DataSource::default(), DataSource::Auto);
    }

    #[test]
    fn auto_resolves_to_something_concrete() {
        let r = DataSource::Auto.resolve();
        assert_ne!(r, DataSource::Auto);
        let present = Path::new(DEFAULT_FASHION_MNIST_DIR)
            .join("train-images-idx3-ubyte.gz")
            .exists();
        if present {
            assert!(matches!(r, DataSource::FashionMnist { .. }));
        }
    }

    #[test]
    fn synthetic_source_loads_and_rejects_empty() {
        let s = DataSource::Synthetic {
            seed: 1,
            train: 50,
            test: 20,
        }
        .load()
        .unwrap();
        assert_eq!((s.train.len(), s.test.len()), (50, 20));
        assert_eq!(s.source, "synthetic (seed 1)");
        let e = DataSource::Synthetic {
            seed: 1,
            train: 0,
            test: 20,
        }
        .load()
        .unwrap_err();
        assert!(matches!(e, DataError::Config { field: "train", .. }), "{e}");
    }

    #[test]
    fn missing_fashion_dir_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let e = DataSource::FashionMnist {
            dir: dir.path().into(),
        }
        .load()
        .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, DataError::Missing { .. }));
        assert!(msg.contains("train-images-idx3-ubyte"), "{msg}");
    }

    /// Loads the real Fashion-MNIST when the Debian package is installed.
    #[test]
    fn real_fashion_mnist_loads() {
        // The README's test command and .ci/run install the Debian package.
        let dir = Path::new(DEFAULT_FASHION_MNIST_DIR);
        if let Err(e) = FashionFiles::locate(dir) {
            panic!("{e}: install the Debian package dataset-fashion-mnist");
        }
        let s = DataSource::FashionMnist { dir: dir.into() }.load().unwrap();
        assert_eq!(s.train.len(), 60_000);
        assert_eq!(s.test.len(), 10_000);
        assert_eq!(s.train.pixels.len(), 60_000 * IMAGE_PIXELS);
        assert_eq!(s.train.class_counts(), vec![6000; 10]);
        assert_eq!(s.test.class_counts(), vec![1000; 10]);
    }
}
