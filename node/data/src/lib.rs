//! # fd-data
//!
//! Labelled data: where a node's samples come from and how they are cut up.
//! The bottom layer of a member beside `fd-protocol`: no networking, no ML,
//! so the coordinator (which only digests the public set) links it without
//! burn. Also home of [`fsutil`], the one atomic file write every crate uses.
//!
//! Design:
//! * Everything is held in memory as raw bytes ([`Dataset`]): Fashion-MNIST is
//!   47 MB unpacked, CIFAR-10 150 MB, and the synthetic set is MNIST-shaped,
//!   so there is no reason to stream. Bytes (not floats) are kept because they
//!   are what the public-set digest is computed over, and they are 4× smaller.
//!   Sources whose values are floats (CSV, NPY) must hold them in [0, 1]; they
//!   are quantised to bytes (`round(x · 255)`), so anything finer than 1/255
//!   is lost. That is the price of one sample representation (and one digest
//!   definition) for every source.
//! * A [`DataSource`] is plain configuration (deserialized from the node's TOML);
//!   [`DataSource::load`] turns it into [`DataSplits`]. `auto` exists so that a
//!   fresh machine without the Debian `dataset-fashion-mnist` package still runs
//!   end to end, on [`synthetic`] data of the same shape.
//! * Every sample carries its layout in [`Dataset::shape`] (channels, height,
//!   width), so models can reshape flat samples; tabular data is `[1, 1, f]`.
//! * Every random choice (synthetic samples, partitions, public split, round
//!   subsets) is deterministic in an explicit seed, because federation members
//!   must agree on the public set and experiments must be repeatable.
//! * Errors ([`DataError`]) name the file and the field, line or sample at
//!   fault: a member that cannot load its data stops before it joins, and
//!   its operator should not have to guess why.
//!
//! Submodules: [`idx`] reads and writes the IDX files (Fashion-)MNIST ship as,
//! [`cifar`] reads CIFAR-10 binary batches, [`csv`] and [`npy`] read users'
//! own numeric tables and NumPy arrays, [`synthetic`] generates a stand-in
//! dataset, [`partition`] splits private data among nodes (IID, Dirichlet
//! label skew, label shards, quantity skew), [`heatmap`] draws who holds
//! which labels, [`public`] carves out the public set, pins it in a
//! [`public::PublicSetManifest`] and picks each round's subset of it.

pub mod cifar;
pub mod csv;
pub mod fsutil;
pub mod heatmap;
pub mod idx;
pub mod npy;
pub mod partition;
pub mod public;
pub mod synthetic;

use std::path::{Path, PathBuf};

use fd_protocol::digest::{Digest, sha256};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Side length of the square images of (Fashion-)MNIST and the synthetic set.
pub const IMAGE_SIDE: usize = 28;
/// Pixels per such image (`IMAGE_SIDE²`).
pub const IMAGE_PIXELS: usize = 784;
/// Number of classes in (Fashion-)MNIST, CIFAR-10 and the synthetic stand-in.
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

/// Which column of a CSV file holds the label: its header name, or its
/// 0-based position. TOML: `label_column = "label"` or `label_column = 0`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LabelColumn {
    Index(usize),
    Name(String),
}

impl Default for LabelColumn {
    fn default() -> Self {
        LabelColumn::Name("label".into())
    }
}

/// How the feature values of a CSV file are to be read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CsvValues {
    /// `unit` if any feature value in either file is written with a decimal
    /// point or an exponent, `bytes` otherwise.
    #[default]
    Auto,
    /// Integers 0..=255, stored as they are.
    Bytes,
    /// Reals in [0, 1], quantised to `round(x · 255)`.
    Unit,
}

