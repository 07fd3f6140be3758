//! Reader for NumPy `.npy` arrays (format versions 1.0, 2.0 and 3.0), for
//! users' own image or feature arrays.
//!
//! Format: the magic `\x93NUMPY`, a major and minor version byte, the header
//! length (`u16` little-endian in v1, `u32` in v2/v3), then the header — a
//! Python dict literal such as
//! `{'descr': '<f4', 'fortran_order': False, 'shape': (60000, 28, 28), }` —
//! and the raw C-order data. The header is parsed by a small tokenizer for
//! exactly that dict grammar (strings, `True`/`False`, tuples of integers),
//! which is all `numpy.save` writes for plain arrays. Kept hand-written on
//! purpose (issue 19 asked for npyz or ndarray-npy): neither is in
//! Cargo.lock, and both parse the header with py_literal, which brings pest,
//! the pest_derive proc-macro chain, num-bigint and num-complex into every
//! build for those forty lines; the checks that make this reader useful
//! (value ranges named by file, sample and element; label dtypes; exact
//! body size) would stay ours either way.
//!
//! What is accepted, and why:
//! * Images `x`: `uint8` (`|u1`, stored as is) or `float32` / `float64` in
//!   [0, 1], either byte order. Floats are quantised to `round(x · 255)`
//!   because [`super::Dataset`] holds bytes (resolution 1/255); a value
//!   outside [0, 1] is rejected naming the file, sample and element, not
//!   clamped, because it means the data was not scaled as the user believes.
//!   Shape `(n, f)` → `[1, 1, f]`, `(n, h, w)` → `[1, h, w]`,
//!   `(n, c, h, w)` → `[c, h, w]` (channels first: transpose NHWC arrays
//!   before saving).
//! * Labels `y`: any integer dtype (`uint8`, `int64`, ...), shape `(n,)` or
//!   `(n, 1)`, values 0..=255.
//! * Fortran-order arrays and structured dtypes are refused with a message
//!   saying how to re-save; the file size must match the header exactly, so a
//!   truncated copy fails here.
//! * Train and test must have the same sample shape; `classes` is
//!   max label + 1 over both unless declared.

use std::path::Path;

use super::{DataError, DataSplits, Dataset, class_count, quantise_unit, read_file};

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// Element type of an array, as given by its `descr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    /// Unsigned (`u`) or signed (`i`) integer of `size` bytes.
    Int {
        signed: bool,
        size: usize,
        big_endian: bool,
    },
    /// IEEE float of `size` (4 or 8) bytes.
    Float { size: usize, big_endian: bool },
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Dtype::Int { size, .. } | Dtype::Float { size, .. } => size,
        }
    }

    /// Parses a simple `descr` such as `<f4`, `|u1`, `>i8`. `=` (native) is
    /// read as little-endian, which is what every machine fd runs on uses.
    fn parse(descr: &str) -> Option<Dtype> {
        let (big_endian, rest) = match descr.as_bytes().first()? {
            b'<' | b'|' | b'=' => (false, &descr[1..]),
            b'>' => (true, &descr[1..]),
            _ => (false, descr),
        };
        if !rest.is_ascii() {
            return None;
        }
        let kind = rest.chars().next()?;
        let size: usize = rest[1..].parse().ok()?;
        match (kind, size) {
            ('u' | 'i', 1 | 2 | 4 | 8) => Some(Dtype::Int {
                signed: kind == 'i',
                size,
                big_endian,
            }),
            ('f', 4 | 8) => Some(Dtype::Float { size, big_endian }),
            _ => None,
        }
    }

    /// Element `i` of `data` as f64 (exact for every integer that can be a
    /// label and for every float).
    fn get(self, data: &[u8], i: usize) -> f64 {
        let b = &data[i * self.size()..(i + 1) * self.size()];
        macro_rules! num {
            ($t:ty, $be:expr) => {{
                let a = b.try_into().unwrap();
                (if $be {
                    <$t>::from_be_bytes(a)
                } else {
                    <$t>::from_le_bytes(a)
                }) as f64
            }};
        }
        match self {
            Dtype::Int {
                signed: false,
                size: 1,
                ..
            } => f64::from(b[0]),
            Dtype::Int {
                signed: true,
                size: 1,
                ..
            } => f64::from(b[0] as i8),
            Dtype::Int {
                signed,
                size,
                big_endian: be,
            } => match (signed, size) {
                (false, 2) => num!(u16, be),
                (true, 2) => num!(i16, be),
                (false, 4) => num!(u32, be),
                (true, 4) => num!(i32, be),
                (false, _) => num!(u64, be),
                (true, _) => num!(i64, be),
            },
            Dtype::Float {
                size: 4,
                big_endian: be,
            } => num!(f32, be),
            Dtype::Float { big_endian: be, .. } => num!(f64, be),
        }
    }
}

