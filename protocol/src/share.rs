//! The signed [`LogitShare`]: the only learning artefact that leaves a node.
//!
//! A share carries a node's logits on one round's public subset: never
//! weights, never private data. It is signed over a canonical encoding of
//! every field except the signature, with a domain-separation prefix so a
//! signature on a share can never be replayed as a signature on anything else.
//!
//! [`LogitShare::validate`] is the single gate between the network and
//! aggregation: it checks the cheap, structural facts first (federation,
//! round, subset, shape, the number of row weights) and then the signature,
//! and only then decodes the payload and rejects non-finite values.
//!
//! A share may also carry [`RowWeights`]: one knowledge weight per row (how
//! much the sender knows that public sample), signed with the rest.
//!
//! The payload is one of several [`PayloadEncoding`]s, from lossless f32 to
//! sparse top-k probabilities. Every decoder returns exactly rows × classes
//! finite f32 logits or a typed error, so aggregation never sees the
//! difference, and the encoding is a signed field so it cannot be swapped in
//! transit to reinterpret the bytes.

use std::fmt;
use std::str::FromStr;

use half::f16;
use serde::{Deserialize, Serialize};

use crate::codec::canonical_bytes;
use crate::digest::Digest;
use crate::error::ProtocolError;
use crate::identity::{PublicKey, Signature, SigningKey};

/// Domain-separation prefix of a share's signature. v2: the signed fields
/// include the optional row weights (protocol version 3).
const SIGNING_DOMAIN: &[u8] = b"fd/logit-share/v2\0";

/// Which public samples a share's rows refer to. Both sides derive the
/// sample indices from it (`fd-node`'s `round_subset`), so only the recipe
/// travels, not the index list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicSubset {
    /// Digest of the whole public set the subset is drawn from.
    pub public_set_digest: Digest,
    pub seed: u64,
    pub round: u64,
    /// Number of samples (rows).
    pub size: u32,
}

/// Largest class count [`PayloadEncoding::TopK`] can address: its class
/// indices are one byte each.
pub const TOP_K_MAX_CLASSES: u32 = 256;

/// How far a top-k row's kept probabilities may sum above 1. Each f16
/// probability is the true one rounded to nearest (relative error ≤ 2⁻¹¹), so
/// an honest row's kept mass is at most 1 + 4.9e-4; anything further off was
/// not produced by a softmax.
const TOP_K_MASS_SLACK: f64 = 1e-3;

/// Floor under a reconstructed probability before its log, so a class given
/// no mass still gets a finite logit (ln 1e-12 ≈ −27.6).
const PROBABILITY_FLOOR: f64 = 1e-12;

/// How the logits are laid out in the payload.
///
/// This is part of the signed share, so its wire form is serde's derived one
/// (bincode: a varint variant tag, then `k` for `TopK`); variants are only
/// ever appended so existing tags keep their meaning. Configuration files
/// name an encoding as a string instead: see [`PayloadEncoding::parse`],
/// [`PayloadEncoding::name`] and [`PayloadEncodingName`].
///
/// The lossy encodings trade accuracy for bytes per row (10 classes):
/// f32 40 B, f16 20 B, int8 14 B, top-k 3·k B.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PayloadEncoding {
    /// Row-major little-endian IEEE-754 f32, rows × classes values. Lossless.
    #[default]
    F32Le,
    /// Row-major little-endian IEEE-754 half, rows × classes values:
    /// relative error ≤ 2⁻¹¹, range ±65504.
    F16Le,
    /// Per row: an f32 LE scale (max |v| / 127, 0 for a row of zeros) and
    /// `classes` i8 values in [−127, 127]; a value decodes to i8 × scale, so
    /// each is off by at most scale / 2.
    Int8,
    /// Sparse probabilities. Per row, the `k` largest softmax probabilities
    /// as (u8 class index, f16 LE probability) pairs, largest first. Decoding
    /// spreads the mass not kept (1 − Σ kept, at least 0) evenly over the
    /// other classes and returns ln p (p floored at 1e-12) as the logits, so
    /// the softmax of the decoded logits is the reconstructed distribution.
    /// The logits' scale is lost by design: only the distribution travels,
    /// which is all a probability-based teacher uses.
    TopK { k: u16 },
}

impl PayloadEncoding {
    /// Parses the configuration name of an encoding: `f32`, `f16`, `int8` or
    /// `top-k:K` with 1 ≤ K ≤ 256.
    pub fn parse(name: &str) -> Result<Self, ProtocolError> {
        let invalid = |reason: String| ProtocolError::InvalidField {
            field: "encoding",
            reason,
        };
        match name {
            "f32" => Ok(PayloadEncoding::F32Le),
            "f16" => Ok(PayloadEncoding::F16Le),
            "int8" => Ok(PayloadEncoding::Int8),
            _ => {
                let Some(k) = name.strip_prefix("top-k:") else {
                    return Err(invalid(format!(
                        "unknown encoding `{name}` (expected f32, f16, int8 or top-k:K)"
                    )));
                };
                let k: u16 = k
                    .parse()
                    .map_err(|e| invalid(format!("`{name}`: k is not a number: {e}")))?;
                // k ≤ classes is checked where classes are known; this bound
                // holds for every class count top-k can encode.
                if k == 0 || u32::from(k) > TOP_K_MAX_CLASSES {
                    return Err(invalid(format!(
                        "`{name}`: k must be between 1 and {TOP_K_MAX_CLASSES}"
                    )));
                }
                Ok(PayloadEncoding::TopK { k })
            }
        }
    }

    /// The configuration name; [`Self::parse`] reads it back.
    pub fn name(&self) -> String {
        match self {
            PayloadEncoding::F32Le => "f32".into(),
            PayloadEncoding::F16Le => "f16".into(),
            PayloadEncoding::Int8 => "int8".into(),
            PayloadEncoding::TopK { k } => format!("top-k:{k}"),
        }
    }

    /// Whether this encoding can carry rows of `classes` values. Checked by
    /// [`Self::encode`] and [`Self::decode`], and by [`LogitShare::validate`]
    /// before the (costlier) signature check.
    pub fn check_shape(self, classes: u32) -> Result<(), ProtocolError> {
        if classes == 0 {
            return Err(ProtocolError::InvalidField {
                field: "classes",
                reason: "a share needs at least one class".into(),
            });
        }
        if let PayloadEncoding::TopK { k } = self {
            if classes > TOP_K_MAX_CLASSES {
                return Err(ProtocolError::InvalidField {
                    field: "classes",
                    reason: format!(
                        "top-k addresses at most {TOP_K_MAX_CLASSES} classes, got {classes}"
                    ),
                });
            }
            if k == 0 || u32::from(k) > classes {
                return Err(ProtocolError::InvalidField {
                    field: "encoding",
                    reason: format!("top-k needs 1 ≤ k ≤ classes = {classes}, got k = {k}"),
                });
            }
        }
        Ok(())
    }

    /// Payload bytes for a rows × classes matrix. Saturates instead of
    /// overflowing, since rows and classes may come from an untrusted share.
    pub fn payload_len(self, rows: u32, classes: u32) -> usize {
        let rows = rows as usize;
        let classes = classes as usize;
        let per_row = match self {
            PayloadEncoding::F32Le => classes.saturating_mul(4),
            PayloadEncoding::F16Le => classes.saturating_mul(2),
            PayloadEncoding::Int8 => classes.saturating_add(4),
            PayloadEncoding::TopK { k } => usize::from(k) * 3,
        };
        rows.saturating_mul(per_row)
    }