/// Where a node's data comes from. Deserialized from TOML (the `[data]` table):
///
/// ```toml
/// kind = "fashion-mnist"                    # IDX files, gz or raw
/// dir = "/usr/share/datasets/fashion-mnist" # the default
/// ```
/// ```toml
/// kind = "mnist"                            # same IDX files as Fashion-MNIST
/// dir = "data/mnist"                        # required
/// ```
/// ```toml
/// kind = "cifar10"                          # data_batch_1..5.bin, test_batch.bin
/// dir = "data/cifar-10-batches-bin"         # required (or the folder above it)
/// ```
/// ```toml
/// kind = "csv"
/// train = "train.csv"
/// test = "test.csv"
/// label_column = "label"                    # header name (default) or 0-based index
/// values = "auto"                           # auto | bytes (0..=255) | unit ([0,1])
/// classes = 3                               # optional; default max label + 1
/// ```
/// ```toml
/// kind = "npy"                              # NumPy .npy v1/v2/v3
/// train_x = "x_train.npy"                   # uint8, or float32/float64 in [0,1]: (n, f), (n, h, w) or (n, c, h, w)
/// train_y = "y_train.npy"                   # any integer dtype, values 0..=255: (n,) or (n, 1)
/// test_x = "x_test.npy"
/// test_y = "y_test.npy"
/// classes = 10                              # optional; default max label + 1
/// ```
/// ```toml
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
    /// Handwritten digits in the same IDX format and file names as Fashion-MNIST.
    Mnist {
        dir: PathBuf,
    },
    Cifar10 {
        dir: PathBuf,
    },
    Csv {
        train: PathBuf,
        test: PathBuf,
        #[serde(default)]
        label_column: LabelColumn,
        #[serde(default)]
        values: CsvValues,
        #[serde(default)]
        classes: Option<usize>,
    },
    Npy {
        train_x: PathBuf,
        train_y: PathBuf,
        test_x: PathBuf,
        test_y: PathBuf,
        #[serde(default)]
        classes: Option<usize>,
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
                if IdxFiles::locate(&dir).is_ok() {
                    DataSource::FashionMnist { dir }
                } else {
                    DataSource::default_synthetic()
                }
            }
            other => other.clone(),
        }
    }

    /// Makes every relative path of this source relative to `base` (a config
    /// file's folder), so configs can be moved together with their data.
    pub fn rebase(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        match self {
            DataSource::FashionMnist { dir }
            | DataSource::Mnist { dir }
            | DataSource::Cifar10 { dir } => fix(dir),
            DataSource::Csv { train, test, .. } => {
                fix(train);
                fix(test);
            }
            DataSource::Npy {
                train_x,
                train_y,
                test_x,
                test_y,
                ..
            } => [train_x, train_y, test_x, test_y].into_iter().for_each(fix),
            DataSource::Synthetic { .. } | DataSource::Auto => {}
        }
    }

    /// Loads (or generates) the train and test splits.
    pub fn load(&self) -> Result<DataSplits, DataError> {
        match self.resolve() {
            DataSource::FashionMnist { dir } => load_idx_dir(&dir, "fashion-mnist"),
            DataSource::Mnist { dir } => load_idx_dir(&dir, "mnist"),
            DataSource::Cifar10 { dir } => cifar::load(&dir),
            DataSource::Csv {
                train,
                test,
                label_column,
                values,
                classes,
            } => csv::load(&train, &test, &label_column, values, classes),
            DataSource::Npy {
                train_x,
                train_y,
                test_x,
                test_y,
                classes,
            } => npy::load(&train_x, &train_y, &test_x, &test_y, classes),
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

/// Errors while loading, generating, splitting or drawing data. Each names the
/// file (or configuration field, line, sample) and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid {format} file: {reason}")]
    Format {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    #[error("image count {images} in {images_path} != label count {labels} in {labels_path}")]
    Mismatch {
        images: usize,
        images_path: PathBuf,
        labels: usize,
        labels_path: PathBuf,
    },
    #[error("{train} and {test} do not match: {reason}")]
    TrainTest {
        train: PathBuf,
        test: PathBuf,
        reason: String,
    },
    #[error("no {file} found under {dir} (looked for {})", tried.join(", "))]
    Missing {
        dir: PathBuf,
        file: String,
        tried: Vec<String>,
    },
    #[error("{path}, line {line}, column {column}: {reason}")]
    Csv {
        path: PathBuf,
        line: usize,
        /// 0-based index, with the header name when there is one: `3 ("x3")`.
        column: String,
        reason: String,
    },
    #[error("{path}, {position}: {reason}")]
    Value {
        path: PathBuf,
        /// Which element, e.g. `sample 4, element 17` or `label 4`.
        position: String,
        reason: String,
    },
    #[error("invalid data setting `{field}`: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("cannot partition the data: {reason}")]
    Partition { reason: String },
    #[error(
        "public set digest mismatch: expected {expected}, computed {computed} over {samples} samples from {source_name}"
    )]
    PublicSetMismatch {
        expected: Digest,
        computed: Digest,
        samples: usize,
        source_name: String,
    },
    #[error("cannot draw {path}: {reason}")]
    Plot { path: PathBuf, reason: String },
}