/// An array as read from a `.npy` file: its dtype, shape and raw C-order data.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    pub descr: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl NpyArray {
    /// Number of elements (product of the shape; 1 for a 0-d array).
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn format_err(path: &Path, reason: String) -> DataError {
    DataError::Format {
        path: path.to_path_buf(),
        format: "NPY",
        reason,
    }
}

/// Reads and checks one `.npy` file.
pub fn read(path: &Path) -> Result<NpyArray, DataError> {
    let mut bytes = read_file(path)?;
    let err = |reason: String| format_err(path, reason);
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(err("does not start with the NPY magic \\x93NUMPY".into()));
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (len_bytes, header_len) = match major {
        1 => (2, u16::from_le_bytes([bytes[8], bytes[9]]) as usize),
        2 | 3 if bytes.len() < 12 => {
            return Err(err(format!(
                "only {} bytes, shorter than a v{major} preamble",
                bytes.len()
            )));
        }
        2 | 3 => (
            4,
            u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize,
        ),
        _ => {
            return Err(err(format!(
                "format version {major}.{minor} is not supported (1.0, 2.0, 3.0 are)"
            )));
        }
    };
    let start: usize = 8 + len_bytes;
    let end = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| {
            err(format!(
                "header of {header_len} bytes runs past the end of the {}-byte file",
                bytes.len()
            ))
        })?;
    let header =
        std::str::from_utf8(&bytes[start..end]).map_err(|_| err("header is not text".into()))?;
    let dict = parse_header(header).map_err(|e| err(format!("header {header:?}: {e}")))?;
    if dict.fortran_order {
        return Err(err(
            "the array is in Fortran order; save it with numpy.ascontiguousarray(a)".into(),
        ));
    }
    let dtype = Dtype::parse(&dict.descr).ok_or_else(|| {
        err(format!(
            "dtype {:?} is not supported (integers u1..u8/i1..i8, floats f4/f8)",
            dict.descr
        ))
    })?;
    let body = dict
        .shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| err(format!("shape {:?} overflows", dict.shape)))?;
    let actual = bytes.len() - end;
    if actual != body {
        return Err(err(format!(
            "shape {:?} of {} needs {body} data bytes, the file has {actual}{}",
            dict.shape,
            dict.descr,
            if actual < body { " (truncated?)" } else { "" }
        )));
    }
    bytes.drain(..end);
    Ok(NpyArray {
        descr: dict.descr,
        dtype,
        shape: dict.shape,
        data: bytes,
    })
}