    /// Encodes row-major `logits` (a multiple of `classes` values).
    ///
    /// F32Le is bit-exact, so non-finite values go out as they are and the
    /// receiver's [`Self::decode`] rejects them (the gate, not the sender, is
    /// what a receiver trusts). The lossy encodings refuse what they cannot
    /// represent rather than send something else: int8 and top-k have no
    /// non-finite values ([`ProtocolError::NonFinite`]), and a finite value
    /// beyond f16's range would arrive as infinity
    /// ([`ProtocolError::InvalidField`]).
    pub fn encode(self, logits: &[f32], classes: u32) -> Result<Vec<u8>, ProtocolError> {
        self.check_shape(classes)?;
        let width = classes as usize;
        if !logits.len().is_multiple_of(width) {
            return Err(ProtocolError::ShapeMismatch {
                field: "logits",
                expected: format!("a multiple of {classes} values (rows × classes)"),
                got: format!("{} values", logits.len()),
            });
        }
        let rows = logits.len() / width;
        let mut out =
            Vec::with_capacity(self.payload_len(u32::try_from(rows).unwrap_or(u32::MAX), classes));
        match self {
            PayloadEncoding::F32Le => {
                for v in logits {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            PayloadEncoding::F16Le => {
                for (index, &v) in logits.iter().enumerate() {
                    let h = f16::from_f32(v);
                    if v.is_finite() && !h.is_finite() {
                        return Err(ProtocolError::InvalidField {
                            field: "logits",
                            reason: format!(
                                "value {v} at position {index} is beyond the f16 range ±{}",
                                f16::MAX
                            ),
                        });
                    }
                    out.extend_from_slice(&h.to_le_bytes());
                }
            }
            PayloadEncoding::Int8 => {
                for (r, row) in logits.chunks_exact(width).enumerate() {
                    check_finite(row, r * width)?;
                    let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let scale = max / 127.0;
                    out.extend_from_slice(&scale.to_le_bytes());
                    for &v in row {
                        // Divide by the scale actually sent, in f64, so the
                        // rounding error is exactly what the receiver sees.
                        // The clamp only matters when `scale` rounded down.
                        let q = if scale > 0.0 {
                            (f64::from(v) / f64::from(scale))
                                .round()
                                .clamp(-127.0, 127.0) as i8
                        } else {
                            0
                        };
                        out.push(q as u8);
                    }
                }
            }
            PayloadEncoding::TopK { k } => {
                let k = usize::from(k);
                let mut probs = vec![0f64; width];
                let mut order: Vec<usize> = Vec::with_capacity(width);
                // Largest probability first; ties by class index so the
                // payload is a function of the logits alone.
                let by_prob_desc =
                    |p: &[f64], a: &usize, b: &usize| p[*b].total_cmp(&p[*a]).then(a.cmp(b));
                for (r, row) in logits.chunks_exact(width).enumerate() {
                    check_finite(row, r * width)?;
                    softmax_into(row, &mut probs);
                    order.clear();
                    order.extend(0..width);
                    if k < width {
                        order.select_nth_unstable_by(k - 1, |a, b| by_prob_desc(&probs, a, b));
                    }
                    let kept = &mut order[..k];
                    kept.sort_unstable_by(|a, b| by_prob_desc(&probs, a, b));
                    for &class in kept.iter() {
                        // check_shape bounds classes by 256, so this fits.
                        out.push(class as u8);
                        out.extend_from_slice(&f16::from_f64(probs[class]).to_le_bytes());
                    }
                }
            }
        }
        Ok(out)
    }

    /// Decodes a payload into exactly rows × classes finite logits, or says
    /// what is wrong with it: [`ProtocolError::ShapeMismatch`] for a wrong
    /// length, [`ProtocolError::NonFinite`] (indexed into the rows × classes
    /// matrix; for an int8 scale, its row's first element) for a value that is
    /// or decodes to NaN or ±∞, and [`ProtocolError::InvalidField`] for
    /// anything an honest encoder never writes (an encoding that cannot carry
    /// `classes`, a negative int8 scale or −128, a top-k index out of range or
    /// repeated, a probability outside [0, 1], kept mass above 1).
    ///
    /// The output has rows × classes values whatever the payload size (top-k
    /// expands it), so `rows` and `classes` must be the receiver's own
    /// expectation, as in [`LogitShare::validate`], not a sender's claim.
    pub fn decode(
        self,
        payload: &[u8],
        rows: u32,
        classes: u32,
    ) -> Result<Vec<f32>, ProtocolError> {
        self.check_shape(classes)?;
        let expected = self.payload_len(rows, classes);
        if payload.len() != expected {
            return Err(ProtocolError::ShapeMismatch {
                field: "payload",
                expected: format!("{expected} bytes ({rows} × {classes} as {})", self.name()),
                got: format!("{} bytes", payload.len()),
            });
        }
        let width = classes as usize;
        let mut out = Vec::with_capacity(rows as usize * width);
        match self {
            PayloadEncoding::F32Le => {
                for c in payload.as_chunks::<4>().0 {
                    out.push(f32::from_le_bytes(*c));
                }
                check_finite(&out, 0)?;
            }
            PayloadEncoding::F16Le => {
                for c in payload.as_chunks::<2>().0 {
                    out.push(f16::from_le_bytes(*c).to_f32());
                }
                check_finite(&out, 0)?;
            }
            PayloadEncoding::Int8 => {
                for (r, row) in payload.chunks_exact(4 + width).enumerate() {
                    let (scale, values) = row
                        .split_first_chunk::<4>()
                        .expect("an int8 row is at least 4 bytes");
                    let scale = f32::from_le_bytes(*scale);
                    let first = r * width;
                    if !scale.is_finite() {
                        return Err(ProtocolError::NonFinite { index: first });
                    }
                    if scale < 0.0 {
                        return Err(ProtocolError::InvalidField {
                            field: "payload",
                            reason: format!("row {r} has a negative int8 scale {scale}"),
                        });
                    }
                    for (j, &byte) in values.iter().enumerate() {
                        let q = byte as i8;
                        if q == i8::MIN {
                            return Err(ProtocolError::InvalidField {
                                field: "payload",
                                reason: format!(
                                    "int8 value −128 at position {} (values are in [−127, 127])",
                                    first + j
                                ),
                            });
                        }
                        let v = f32::from(q) * scale;
                        // A scale near f32::MAX can overflow even though it is finite.
                        if !v.is_finite() {
                            return Err(ProtocolError::NonFinite { index: first + j });
                        }
                        out.push(v);
                    }
                }
            }
            PayloadEncoding::TopK { k } => decode_top_k(payload, usize::from(k), width, &mut out)?,
        }
        Ok(out)
    }
}

/// The body of [`PayloadEncoding::decode`] for `TopK`: shape already checked.
fn decode_top_k(
    payload: &[u8],
    k: usize,
    width: usize,
    out: &mut Vec<f32>,
) -> Result<(), ProtocolError> {
    let invalid = |reason: String| ProtocolError::InvalidField {
        field: "payload",
        reason,
    };
    let mut probs = vec![0f64; width];
    let mut kept = vec![false; width];
    for (r, row) in payload.chunks_exact(3 * k).enumerate() {
        kept.fill(false);
        probs.fill(0.0);
        let mut mass = 0f64;
        for pair in row.as_chunks::<3>().0 {
            let class = usize::from(pair[0]);
            if class >= width {
                return Err(invalid(format!(
                    "row {r}: class index {class} is not below {width} classes"
                )));
            }
            if kept[class] {
                return Err(invalid(format!(
                    "row {r}: class index {class} appears twice"
                )));
            }
            kept[class] = true;
            let p = f16::from_le_bytes([pair[1], pair[2]]).to_f64();
            if !p.is_finite() {
                return Err(ProtocolError::NonFinite {
                    index: r * width + class,
                });
            }
            if !(0.0..=1.0).contains(&p) {
                return Err(invalid(format!(
                    "row {r}: probability {p} of class {class} is outside [0, 1]"
                )));
            }
            probs[class] = p;
            mass += p;
        }
        if mass > 1.0 + TOP_K_MASS_SLACK {
            return Err(invalid(format!(
                "row {r}: kept probabilities sum to {mass}, more than 1"
            )));
        }
        if width > k {
            let rest = (1.0 - mass).max(0.0) / (width - k) as f64;
            for (p, _) in probs.iter_mut().zip(&kept).filter(|(_, kept)| !**kept) {
                *p = rest;
            }
        }
        out.extend(probs.iter().map(|p| p.max(PROBABILITY_FLOOR).ln() as f32));
    }
    Ok(())
}

/// `NonFinite` at `offset` + the position of the first non-finite value.
fn check_finite(values: &[f32], offset: usize) -> Result<(), ProtocolError> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(ProtocolError::NonFinite { index: offset + i }),
        None => Ok(()),
    }
}