/// Checks a loader's labels against a declared class count, or derives the
/// count as max label + 1 over train and test. `declared` must be 1..=256
/// (labels are bytes). The first label not below it is reported by
/// `out_of_range(split, i, label, classes)`, with `split` 0 for train and 1
/// for test, so each loader can name the file and line or position.
pub(crate) fn class_count(
    declared: Option<usize>,
    train: &[u8],
    test: &[u8],
    out_of_range: impl Fn(usize, usize, u8, usize) -> DataError,
) -> Result<usize, DataError> {
    match declared {
        Some(c) if !(1..=256).contains(&c) => Err(DataError::Config {
            field: "classes",
            reason: format!("must be between 1 and 256 (labels are bytes), got {c}"),
        }),
        Some(c) => {
            for (split, labels) in [train, test].into_iter().enumerate() {
                if let Some((i, &l)) = labels.iter().enumerate().find(|&(_, &l)| l as usize >= c) {
                    return Err(out_of_range(split, i, l, c));
                }
            }
            Ok(c)
        }
        None => Ok(train
            .iter()
            .chain(test)
            .copied()
            .max()
            .map_or(1, |m| m as usize + 1)),
    }
}

/// A real value in [0, 1] as the byte `round(x · 255)`; `None` outside that
/// range or for NaN (no clamping: a feature at 3.7 means the user's data is
/// not what they think it is, and silently saturating would hide that).
pub(crate) fn quantise_unit(x: f64) -> Option<u8> {
    (0.0..=1.0).contains(&x).then(|| (x * 255.0).round() as u8)
}

/// The four IDX files of a (Fashion-)MNIST folder, as found on disk.
#[derive(Debug)]
struct IdxFiles {
    train_images: PathBuf,
    train_labels: PathBuf,
    test_images: PathBuf,
    test_labels: PathBuf,
}

impl IdxFiles {
    /// Finds the files under `dir`. The Debian package puts the four `.gz`
    /// files directly in the directory, but hand-made copies often sit in a
    /// subfolder (`fashion/`, `raw/`, ...), are already unpacked, or use the
    /// `train-images.idx3-ubyte` spelling, so all of those are accepted.
    fn locate(dir: &Path) -> Result<IdxFiles, DataError> {
        Ok(IdxFiles {
            train_images: find_idx_file(dir, "train-images-idx3-ubyte")?,
            train_labels: find_idx_file(dir, "train-labels-idx1-ubyte")?,
            test_images: find_idx_file(dir, "t10k-images-idx3-ubyte")?,
            test_labels: find_idx_file(dir, "t10k-labels-idx1-ubyte")?,
        })
    }
}

/// `dir` followed by its immediate subfolders, sorted so the choice between
/// several copies is stable: the places a dataset's files are looked for.
pub(crate) fn search_places(dir: &Path) -> Vec<PathBuf> {
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
    places
}