/// Bytes of a `.npy` v1 file holding `data` (tests and exports).
pub fn to_bytes(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Pad with spaces and a newline so the data starts at a multiple of 64, as numpy does.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// Parses the header dict: `{'key': value, ...}` with string, bool and
/// integer-tuple values; all three keys are required.
fn parse_header(text: &str) -> Result<Header, String> {
    enum Value {
        Str(String),
        Bool(bool),
        Tuple(Vec<usize>),
    }
    let mut p = Parser {
        s: text.trim_end().as_bytes(),
        i: 0,
    };
    p.expect(b'{')?;
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    loop {
        p.skip_ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        p.skip_ws();
        p.expect(b':')?;
        p.skip_ws();
        let value = match p.peek() {
            Some(b'\'' | b'"') => Value::Str(p.string()?),
            Some(b'(') => Value::Tuple(p.tuple()?),
            _ if p.word("True") => Value::Bool(true),
            _ if p.word("False") => Value::Bool(false),
            _ => return Err(format!("unexpected value for {key:?} at byte {}", p.i)),
        };
        match (key.as_str(), value) {
            ("descr", Value::Str(s)) => descr = Some(s),
            ("fortran_order", Value::Bool(b)) => fortran = Some(b),
            ("shape", Value::Tuple(t)) => shape = Some(t),
            ("descr" | "fortran_order" | "shape", _) => {
                return Err(format!("{key:?} has the wrong kind of value"));
            }
            _ => {} // Unknown keys are allowed by the format; ignore them.
        }
        p.skip_ws();
        if !p.eat(b',') {
            p.skip_ws();
            p.expect(b'}')?;
            break;
        }
    }
    Ok(Header {
        descr: descr.ok_or("no 'descr' key (structured dtypes are not supported)")?,
        fortran_order: fortran.ok_or("no 'fortran_order' key")?,
        shape: shape.ok_or("no 'shape' key")?,
    })
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        self.i += usize::from(hit);
        hit
    }
    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("expected '{}' at byte {}", c as char, self.i))
        }
    }
    fn word(&mut self, w: &str) -> bool {
        let hit = self.s[self.i..].starts_with(w.as_bytes());
        if hit {
            self.i += w.len();
        }
        hit
    }
    fn string(&mut self) -> Result<String, String> {
        let quote = self
            .peek()
            .filter(|c| matches!(c, b'\'' | b'"'))
            .ok_or_else(|| format!("expected a quoted string at byte {}", self.i))?;
        self.i += 1;
        let start = self.i;
        while self.peek().is_some_and(|c| c != quote) {
            self.i += 1;
        }
        let s = std::str::from_utf8(&self.s[start..self.i]).map_err(|e| e.to_string())?;
        self.expect(quote)?;
        Ok(s.to_string())
    }
    fn tuple(&mut self) -> Result<Vec<usize>, String> {
        self.expect(b'(')?;
        let mut out = Vec::new();
        loop {
            self.skip_ws();
            if self.eat(b')') {
                return Ok(out);
            }
            let start = self.i;
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.i += 1;
            }
            // numpy on Windows once wrote dimensions as `3L`.
            let digits = std::str::from_utf8(&self.s[start..self.i]).unwrap_or_default();
            let _ = self.eat(b'L');
            out.push(
                digits
                    .parse()
                    .map_err(|_| format!("expected a dimension at byte {start}"))?,
            );
            self.skip_ws();
            if !self.eat(b',') {
                self.skip_ws();
                self.expect(b')')?;
                return Ok(out);
            }
        }
    }
}

/// Images of `x` as bytes with their sample shape; errors name `path`.
fn images(path: &Path, x: NpyArray) -> Result<(usize, [usize; 3], Vec<u8>), DataError> {
    let (n, shape) = match x.shape[..] {
        [n, f] => (n, [1, 1, f]),
        [n, h, w] => (n, [1, h, w]),
        [n, c, h, w] => (n, [c, h, w]),
        _ => {
            return Err(format_err(
                path,
                format!(
                    "images have shape {:?}; expected (n, features), (n, h, w) or (n, c, h, w)",
                    x.shape
                ),
            ));
        }
    };
    let features: usize = shape.iter().product();
    if n == 0 || features == 0 {
        return Err(format_err(
            path,
            format!("images have shape {:?}, which holds no samples", x.shape),
        ));
    }
    let pixels = match x.dtype {
        Dtype::Int {
            signed: false,
            size: 1,
            ..
        } => x.data,
        Dtype::Float { .. } => (0..x.len())
            .map(|i| {
                let v = x.dtype.get(&x.data, i);
                quantise_unit(v).ok_or_else(|| DataError::Value {
                    path: path.to_path_buf(),
                    position: format!("sample {}, element {}", i / features, i % features),
                    reason: format!(
                        "value {v} is outside [0, 1] (float images must be scaled to [0, 1])"
                    ),
                })
            })
            .collect::<Result<_, _>>()?,
        Dtype::Int { .. } => {
            return Err(format_err(
                path,
                format!(
                    "images have dtype {:?}; expected uint8 (|u1), or float32/float64 in [0, 1]",
                    x.descr
                ),
            ));
        }
    };
    Ok((n, shape, pixels))
}