/// Numerically stable softmax of one finite row, in f64: the one softmax
/// of the workspace (share validation, the probability aggregators and the
/// knowledge selectors all read probabilities through it, so they agree to
/// the last bit).
pub fn softmax_into(row: &[f32], out: &mut [f64]) {
    let max = f64::from(row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v)));
    let mut total = 0.0;
    for (o, v) in out.iter_mut().zip(row) {
        *o = (f64::from(*v) - max).exp();
        total += *o;
    }
    for o in out.iter_mut() {
        *o /= total;
    }
}

impl fmt::Display for PayloadEncoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl FromStr for PayloadEncoding {
    type Err = ProtocolError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PayloadEncoding::parse(s)
    }
}

/// A [`PayloadEncoding`] that serializes as its name (`"f32"`, `"f16"`,
/// `"int8"`, `"top-k:5"`), for configuration files.
///
/// A separate type rather than a string form on `PayloadEncoding` itself,
/// because `PayloadEncoding` is inside the signed share: its wire form stays
/// the compact derived one, and what reads well in TOML cannot change what is
/// signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PayloadEncodingName(pub PayloadEncoding);

impl TryFrom<String> for PayloadEncodingName {
    type Error = ProtocolError;

    fn try_from(name: String) -> Result<Self, Self::Error> {
        PayloadEncoding::parse(&name).map(PayloadEncodingName)
    }
}

impl From<PayloadEncodingName> for String {
    fn from(name: PayloadEncodingName) -> String {
        name.0.name()
    }
}

impl From<PayloadEncoding> for PayloadEncodingName {
    fn from(encoding: PayloadEncoding) -> Self {
        PayloadEncodingName(encoding)
    }
}

impl From<PayloadEncodingName> for PayloadEncoding {
    fn from(name: PayloadEncodingName) -> Self {
        name.0
    }
}

/// One knowledge weight per public row, quantised to u8: level / 255.
///
/// How much the sender knows each public sample of the round's subset, in
/// [0, 1] (1: fully, 0: not at all), for a receiver that weights or filters
/// the sender's rows in its teacher. On the wire it is a byte string, one
/// level per row (bincode: a varint length, then the levels), inside an
/// `Option` of the signed share.
///
/// Every level is a valid weight (0 ≤ level / 255 ≤ 1), so a receiver
/// checks only the count ([`LogitShare::validate`]: one per row, else
/// [`ProtocolError::BadWeights`], code `bad_weights`), never the range; the
/// range is checked where weights are made, by [`RowWeights::quantize`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowWeights(Vec<u8>);

impl RowWeights {
    /// Quantises weights in [0, 1] to levels `(w × 255).round()`, so a
    /// weight comes back ([`Self::to_f32`]) within 1/510 of itself and 0 and
    /// 1 exactly. A weight that is not finite or outside [0, 1] is refused
    /// ([`ProtocolError::InvalidField`] `row_weights`, naming its index and
    /// value) rather than clamped: it is a bug on the sender's side.
    pub fn quantize(weights: &[f32]) -> Result<Self, ProtocolError> {
        weights
            .iter()
            .enumerate()
            .map(|(index, &w)| {
                if w.is_finite() && (0.0..=1.0).contains(&w) {
                    Ok((w * 255.0).round() as u8)
                } else {
                    Err(ProtocolError::InvalidField {
                        field: "row_weights",
                        reason: format!("weight {w} at row {index} is not in [0, 1]"),
                    })
                }
            })
            .collect::<Result<Vec<u8>, _>>()
            .map(RowWeights)
    }

    /// Weights given as their levels (weight = level / 255).
    pub fn from_levels(levels: Vec<u8>) -> Self {
        RowWeights(levels)
    }

    /// The levels, one per row (weight = level / 255).
    pub fn levels(&self) -> &[u8] {
        &self.0
    }

    /// The weights, `level as f32 / 255.0`, each in [0, 1].
    pub fn to_f32(&self) -> Vec<f32> {
        self.0
            .iter()
            .map(|&level| f32::from(level) / 255.0)
            .collect()
    }

    /// Number of weights (rows).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A node's logits on one round's public subset, signed by the node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogitShare {
    pub federation_id: String,
    pub round: u64,
    pub sender: PublicKey,
    pub subset: PublicSubset,
    /// Rows (= subset size).
    pub rows: u32,
    /// Columns (= classes).
    pub classes: u32,
    /// The sender's count of private training samples, for aggregators that
    /// weight members by data size. Self-reported: signed, so it cannot be
    /// changed in transit, but not verifiable by anyone else.
    pub samples: u64,
    pub encoding: PayloadEncoding,
    pub payload: Vec<u8>,
    /// Optional knowledge weight of each row (`rows` of them when present),
    /// signed like the payload. `None`: the sender gives no weights.
    pub row_weights: Option<RowWeights>,
    pub signature: Signature,
}

/// The fields a share is signed over: everything but the signature.
#[derive(Serialize)]
struct SignedFields<'a> {
    federation_id: &'a str,
    round: u64,
    sender: &'a PublicKey,
    subset: &'a PublicSubset,
    rows: u32,
    classes: u32,
    samples: u64,
    encoding: PayloadEncoding,
    payload: &'a [u8],
    row_weights: Option<&'a RowWeights>,
}

/// What a receiver expects of a share in the round it is collecting.
#[derive(Debug, Clone, PartialEq)]
pub struct ShareExpectation {
    pub federation_id: String,
    pub round: u64,
    pub subset: PublicSubset,
    pub classes: u32,
}

/// [`ProtocolError::BadWeights`] unless `weights` has one entry per row.
fn check_weights(weights: Option<&RowWeights>, rows: u32) -> Result<(), ProtocolError> {
    match weights {
        Some(w) if w.len() != rows as usize => {
            Err(ProtocolError::BadWeights { rows, got: w.len() })
        }
        _ => Ok(()),
    }
}