/// Looks for `name` in `dir`, then in each immediate subfolder; in each place
/// `.gz` first, then raw, then the dot-spelling (`train-images.idx3-ubyte`)
/// in both forms.
fn find_idx_file(dir: &Path, name: &str) -> Result<PathBuf, DataError> {
    let dotted = name.replacen("-idx", ".idx", 1);
    let candidates = [
        format!("{name}.gz"),
        name.to_string(),
        format!("{dotted}.gz"),
        dotted,
    ];
    for place in &search_places(dir) {
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
        tried: candidates.to_vec(),
    })
}

/// Loads a folder of (Fashion-)MNIST IDX files; `name` is the dataset's name
/// for [`DataSplits::source`].
fn load_idx_dir(dir: &Path, name: &str) -> Result<DataSplits, DataError> {
    let files = IdxFiles::locate(dir)?;
    let train = load_idx_pair(&files.train_images, &files.train_labels, None)?;
    let test = load_idx_pair(
        &files.test_images,
        &files.test_labels,
        Some((&files.train_images, train.shape)),
    )?;
    tracing::debug!(
        train = train.len(),
        test = test.len(),
        dir = %dir.display(),
        "loaded {name}"
    );
    Ok(DataSplits {
        train,
        test,
        source: format!("{name} ({})", dir.display()),
    })
}

/// Reads one images file and its labels file and checks they belong together.
/// `like`: the training images' file and shape, which test images must match
/// (any image size is fine, since models reshape by `shape`, but one size).
/// Checked before the labels are read, as the more telling error.
fn load_idx_pair(
    images_path: &Path,
    labels_path: &Path,
    like: Option<(&Path, [usize; 3])>,
) -> Result<Dataset, DataError> {
    let (n, rows, cols, pixels) = idx::read_images(images_path)?;
    if rows == 0 || cols == 0 {
        return Err(DataError::Format {
            path: images_path.to_path_buf(),
            format: "IDX",
            reason: format!("images are {rows}×{cols}, which holds no pixels"),
        });
    }
    if let Some((train_path, [_, tr, tc])) = like
        && (tr, tc) != (rows, cols)
    {
        return Err(DataError::TrainTest {
            train: train_path.to_path_buf(),
            test: images_path.to_path_buf(),
            reason: format!("training images are {tr}×{tc}, test images are {rows}×{cols}"),
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
            format: "IDX",
            reason: format!("label {l} at position {i} is not below {CLASSES}"),
        });
    }
    Ok(Dataset {
        pixels,
        labels,
        features: rows * cols,
        shape: [1, rows, cols],
        classes: CLASSES,
    })
}