/// Labels of `y` as bytes; errors name `path`.
fn labels(path: &Path, y: &NpyArray) -> Result<Vec<u8>, DataError> {
    if !matches!(y.shape[..], [_] | [_, 1]) {
        return Err(format_err(
            path,
            format!("labels have shape {:?}; expected (n,) or (n, 1)", y.shape),
        ));
    }
    if matches!(y.dtype, Dtype::Float { .. }) {
        return Err(format_err(
            path,
            format!(
                "labels have dtype {:?}; expected an integer dtype (uint8, int64, ...)",
                y.descr
            ),
        ));
    }
    (0..y.len())
        .map(|i| {
            let v = y.dtype.get(&y.data, i);
            if (0.0..=255.0).contains(&v) {
                Ok(v as u8)
            } else {
                Err(DataError::Value {
                    path: path.to_path_buf(),
                    position: format!("label {i}"),
                    reason: format!("value {v} is not in 0..=255"),
                })
            }
        })
        .collect()
}

/// One split's sample shape, pixel bytes and labels.
type Split = ([usize; 3], Vec<u8>, Vec<u8>);

/// Loads one split: images and labels, checked against each other.
fn split(x_path: &Path, y_path: &Path) -> Result<Split, DataError> {
    let (n, shape, pixels) = images(x_path, read(x_path)?)?;
    let labels = labels(y_path, &read(y_path)?)?;
    if labels.len() != n {
        return Err(DataError::Mismatch {
            images: n,
            images_path: x_path.to_path_buf(),
            labels: labels.len(),
            labels_path: y_path.to_path_buf(),
        });
    }
    Ok((shape, pixels, labels))
}