impl LogitShare {
    /// Encodes `logits` (rows × classes, row-major) and signs the share with
    /// `key`, without row weights.
    pub fn new_signed(
        key: &SigningKey,
        federation_id: &str,
        subset: PublicSubset,
        classes: u32,
        samples: u64,
        encoding: PayloadEncoding,
        logits: &[f32],
    ) -> Result<Self, ProtocolError> {
        Self::new_signed_weighted(
            key,
            federation_id,
            subset,
            classes,
            samples,
            encoding,
            logits,
            None,
        )
    }

    /// Encodes `logits` (rows × classes, row-major) and signs the share,
    /// with `row_weights` when given: exactly one per row (`subset.size`),
    /// else [`ProtocolError::BadWeights`], as [`Self::validate`] would say.
    #[allow(clippy::too_many_arguments)]
    pub fn new_signed_weighted(
        key: &SigningKey,
        federation_id: &str,
        subset: PublicSubset,
        classes: u32,
        samples: u64,
        encoding: PayloadEncoding,
        logits: &[f32],
        row_weights: Option<RowWeights>,
    ) -> Result<Self, ProtocolError> {
        check_weights(row_weights.as_ref(), subset.size)?;
        let expected = subset.size as usize * classes as usize;
        if logits.len() != expected {
            return Err(ProtocolError::ShapeMismatch {
                field: "logits",
                expected: format!("{} × {} = {expected} values", subset.size, classes),
                got: format!("{} values", logits.len()),
            });
        }
        let mut share = LogitShare {
            federation_id: federation_id.to_owned(),
            round: subset.round,
            sender: key.public_key(),
            subset,
            rows: subset.size,
            classes,
            samples,
            encoding,
            payload: encoding.encode(logits, classes)?,
            row_weights,
            signature: Signature([0; 64]),
        };
        share.signature = key.sign(&share.signing_bytes()?);
        Ok(share)
    }

    /// The canonical bytes the signature covers.
    pub fn signing_bytes(&self) -> Result<Vec<u8>, ProtocolError> {
        let mut bytes = SIGNING_DOMAIN.to_vec();
        bytes.extend(canonical_bytes(&SignedFields {
            federation_id: &self.federation_id,
            round: self.round,
            sender: &self.sender,
            subset: &self.subset,
            rows: self.rows,
            classes: self.classes,
            samples: self.samples,
            encoding: self.encoding,
            payload: &self.payload,
            row_weights: self.row_weights.as_ref(),
        })?);
        Ok(bytes)
    }

    /// Checks the signature against the claimed sender's key.
    pub fn verify_signature(&self) -> Result<(), ProtocolError> {
        self.sender.verify(&self.signing_bytes()?, &self.signature)
    }