/// Reads a whole file, naming it in the error.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over
/// `path`: a reader (or a crash) never sees half a file, and an old copy
/// stays intact until the new one is complete.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    crate::fsutil::write_atomic(path, bytes, 0o644).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A ChaCha8 generator for one purpose, seeded from SHA-256 of a domain tag and
/// the given numbers. Separate domains keep e.g. the public split and the
/// partition independent even when a user gives both the same seed, and the
/// derivation is portable, which matters for choices peers must agree on.
pub fn derived_rng(domain: &str, parts: &[u64]) -> ChaCha8Rng {
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
pub fn portable_shuffle<T>(items: &mut [T], rng: &mut ChaCha8Rng) {
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
        let c: Cfg = toml::from_str("[data]\nkind = \"mnist\"\ndir = \"m\"\n").unwrap();
        assert_eq!(c.data, DataSource::Mnist { dir: "m".into() });
        let c: Cfg = toml::from_str("[data]\nkind = \"cifar10\"\ndir = \"c\"\n").unwrap();
        assert_eq!(c.data, DataSource::Cifar10 { dir: "c".into() });
        // No default folder exists for these: `dir` is required.
        assert!(toml::from_str::<Cfg>("[data]\nkind = \"mnist\"\n").is_err());
        assert!(toml::from_str::<Cfg>("[data]\nkind = \"cifar10\"\n").is_err());
    }

    #[test]
    fn rebase_makes_relative_paths_relative_to_base() {
        let base = Path::new("/etc/fd");
        let mut s = DataSource::Npy {
            train_x: "x.npy".into(),
            train_y: "/abs/y.npy".into(),
            test_x: "sub/tx.npy".into(),
            test_y: "ty.npy".into(),
            classes: None,
        };
        s.rebase(base);
        assert_eq!(
            s,
            DataSource::Npy {
                train_x: "/etc/fd/x.npy".into(),
                train_y: "/abs/y.npy".into(),
                test_x: "/etc/fd/sub/tx.npy".into(),
                test_y: "/etc/fd/ty.npy".into(),
                classes: None,
            }
        );
        let mut c = DataSource::Cifar10 { dir: "c".into() };
        c.rebase(base);
        assert_eq!(
            c,
            DataSource::Cifar10 {
                dir: "/etc/fd/c".into()
            }
        );
        let mut v = DataSource::Csv {
            train: "a.csv".into(),
            test: "b.csv".into(),
            label_column: LabelColumn::default(),
            values: CsvValues::Auto,
            classes: None,
        };
        v.rebase(base);
        assert!(matches!(&v, DataSource::Csv { train, test, .. }
            if train == Path::new("/etc/fd/a.csv") && test == Path::new("/etc/fd/b.csv")));
        let mut a = DataSource::Auto;
        a.rebase(base);
        assert_eq!(a, DataSource::Auto);
    }

    #[test]
    fn class_count_and_quantisation() {
        let never = |_, _, _, _| -> DataError { unreachable!() };
        assert_eq!(class_count(None, &[0, 4], &[2], never).unwrap(), 5);
        assert_eq!(
            class_count(None, &[0], &[7], never).unwrap(),
            8,
            "test labels count too"
        );
        assert_eq!(class_count(Some(9), &[0, 4], &[2], never).unwrap(), 9);
        let e = class_count(Some(4), &[0, 1], &[3, 4], |split, i, l, c| {
            DataError::Partition {
                reason: format!("{split} {i} {l} {c}"),
            }
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "cannot partition the data: 1 1 4 4");
        for bad in [0, 257] {
            let e = class_count(Some(bad), &[0], &[0], never).unwrap_err();
            assert!(
                matches!(
                    e,
                    DataError::Config {
                        field: "classes",
                        ..
                    }
                ),
                "{e}"
            );
        }
        assert_eq!(quantise_unit(0.0), Some(0));
        assert_eq!(quantise_unit(1.0), Some(255));
        assert_eq!(quantise_unit(0.5), Some(128));
        assert_eq!(quantise_unit(0.3), Some(77));
        assert_eq!(quantise_unit(-0.0), Some(0));
        for bad in [-0.001, 1.001, f64::NAN, f64::INFINITY] {
            assert_eq!(quantise_unit(bad), None, "{bad}");
        }
    }

    #[test]
    fn atomic_write_replaces_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.bin");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["out.bin"]);
        // A folder in the way: the error names the file, no temp file stays.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir_all(blocked.join("inner")).unwrap();
        let e = write_atomic(&blocked, b"x").unwrap_err();
        assert!(e.to_string().contains("blocked"), "{e}");
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["blocked", "out.bin"]);
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
        assert!(
            msg.contains("looked for train-images-idx3-ubyte.gz, "),
            "{msg}"
        );
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    }

    /// Loads the real Fashion-MNIST when the Debian package is installed.
    #[test]
    fn real_fashion_mnist_loads() {
        // The README's test command and .ci/run install the Debian package.
        let dir = Path::new(DEFAULT_FASHION_MNIST_DIR);
        if let Err(e) = IdxFiles::locate(dir) {
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