/// Loads the four arrays; see the module documentation.
pub fn load(
    train_x: &Path,
    train_y: &Path,
    test_x: &Path,
    test_y: &Path,
    classes: Option<usize>,
) -> Result<DataSplits, DataError> {
    let (shape, train_pixels, train_labels) = split(train_x, train_y)?;
    let (test_shape, test_pixels, test_labels) = split(test_x, test_y)?;
    if shape != test_shape {
        return Err(DataError::TrainTest {
            train: train_x.to_path_buf(),
            test: test_x.to_path_buf(),
            reason: format!("train samples have shape {shape:?}, test samples {test_shape:?}"),
        });
    }
    let classes = class_count(
        classes,
        &train_labels,
        &test_labels,
        |split, i, label, classes| DataError::Value {
            path: if split == 0 { train_y } else { test_y }.to_path_buf(),
            position: format!("label {i}"),
            reason: format!("value {label} is not below classes = {classes}"),
        },
    )?;
    let features = shape.iter().product();
    let dataset = |pixels, labels| Dataset {
        pixels,
        labels,
        features,
        shape,
        classes,
    };
    Ok(DataSplits {
        train: dataset(train_pixels, train_labels),
        test: dataset(test_pixels, test_labels),
        source: format!("npy ({}, {})", train_x.display(), test_x.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DataSource;
    use std::path::PathBuf;

    fn put(dir: &Path, name: &str, bytes: Vec<u8>) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn i64s(v: &[i64]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// A v2 file (u32 header length) around a hand-written header dict.
    fn v2(header: &str, data: &[u8]) -> Vec<u8> {
        let header = format!("{header}\n");
        let mut out = b"\x93NUMPY\x02\x00".to_vec();
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn header_forms() {
        let dir = tempfile::tempdir().unwrap();
        let a = read(&put(
            dir.path(),
            "a.npy",
            to_bytes("|u1", &[2, 3], &[1, 2, 3, 4, 5, 6]),
        ))
        .unwrap();
        assert_eq!(
            (a.shape.clone(), a.data.clone()),
            (vec![2, 3], vec![1, 2, 3, 4, 5, 6])
        );
        let b = read(&put(
            dir.path(),
            "b.npy",
            v2(
                "{\"descr\":\">i2\",\"fortran_order\":False,\"shape\":(2L,)}",
                &[0, 7, 1, 0],
            ),
        ))
        .unwrap();
        assert_eq!(b.shape, [2]);
        assert_eq!(
            (b.dtype.get(&b.data, 0), b.dtype.get(&b.data, 1)),
            (7.0, 256.0)
        );
        // The v1 file numpy pads to 64 bytes.
        assert_eq!(to_bytes("|u1", &[1], &[0]).len() % 64, 1);
    }

    #[test]
    fn uint8_images_with_int64_labels() {
        let dir = tempfile::tempdir().unwrap();
        let px: Vec<u8> = (0..3 * 2 * 4).map(|i| i as u8 * 10).collect();
        let tx = put(dir.path(), "tx.npy", to_bytes("|u1", &[3, 2, 4], &px));
        let ty = put(
            dir.path(),
            "ty.npy",
            to_bytes("<i8", &[3], &i64s(&[0, 4, 2])),
        );
        let ex = put(dir.path(), "ex.npy", to_bytes("|u1", &[1, 2, 4], &px[..8]));
        let ey = put(dir.path(), "ey.npy", to_bytes("|u1", &[1, 1], &[1]));
        let s = DataSource::Npy {
            train_x: tx,
            train_y: ty,
            test_x: ex,
            test_y: ey,
            classes: None,
        }
        .load()
        .unwrap();
        assert_eq!(s.train.shape, [1, 2, 4]);
        assert_eq!(s.train.features, 8);
        assert_eq!(s.train.pixels, px);
        assert_eq!(s.train.labels, [0, 4, 2]);
        assert_eq!(s.test.labels, [1]);
        assert_eq!((s.train.classes, s.test.classes), (5, 5));
    }

    #[test]
    fn float_images_shapes_and_quantisation() {
        let dir = tempfile::tempdir().unwrap();
        let y = put(dir.path(), "y.npy", to_bytes("|u1", &[2], &[0, 1]));
        let vals = [0.0f32, 0.5, 1.0, 0.2, 0.0, 1.0, 0.25, 0.75];
        for (shape, expect) in [
            (vec![2, 4], [1, 1, 4]),
            (vec![2, 2, 2], [1, 2, 2]),
            (vec![2, 2, 1, 2], [2, 1, 2]),
        ] {
            let x = put(dir.path(), "x.npy", to_bytes("<f4", &shape, &f32s(&vals)));
            let s = load(&x, &y, &x, &y, Some(3)).unwrap();
            assert_eq!(s.train.shape, expect);
            assert_eq!(s.train.pixels, [0, 128, 255, 51, 0, 255, 64, 191]);
            assert_eq!(s.train.classes, 3);
        }
        // float64, big-endian.
        let be: Vec<u8> = [0.0f64, 1.0].iter().flat_map(|x| x.to_be_bytes()).collect();
        let x = put(dir.path(), "x8.npy", to_bytes(">f8", &[2, 1], &be));
        assert_eq!(load(&x, &y, &x, &y, None).unwrap().train.pixels, [0, 255]);
    }

    #[test]
    fn out_of_range_float_names_sample() {
        let dir = tempfile::tempdir().unwrap();
        let y = put(dir.path(), "y.npy", to_bytes("|u1", &[2], &[0, 1]));
        let x = put(
            dir.path(),
            "x.npy",
            to_bytes("<f4", &[2, 3], &f32s(&[0.0, 0.1, 0.2, 0.3, 1.5, 0.5])),
        );
        let e = load(&x, &y, &x, &y, None).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, DataError::Value { .. }), "{msg}");
        assert!(
            msg.contains("x.npy") && msg.contains("sample 1, element 1") && msg.contains("1.5"),
            "{msg}"
        );
    }

    #[test]
    fn count_mismatch_names_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let x = put(dir.path(), "imgs.npy", to_bytes("|u1", &[3, 2], &[0; 6]));
        let y = put(dir.path(), "labs.npy", to_bytes("|u1", &[2], &[0, 1]));
        let e = load(&x, &y, &x, &y, None).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(
                e,
                DataError::Mismatch {
                    images: 3,
                    labels: 2,
                    ..
                }
            ),
            "{msg}"
        );
        assert!(
            msg.contains("imgs.npy") && msg.contains("labs.npy"),
            "{msg}"
        );
    }

    #[test]
    fn dtype_shape_and_size_errors() {
        let dir = tempfile::tempdir().unwrap();
        let x = put(dir.path(), "x.npy", to_bytes("|u1", &[2, 1], &[0, 0]));
        let y = put(dir.path(), "y.npy", to_bytes("|u1", &[2], &[0, 1]));
        let check = |name: &str, bytes: Vec<u8>, as_x: bool, needle: &str| {
            let p = put(dir.path(), name, bytes);
            let e = if as_x {
                load(&p, &y, &x, &y, None)
            } else {
                load(&x, &p, &x, &y, None)
            };
            let msg = e.map(|_| ()).unwrap_err().to_string();
            assert!(
                msg.contains(name) && msg.contains(needle),
                "{needle}: {msg}"
            );
        };
        check(
            "i32.npy",
            to_bytes("<i4", &[2, 1], &[0; 8]),
            true,
            "expected uint8",
        );
        check(
            "c8.npy",
            to_bytes("<c8", &[2, 1], &[0; 16]),
            true,
            "not supported",
        );
        check(
            "x1d.npy",
            to_bytes("|u1", &[2], &[0; 2]),
            true,
            "(n, features)",
        );
        check(
            "x5d.npy",
            to_bytes("|u1", &[2, 1, 1, 1, 1], &[0; 2]),
            true,
            "(n, c, h, w)",
        );
        check(
            "empty.npy",
            to_bytes("|u1", &[0, 4], &[]),
            true,
            "no samples",
        );
        check(
            "short.npy",
            to_bytes("|u1", &[2, 4], &[0; 7]),
            true,
            "needs 8 data bytes, the file has 7",
        );
        check(
            "long.npy",
            to_bytes("|u1", &[2, 4], &[0; 9]),
            true,
            "the file has 9",
        );
        check(
            "ffloat.npy",
            to_bytes("<f4", &[2], &f32s(&[0.0, 1.0])),
            false,
            "integer dtype",
        );
        check(
            "y2d.npy",
            to_bytes("|u1", &[2, 2], &[0; 4]),
            false,
            "(n,) or (n, 1)",
        );
        check(
            "neg.npy",
            to_bytes("<i8", &[2], &i64s(&[0, -1])),
            false,
            "label 1",
        );
        let mut fortran = to_bytes("|u1", &[2, 1], &[0, 0]);
        let at = fortran.windows(5).position(|w| w == b"False").unwrap();
        fortran.splice(at..at + 5, *b"True ");
        check("fortran.npy", fortran, true, "ascontiguousarray");
        check(
            "magic.npy",
            b"PK\x03\x04 not an npy file".to_vec(),
            true,
            "magic",
        );
        let mut v9 = to_bytes("|u1", &[2, 1], &[0, 0]);
        v9[6] = 9;
        check("v9.npy", v9, true, "version 9.0");
        let mut huge = to_bytes("|u1", &[2, 1], &[0, 0]);
        huge[8] = 0xff;
        check("hdr.npy", huge, true, "runs past the end");
        check(
            "nokey.npy",
            v2(
                "{'descr': '|u1', 'fortran_order': False, 'shap': (2, 1)}",
                &[0, 0],
            ),
            true,
            "no 'shape' key",
        );
        check(
            "struct.npy",
            v2(
                "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,)}",
                &[0; 8],
            ),
            true,
            "unexpected value for \"descr\"",
        );
    }

    #[test]
    fn train_test_shape_and_declared_classes() {
        let dir = tempfile::tempdir().unwrap();
        let y = put(dir.path(), "y.npy", to_bytes("|u1", &[2], &[0, 3]));
        let a = put(dir.path(), "a.npy", to_bytes("|u1", &[2, 4], &[0; 8]));
        let b = put(dir.path(), "b.npy", to_bytes("|u1", &[2, 2, 2], &[0; 8]));
        let e = load(&a, &y, &b, &y, None).unwrap_err();
        assert!(matches!(e, DataError::TrainTest { .. }), "{e}");
        assert!(
            e.to_string().contains("[1, 1, 4]") && e.to_string().contains("[1, 2, 2]"),
            "{e}"
        );
        let e = load(&a, &y, &a, &y, Some(3)).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("y.npy, label 1") && msg.contains("classes = 3"),
            "{msg}"
        );
        let e = load(&a, &y, &a, &y, Some(0)).unwrap_err();
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

    #[test]
    fn toml_form() {
        #[derive(serde::Deserialize)]
        struct Cfg {
            data: DataSource,
        }
        let c: Cfg = toml::from_str(
            "[data]\nkind = \"npy\"\ntrain_x = \"a\"\ntrain_y = \"b\"\ntest_x = \"c\"\ntest_y = \"d\"\n",
        )
        .unwrap();
        assert_eq!(
            c.data,
            DataSource::Npy {
                train_x: "a".into(),
                train_y: "b".into(),
                test_x: "c".into(),
                test_y: "d".into(),
                classes: None
            }
        );
        assert!(toml::from_str::<Cfg>("[data]\nkind = \"npy\"\ntrain_x = \"a\"\n").is_err());
    }
}