    /// The gate before aggregation: returns the decoded logits
    /// (rows × classes) only if every check passes. The row weights, when
    /// present, are checked for their count only (one per row, before the
    /// signature; [`ProtocolError::BadWeights`]): every u8 level is a weight
    /// in [0, 1], so there is no range to check. Read them from
    /// [`Self::row_weights`] once the share has passed.
    pub fn validate(&self, expect: &ShareExpectation) -> Result<Vec<f32>, ProtocolError> {
        if self.federation_id != expect.federation_id {
            return Err(ProtocolError::WrongFederation {
                expected: expect.federation_id.clone(),
                got: self.federation_id.clone(),
            });
        }
        if self.round != expect.round {
            return Err(ProtocolError::WrongRound {
                expected: expect.round,
                got: self.round,
            });
        }
        if self.subset != expect.subset {
            return Err(ProtocolError::SubsetMismatch(format!(
                "expected {:?}, got {:?}",
                expect.subset, self.subset
            )));
        }
        if self.rows != expect.subset.size || self.classes != expect.classes {
            return Err(ProtocolError::ShapeMismatch {
                field: "rows × classes",
                expected: format!("{} × {}", expect.subset.size, expect.classes),
                got: format!("{} × {}", self.rows, self.classes),
            });
        }
        self.encoding.check_shape(self.classes)?;
        let expected_len = self.encoding.payload_len(self.rows, self.classes);
        // Longer than the round's shape allows: oversize, refused before the
        // signature is checked so a flood of big payloads costs no hashing.
        if self.payload.len() > expected_len {
            return Err(ProtocolError::TooLarge {
                size: self.payload.len(),
                max: expected_len,
            });
        }
        if self.payload.len() != expected_len {
            return Err(ProtocolError::ShapeMismatch {
                field: "payload",
                expected: format!("{expected_len} bytes"),
                got: format!("{} bytes", self.payload.len()),
            });
        }
        check_weights(self.row_weights.as_ref(), self.rows)?;
        self.verify_signature()?;
        self.encoding.decode(&self.payload, self.rows, self.classes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};
    use crate::error::RejectReason;
    use crate::message::Message;
    use proptest::prelude::*;

    fn subset(size: u32) -> PublicSubset {
        PublicSubset {
            public_set_digest: crate::digest::sha256(b"public"),
            seed: 3,
            round: 2,
            size,
        }
    }

    fn expectation(size: u32) -> ShareExpectation {
        ShareExpectation {
            federation_id: "fed".into(),
            round: 2,
            subset: subset(size),
            classes: 3,
        }
    }

    fn share(key: &SigningKey, logits: &[f32]) -> LogitShare {
        share_as(key, PayloadEncoding::F32Le, logits)
    }

    fn share_as(key: &SigningKey, encoding: PayloadEncoding, logits: &[f32]) -> LogitShare {
        LogitShare::new_signed(key, "fed", subset(2), 3, 1234, encoding, logits).unwrap()
    }

    const LOGITS: [f32; 6] = [0.5, -1.0, 2.0, 3.25, 0.0, -7.5];

    fn weighted_share(key: &SigningKey, levels: Vec<u8>) -> LogitShare {
        LogitShare::new_signed_weighted(
            key,
            "fed",
            subset(2),
            3,
            1234,
            PayloadEncoding::F32Le,
            &LOGITS,
            Some(RowWeights::from_levels(levels)),
        )
        .unwrap()
    }

    #[test]
    fn quantize_maps_the_unit_interval_to_levels() {
        let w = RowWeights::quantize(&[0.0, 1.0, 0.5, 0.25, 1.0 / 255.0]).unwrap();
        assert_eq!(w.levels(), [0, 255, 128, 64, 1]);
        assert_eq!(w.len(), 5);
        assert!(!w.is_empty());
        assert_eq!(w.to_f32()[..2], [0.0, 1.0]);
        assert_eq!(w.to_f32()[2], 128.0 / 255.0);
        assert_eq!(RowWeights::from_levels(vec![0, 255, 128]).to_f32()[1], 1.0);
        assert!(RowWeights::quantize(&[]).unwrap().is_empty());
        for (bad, shown) in [(-0.1f32, "-0.1"), (1.5, "1.5"), (f32::NAN, "NaN")] {
            let reason = match RowWeights::quantize(&[0.5, bad]) {
                Err(ProtocolError::InvalidField {
                    field: "row_weights",
                    reason,
                }) => reason,
                other => panic!("{bad}: {other:?}"),
            };
            assert!(
                reason.contains("row 1") && reason.contains(shown),
                "{reason}"
            );
        }
        for bad in [f32::INFINITY, f32::NEG_INFINITY, 1.0 + f32::EPSILON] {
            assert!(RowWeights::quantize(&[bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn weighted_share_round_trips_and_validates() {
        let key = SigningKey::from_seed([7; 32]);
        let weights = RowWeights::quantize(&[1.0, 0.25]).unwrap();
        let s = LogitShare::new_signed_weighted(
            &key,
            "fed",
            subset(2),
            3,
            1234,
            PayloadEncoding::F32Le,
            &LOGITS,
            Some(weights.clone()),
        )
        .unwrap();
        assert_eq!(s.row_weights.as_ref(), Some(&weights));
        let frame = encode(&Message::Share(s.clone())).unwrap();
        let Message::Share(back) = decode(&frame).unwrap() else {
            panic!("not a share")
        };
        assert_eq!(back, s);
        assert_eq!(back.validate(&expectation(2)).unwrap(), LOGITS.to_vec());
        assert_eq!(back.row_weights.unwrap().levels(), [255, 64]);
        let pulled = crate::codec::decode_share(&crate::codec::encode_share(&s).unwrap()).unwrap();
        assert_eq!(pulled, s);
        assert_eq!(pulled.validate(&expectation(2)).unwrap(), LOGITS.to_vec());
        // On the wire: an option tag, the count and one byte per row, just
        // before the signature (a length byte and 64 bytes).
        let unweighted = encode(&Message::Share(share(&key, &LOGITS))).unwrap();
        assert_eq!(frame.len(), unweighted.len() + 3);
        assert_eq!(
            frame[frame.len() - 65 - 4..frame.len() - 65],
            [1, 2, 255, 64]
        );
        assert_eq!(unweighted[unweighted.len() - 66], 0);
    }

    #[test]
    fn row_weights_are_signed() {
        let key = SigningKey::from_seed([7; 32]);
        let s = weighted_share(&key, vec![255, 64]);
        assert!(s.validate(&expectation(2)).is_ok());
        let bad_signature = |t: &LogitShare, what: &str| {
            assert_eq!(
                t.validate(&expectation(2)).unwrap_err().reason(),
                RejectReason::BadSignature,
                "{what}"
            );
        };
        for (row, bit) in [(0, 0x01), (1, 0x01), (1, 0x80)] {
            let mut levels = s.row_weights.as_ref().unwrap().levels().to_vec();
            levels[row] ^= bit;
            let mut t = s.clone();
            t.row_weights = Some(RowWeights::from_levels(levels));
            bad_signature(&t, &format!("level {row} ^ {bit:#x}"));
        }
        let mut t = s.clone();
        t.row_weights = None;
        bad_signature(&t, "weights dropped");
        let mut t = share(&key, &LOGITS);
        t.row_weights = Some(RowWeights::from_levels(vec![255, 255]));
        bad_signature(&t, "weights added");
    }

    #[test]
    fn wrong_number_of_weights_is_bad_weights_before_the_signature() {
        let key = SigningKey::from_seed([7; 32]);
        for levels in [vec![], vec![255], vec![255, 64, 0]] {
            let got = levels.len();
            // Correctly signed or not, the count is refused first.
            let signed = weighted_share(&key, vec![255, 64]);
            let mut t = signed.clone();
            t.row_weights = Some(RowWeights::from_levels(levels.clone()));
            t.signature = Signature([0; 64]);
            let err = t.validate(&expectation(2)).unwrap_err();
            assert_eq!(err, ProtocolError::BadWeights { rows: 2, got });
            assert_eq!(err.reason(), RejectReason::BadWeights);
            assert_eq!(err.reason().as_str(), "bad_weights");
            assert_eq!(
                LogitShare::new_signed_weighted(
                    &key,
                    "fed",
                    subset(2),
                    3,
                    0,
                    PayloadEncoding::F32Le,
                    &LOGITS,
                    Some(RowWeights::from_levels(levels)),
                )
                .unwrap_err(),
                ProtocolError::BadWeights { rows: 2, got }
            );
        }
        // The structural checks before it still come first.
        let mut t = weighted_share(&key, vec![255, 64]);
        t.row_weights = Some(RowWeights::from_levels(vec![255]));
        t.round = 3;
        assert_eq!(
            t.validate(&expectation(2)).unwrap_err().reason(),
            RejectReason::WrongRound
        );
    }

    #[test]
    fn valid_share_round_trips_and_validates() {
        let key = SigningKey::from_seed([7; 32]);
        let s = share(&key, &LOGITS);
        let frame = encode(&Message::Share(s.clone())).unwrap();
        let Message::Share(back) = decode(&frame).unwrap() else {
            panic!("not a share")
        };
        assert_eq!(back, s);
        assert_eq!(back.validate(&expectation(2)).unwrap(), LOGITS.to_vec());
    }

    #[test]
    fn every_flipped_payload_byte_breaks_the_signature() {
        let key = SigningKey::from_seed([7; 32]);
        let s = share(&key, &LOGITS);
        for i in 0..s.payload.len() {
            let mut t = s.clone();
            t.payload[i] ^= 0x01;
            assert_eq!(
                t.validate(&expectation(2)).unwrap_err().reason(),
                RejectReason::BadSignature,
                "byte {i}"
            );
        }
    }

    #[test]
    fn share_signed_by_another_key_is_rejected() {
        let real = SigningKey::from_seed([7; 32]);
        let forger = SigningKey::from_seed([8; 32]);
        let mut s = share(&forger, &LOGITS);
        s.sender = real.public_key();
        assert!(matches!(
            s.validate(&expectation(2)),
            Err(ProtocolError::BadSignature { sender }) if sender == real.public_key()
        ));
    }

    #[test]
    fn structural_checks_name_the_problem() {
        let key = SigningKey::from_seed([7; 32]);
        let s = share(&key, &LOGITS);
        let mut e = expectation(2);
        e.round = 3;
        assert_eq!(
            s.validate(&e).unwrap_err().reason(),
            RejectReason::WrongRound
        );
        let mut e = expectation(2);
        e.federation_id = "other".into();
        assert_eq!(
            s.validate(&e).unwrap_err().reason(),
            RejectReason::WrongFederation
        );
        let mut e = expectation(2);
        e.subset.seed = 4;
        assert_eq!(s.validate(&e).unwrap_err().reason(), RejectReason::Subset);
        let mut e = expectation(2);
        e.classes = 4;
        assert_eq!(s.validate(&e).unwrap_err().reason(), RejectReason::Shape);
        let mut t = s.clone();
        t.payload.pop();
        assert_eq!(
            t.validate(&expectation(2)).unwrap_err().reason(),
            RejectReason::Shape
        );
        let mut t = s.clone();
        t.payload.extend_from_slice(&[0; 4]);
        assert_eq!(
            t.validate(&expectation(2)).unwrap_err().reason(),
            RejectReason::TooLarge
        );
        assert!(matches!(
            LogitShare::new_signed(&key, "fed", subset(2), 3, 0, PayloadEncoding::F32Le, &[1.0]),
            Err(ProtocolError::ShapeMismatch {
                field: "logits",
                ..
            })
        ));
    }

    #[test]
    fn non_finite_logits_are_rejected_even_when_signed() {
        let key = SigningKey::from_seed([7; 32]);
        let mut bad = LOGITS;
        bad[4] = f32::NAN;
        let s = share(&key, &bad);
        assert_eq!(
            s.validate(&expectation(2)).unwrap_err(),
            ProtocolError::NonFinite { index: 4 }
        );
        bad[4] = f32::INFINITY;
        assert_eq!(
            share(&key, &bad)
                .validate(&expectation(2))
                .unwrap_err()
                .reason(),
            RejectReason::NonFinite
        );
    }

    const ALL: [PayloadEncoding; 5] = [
        PayloadEncoding::F32Le,
        PayloadEncoding::F16Le,
        PayloadEncoding::Int8,
        PayloadEncoding::TopK { k: 1 },
        PayloadEncoding::TopK { k: 2 },
    ];

    fn f16_bytes(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    fn softmax(row: &[f32]) -> Vec<f64> {
        let mut p = vec![0.0; row.len()];
        softmax_into(row, &mut p);
        p
    }

    fn invalid_field(result: Result<Vec<f32>, ProtocolError>, field: &str) -> String {
        match result {
            Err(ProtocolError::InvalidField { field: f, reason }) if f == field => reason,
            other => panic!("expected InvalidField {{ field: {field} }}, got {other:?}"),
        }
    }

    #[test]
    fn every_encoding_validates_and_signs_samples_and_encoding() {
        let key = SigningKey::from_seed([7; 32]);
        for encoding in ALL {
            let s = share_as(&key, encoding, &LOGITS);
            assert_eq!(s.samples, 1234);
            let frame = encode(&Message::Share(s.clone())).unwrap();
            assert_eq!(decode(&frame).unwrap(), Message::Share(s.clone()));
            assert_eq!(
                s.validate(&expectation(2)).unwrap(),
                encoding.decode(&s.payload, 2, 3).unwrap(),
                "{encoding}"
            );
            let mut t = s.clone();
            t.samples += 1;
            assert_eq!(
                t.validate(&expectation(2)).unwrap_err().reason(),
                RejectReason::BadSignature,
                "samples is signed ({encoding})"
            );
        }
        // With 4 classes an f16 row and an int8 row are both 8 bytes: relabelling
        // the encoding passes the length check, so only the signature stops it.
        let mut e = expectation(1);
        e.classes = 4;
        let logits = [1.0, -2.0, 0.5, 3.0];
        let mut s = LogitShare::new_signed(
            &key,
            "fed",
            subset(1),
            4,
            0,
            PayloadEncoding::F16Le,
            &logits,
        )
        .unwrap();
        assert_eq!(s.validate(&e).unwrap(), logits.to_vec());
        s.encoding = PayloadEncoding::Int8;
        assert_eq!(
            s.validate(&e).unwrap_err().reason(),
            RejectReason::BadSignature
        );
    }

    #[test]
    fn impossible_encoding_is_refused_before_the_signature() {
        let key = SigningKey::from_seed([7; 32]);
        let mut s = share_as(&key, PayloadEncoding::TopK { k: 3 }, &LOGITS);
        s.encoding = PayloadEncoding::TopK { k: 4 };
        s.payload = vec![0; 2 * 4 * 3];
        s.signature = Signature([0; 64]);
        let reason = match s.validate(&expectation(2)) {
            Err(ProtocolError::InvalidField {
                field: "encoding",
                reason,
            }) => reason,
            other => panic!("{other:?}"),
        };
        assert!(reason.contains("k = 4"), "{reason}");
    }

    #[test]
    fn wire_tags_of_encodings_are_stable() {
        // F32Le keeps the tag it had before the other encodings existed, so
        // adding them did not change the bytes of an f32 share.
        let tags: Vec<Vec<u8>> = [
            PayloadEncoding::F32Le,
            PayloadEncoding::F16Le,
            PayloadEncoding::Int8,
            PayloadEncoding::TopK { k: 5 },
        ]
        .iter()
        .map(|e| canonical_bytes(e).unwrap())
        .collect();
        assert_eq!(tags, vec![vec![0], vec![1], vec![2], vec![3, 5]]);
    }

    #[test]
    fn names_parse_and_print() {
        for (name, encoding) in [
            ("f32", PayloadEncoding::F32Le),
            ("f16", PayloadEncoding::F16Le),
            ("int8", PayloadEncoding::Int8),
            ("top-k:5", PayloadEncoding::TopK { k: 5 }),
            ("top-k:256", PayloadEncoding::TopK { k: 256 }),
        ] {
            assert_eq!(PayloadEncoding::parse(name).unwrap(), encoding);
            assert_eq!(name.parse::<PayloadEncoding>().unwrap(), encoding);
            assert_eq!(encoding.name(), name);
            assert_eq!(encoding.to_string(), name);
            assert_eq!(String::from(PayloadEncodingName(encoding)), name);
        }
        for bad in [
            "",
            "f64",
            "F32",
            "top-k",
            "top-k:",
            "top-k:0",
            "top-k:257",
            "top-k:x",
            "top-k:-1",
        ] {
            assert!(
                matches!(
                    PayloadEncoding::parse(bad),
                    Err(ProtocolError::InvalidField {
                        field: "encoding",
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn encoding_name_deserializes_from_a_string() {
        use serde::de::IntoDeserializer;
        use serde::de::value::{Error, StrDeserializer};
        let from = |s: &'static str| {
            PayloadEncodingName::deserialize::<StrDeserializer<'_, Error>>(s.into_deserializer())
        };
        assert_eq!(
            from("top-k:3").unwrap(),
            PayloadEncodingName(PayloadEncoding::TopK { k: 3 })
        );
        assert_eq!(from("int8").unwrap().0, PayloadEncoding::Int8);
        let err = from("top-k:0").unwrap_err().to_string();
        assert!(err.contains("encoding"), "{err}");
        assert_eq!(PayloadEncodingName::default().0, PayloadEncoding::F32Le);
    }

    #[test]
    fn int8_layout_and_zero_row() {
        let payload = PayloadEncoding::Int8
            .encode(&[1.27, -0.635, 0.0, 0.0, 0.0, 0.0], 3)
            .unwrap();
        let scale = 1.27f32 / 127.0;
        let mut want = scale.to_le_bytes().to_vec();
        want.extend([127u8, (-64i8) as u8, 0]);
        want.extend(0f32.to_le_bytes());
        want.extend([0, 0, 0]);
        assert_eq!(payload, want);
        let back = PayloadEncoding::Int8.decode(&payload, 2, 3).unwrap();
        assert_eq!(back[3..], [0.0; 3]);
        assert_eq!(back[0], 127.0 * scale);
    }

    #[test]
    fn top_k_layout_and_reconstruction() {
        // p = [1/2, 1/4, 1/8, 1/8], all exact in f16.
        let p = [0.5f32, 0.25, 0.125, 0.125];
        let logits: Vec<f32> = p.iter().map(|v| v.ln()).collect();
        let encoding = PayloadEncoding::TopK { k: 2 };
        let payload = encoding.encode(&logits, 4).unwrap();
        let mut want = vec![0u8];
        want.extend(f16_bytes(0.5));
        want.push(1);
        want.extend(f16_bytes(0.25));
        assert_eq!(payload, want);
        let back = encoding.decode(&payload, 1, 4).unwrap();
        for (b, p) in back.iter().zip(p) {
            assert!((b.exp() - p).abs() < 1e-6, "{back:?}");
        }
        // k = classes keeps everything; a class with no mass gets the floor.
        let all = PayloadEncoding::TopK { k: 3 };
        let mut payload = vec![2u8];
        payload.extend(f16_bytes(1.0));
        payload.push(0);
        payload.extend(f16_bytes(0.0));
        payload.push(1);
        payload.extend(f16_bytes(0.0));
        let back = all.decode(&payload, 1, 3).unwrap();
        assert_eq!(
            back,
            vec![(1e-12f64).ln() as f32, (1e-12f64).ln() as f32, 0.0]
        );
    }

    #[test]
    fn lossless_and_lossy_encoders_treat_non_finite_input_as_documented() {
        // f32 is bit-exact: the receiver, not the sender, rejects NaN.
        let nan = [0.0, f32::NAN, 1.0];
        let payload = PayloadEncoding::F32Le.encode(&nan, 3).unwrap();
        assert_eq!(
            PayloadEncoding::F32Le.decode(&payload, 1, 3),
            Err(ProtocolError::NonFinite { index: 1 })
        );
        let payload = PayloadEncoding::F16Le.encode(&nan, 3).unwrap();
        assert_eq!(
            PayloadEncoding::F16Le.decode(&payload, 1, 3),
            Err(ProtocolError::NonFinite { index: 1 })
        );
        let row2 = [0.0, 1.0, 2.0, 3.0, f32::INFINITY, 5.0];
        for encoding in [PayloadEncoding::Int8, PayloadEncoding::TopK { k: 2 }] {
            assert_eq!(
                encoding.encode(&row2, 3),
                Err(ProtocolError::NonFinite { index: 4 }),
                "{encoding}"
            );
        }
        let reason = match PayloadEncoding::F16Le.encode(&[1.0, 70000.0], 2) {
            Err(ProtocolError::InvalidField {
                field: "logits",
                reason,
            }) => reason,
            other => panic!("{other:?}"),
        };
        assert!(reason.contains("position 1"), "{reason}");
        for encoding in ALL {
            assert!(matches!(
                encoding.encode(&[1.0; 4], 3),
                Err(ProtocolError::ShapeMismatch {
                    field: "logits",
                    ..
                })
            ));
            assert!(matches!(
                encoding.encode(&[], 0),
                Err(ProtocolError::InvalidField {
                    field: "classes",
                    ..
                })
            ));
        }
    }

    #[test]
    fn top_k_shape_limits() {
        let k4 = PayloadEncoding::TopK { k: 4 };
        assert!(
            invalid_field(k4.encode(&[0.0; 3], 3).map(|_| vec![]), "encoding").contains("k = 4")
        );
        assert!(invalid_field(k4.decode(&[0; 12], 1, 3), "encoding").contains("k = 4"));
        let k0 = PayloadEncoding::TopK { k: 0 };
        invalid_field(k0.decode(&[], 1, 3), "encoding");
        let k1 = PayloadEncoding::TopK { k: 1 };
        invalid_field(k1.encode(&[0.0; 257], 257).map(|_| vec![]), "classes");
        invalid_field(k1.decode(&[0; 3], 1, 257), "classes");
        // 256 classes is the most one byte of index can address, and works.
        let logits: Vec<f32> = (0..256).map(|i| i as f32 / 64.0).collect();
        let payload = k1.encode(&logits, 256).unwrap();
        assert_eq!(payload[0], 255);
        assert_eq!(k1.decode(&payload, 1, 256).unwrap().len(), 256);
    }

    #[test]
    fn wrong_payload_length_is_a_shape_error_for_every_encoding() {
        for encoding in ALL {
            let good = encoding.encode(&LOGITS, 3).unwrap();
            assert_eq!(good.len(), encoding.payload_len(2, 3));
            for bad in [&good[..good.len() - 1], &good[..0]] {
                assert!(
                    matches!(
                        encoding.decode(bad, 2, 3),
                        Err(ProtocolError::ShapeMismatch {
                            field: "payload",
                            ..
                        })
                    ),
                    "{encoding}"
                );
            }
            let mut long = good.clone();
            long.push(0);
            assert!(encoding.decode(&long, 2, 3).is_err(), "{encoding}");
        }
        // Absurd claimed shapes neither overflow nor allocate.
        assert_eq!(
            PayloadEncoding::F32Le.payload_len(u32::MAX, u32::MAX),
            usize::MAX
        );
        assert!(
            PayloadEncoding::F32Le
                .decode(&[0; 4], u32::MAX, u32::MAX)
                .is_err()
        );
    }

    #[test]
    fn malformed_int8_rows_are_rejected() {
        let row = |scale: f32, values: [i8; 3]| {
            let mut p = scale.to_le_bytes().to_vec();
            p.extend(values.map(|v| v as u8));
            p
        };
        let int8 = PayloadEncoding::Int8;
        let mut two = row(0.5, [1, 2, 3]);
        two.extend(row(f32::NAN, [1, 2, 3]));
        assert_eq!(
            int8.decode(&two, 2, 3),
            Err(ProtocolError::NonFinite { index: 3 })
        );
        assert_eq!(
            int8.decode(&row(f32::INFINITY, [0; 3]), 1, 3),
            Err(ProtocolError::NonFinite { index: 0 })
        );
        // A finite scale whose product overflows.
        assert_eq!(
            int8.decode(&row(f32::MAX, [0, 0, 127]), 1, 3),
            Err(ProtocolError::NonFinite { index: 2 })
        );
        assert!(
            invalid_field(int8.decode(&row(-0.5, [1, 2, 3]), 1, 3), "payload").contains("negative")
        );
        assert!(
            invalid_field(int8.decode(&row(0.5, [1, -128, 3]), 1, 3), "payload")
                .contains("position 1")
        );
        assert_eq!(
            int8.decode(&row(0.5, [1, -127, 3]), 1, 3).unwrap(),
            vec![0.5, -63.5, 1.5]
        );
    }

    #[test]
    fn malformed_top_k_rows_are_rejected() {
        let k2 = PayloadEncoding::TopK { k: 2 };
        let pairs = |pairs: [(u8, f32); 2]| {
            let mut p = Vec::new();
            for (class, prob) in pairs {
                p.push(class);
                p.extend(f16_bytes(prob));
            }
            p
        };
        assert!(k2.decode(&pairs([(2, 0.6), (0, 0.3)]), 1, 3).is_ok());
        assert!(
            invalid_field(k2.decode(&pairs([(3, 0.6), (0, 0.3)]), 1, 3), "payload")
                .contains("class index 3")
        );
        assert!(
            invalid_field(k2.decode(&pairs([(1, 0.6), (1, 0.3)]), 1, 3), "payload")
                .contains("twice")
        );
        assert_eq!(
            k2.decode(&pairs([(2, 0.6), (1, f32::NAN)]), 1, 3),
            Err(ProtocolError::NonFinite { index: 1 })
        );
        let mut two_rows = pairs([(2, 0.6), (0, 0.3)]);
        two_rows.extend(pairs([(0, f32::INFINITY), (1, 0.3)]));
        assert_eq!(
            k2.decode(&two_rows, 2, 3),
            Err(ProtocolError::NonFinite { index: 3 })
        );
        assert!(
            invalid_field(k2.decode(&pairs([(2, 1.5), (0, 0.0)]), 1, 3), "payload")
                .contains("outside [0, 1]")
        );
        assert!(
            invalid_field(k2.decode(&pairs([(2, 0.5), (0, -0.1)]), 1, 3), "payload")
                .contains("outside [0, 1]")
        );
        assert!(
            invalid_field(k2.decode(&pairs([(2, 0.6), (0, 0.5)]), 1, 3), "payload").contains("sum")
        );
        // Within the f16 slack: two halves rounded up are still accepted, and
        // the class not kept gets the floor rather than negative mass.
        let back = k2.decode(&pairs([(2, 0.5005), (0, 0.5005)]), 1, 3).unwrap();
        assert_eq!(back[1], (1e-12f64).ln() as f32);
    }

    proptest! {
        #[test]
        fn f16_round_trip_within_relative_1e_3(
            (classes, values) in (1u32..8).prop_flat_map(|c| (Just(c), proptest::collection::vec(-65000f32..65000.0, (c as usize)..=(4 * c as usize)))),
        ) {
            let values = &values[..values.len() / classes as usize * classes as usize];
            let rows = (values.len() / classes as usize) as u32;
            let payload = PayloadEncoding::F16Le.encode(values, classes).unwrap();
            prop_assert_eq!(payload.len(), PayloadEncoding::F16Le.payload_len(rows, classes));
            let back = PayloadEncoding::F16Le.decode(&payload, rows, classes).unwrap();
            for (v, b) in values.iter().zip(&back) {
                // Relative for normal halves, absolute 2⁻²⁴ below them (subnormals).
                prop_assert!((v - b).abs() <= 1e-3 * v.abs() + 6e-8, "{} → {}", v, b);
            }
        }

        #[test]
        fn int8_round_trip_within_half_a_step(
            (classes, values) in (1u32..12).prop_flat_map(|c| (Just(c), proptest::collection::vec(prop_oneof![-1e4f32..1e4, -1f32..1.0, Just(0.0)], (c as usize)..=(4 * c as usize)))),
        ) {
            let values = &values[..values.len() / classes as usize * classes as usize];
            let width = classes as usize;
            let rows = (values.len() / width) as u32;
            let payload = PayloadEncoding::Int8.encode(values, classes).unwrap();
            prop_assert_eq!(payload.len(), PayloadEncoding::Int8.payload_len(rows, classes));
            let back = PayloadEncoding::Int8.decode(&payload, rows, classes).unwrap();
            for (r, (row, got)) in values.chunks(width).zip(back.chunks(width)).enumerate() {
                let at = r * (4 + width);
                let scale = f32::from_le_bytes(payload[at..at + 4].try_into().unwrap());
                let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                prop_assert_eq!(scale, max / 127.0);
                for (v, b) in row.iter().zip(got) {
                    // scale / 2 from quantisation, plus the last bit of the f32 product.
                    let bound = f64::from(scale) / 2.0 + f64::from(v.abs()) * f64::from(f32::EPSILON);
                    prop_assert!((f64::from(*v) - f64::from(*b)).abs() <= bound, "{} → {} (scale {})", v, b, scale);
                }
            }
        }

        #[test]
        fn top_k_keeps_the_largest_probabilities_and_conserves_mass(
            (classes, k, values) in (1u32..24).prop_flat_map(|c| (Just(c), 1..=c as u16, proptest::collection::vec(-20f32..20.0, (c as usize)..=(3 * c as usize)))),
        ) {
            let values = &values[..values.len() / classes as usize * classes as usize];
            let width = classes as usize;
            let k_us = usize::from(k);
            let rows = (values.len() / width) as u32;
            let encoding = PayloadEncoding::TopK { k };
            let payload = encoding.encode(values, classes).unwrap();
            prop_assert_eq!(payload.len(), encoding.payload_len(rows, classes));
            let back = encoding.decode(&payload, rows, classes).unwrap();
            prop_assert_eq!(back.len(), values.len());
            for (r, (row, got)) in values.chunks(width).zip(back.chunks(width)).enumerate() {
                let p = softmax(row);
                let recon: Vec<f64> = got.iter().map(|l| f64::from(*l).exp()).collect();
                let kept: Vec<usize> = payload[r * 3 * k_us..(r + 1) * 3 * k_us].chunks(3).map(|c| usize::from(c[0])).collect();
                let dropped: Vec<usize> = (0..width).filter(|c| !kept.contains(c)).collect();
                for &c in &kept {
                    // Within f16 precision (plus the floor and the f32 log).
                    prop_assert!((recon[c] - p[c]).abs() <= p[c] * 1e-3 + 1e-7, "class {}: {} vs {}", c, recon[c], p[c]);
                    // The kept classes are the most probable ones.
                    for &d in &dropped {
                        prop_assert!(p[c] >= p[d] - 1e-12, "kept {} ({}) below dropped {} ({})", c, p[c], d, p[d]);
                    }
                }
                if let Some(&d0) = dropped.first() {
                    let rest: f64 = dropped.iter().map(|&d| p[d]).sum();
                    for &d in &dropped {
                        prop_assert_eq!(got[d], got[d0], "the rest is spread evenly");
                    }
                    prop_assert!((recon[d0] * dropped.len() as f64 - rest).abs() <= 1e-3 + 1e-12 * width as f64);
                }
                // Mass conserved: the decoded logits are a distribution's logs,
                // so their softmax is the reconstruction itself.
                let total: f64 = recon.iter().sum();
                prop_assert!((total - 1.0).abs() <= 1e-3, "mass {}", total);
                let soft = softmax(got);
                for (s, q) in soft.iter().zip(&recon) {
                    prop_assert!((s - q).abs() <= 1e-3 * q + 1e-9, "{} vs {}", s, q);
                }
            }
        }

        #[test]
        fn signed_shares_round_trip_in_every_encoding(
            values in proptest::collection::vec(-30f32..30.0, 6),
            samples in any::<u64>(),
            which in 0usize..ALL.len(),
            weights in proptest::option::of(proptest::collection::vec(0f32..=1.0, 2)),
        ) {
            let key = SigningKey::from_seed([9; 32]);
            let encoding = ALL[which];
            let row_weights = weights.as_deref().map(|w| RowWeights::quantize(w).unwrap());
            let s = LogitShare::new_signed_weighted(&key, "fed", subset(2), 3, samples, encoding, &values, row_weights.clone()).unwrap();
            let frame = encode(&Message::Share(s.clone())).unwrap();
            let Message::Share(back) = decode(&frame).unwrap() else { panic!("not a share") };
            prop_assert_eq!(back.samples, samples);
            prop_assert_eq!(&back.row_weights, &row_weights);
            if let (Some(w), Some(q)) = (&weights, &row_weights) {
                for (w, back) in w.iter().zip(q.to_f32()) {
                    prop_assert!((w - back).abs() <= 0.5 / 255.0 + 1e-6, "{} → {}", w, back);
                }
            }
            let decoded = back.validate(&expectation(2)).unwrap();
            prop_assert_eq!(decoded.len(), 6);
            prop_assert!(decoded.iter().all(|v| v.is_finite()));
            prop_assert_eq!(decoded, encoding.decode(&s.payload, 2, 3).unwrap());
        }

        #[test]
        fn decoding_arbitrary_payloads_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
            rows in 0u32..4,
            classes in 0u32..5,
            which in 0usize..ALL.len(),
        ) {
            if let Ok(values) = ALL[which].decode(&bytes, rows, classes) {
                prop_assert_eq!(values.len(), (rows * classes) as usize);
                prop_assert!(values.iter().all(|v| v.is_finite()));
            }
        }

        #[test]
        fn encode_decode_round_trip(
            values in proptest::collection::vec(-1e6f32..1e6, 6),
            seed in any::<[u8; 32]>(),
            levels in proptest::option::of(proptest::collection::vec(any::<u8>(), 2)),
        ) {
            let key = SigningKey::from_seed(seed);
            let row_weights = levels.map(RowWeights::from_levels);
            let s = LogitShare::new_signed_weighted(&key, "fed", subset(2), 3, 1234, PayloadEncoding::F32Le, &values, row_weights).unwrap();
            let frame = encode(&Message::Share(s.clone())).unwrap();
            prop_assert_eq!(decode(&frame).unwrap(), Message::Share(s.clone()));
            prop_assert_eq!(s.validate(&expectation(2)).unwrap(), values);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut frame = crate::codec::PROTOCOL_VERSION.to_le_bytes().to_vec();
            frame.extend(bytes);
            let _ = decode(&frame);
        }
    }
}
