//! The checks behind the cargo-fuzz targets in `fuzz/` and their corpus
//! replay test (`protocol/fuzzing/tests/fuzz_corpus.rs`).
//!
//! Why a crate of its own: the nightly fuzzer and the stable test suite must
//! run exactly the same code (every input the fuzzer keeps in `fuzz/corpus/`
//! is replayed by `cargo test` on stable), but these are panicking oracles
//! with a fixed, public signing key, so they must not be compiled into the
//! production `fd-protocol` that every binary links. `fuzz/` itself is
//! nightly-only and outside the workspace, so it cannot hold them either.
//! Nothing but `fuzz/` and this crate's tests depends on it.
//!
//! Each check panics when an invariant breaks and returns normally otherwise
//! (rejecting an input is normal). It uses only `fd-protocol`'s public API.
//!
//! - [`check_decode`] (target `decode_message`): arbitrary bytes as a frame
//!   and as a share encoded on its own (the chunked-transfer form).
//! - [`check_share_mutation`] (target `share_verify`): a valid signed share
//!   (one per encoding, and one with row weights) with the input applied as
//!   edits to its frame or to its own encoding.
//!
//! The fixed federation both targets expect a share from is
//! [`expectation`]; [`signing_key`] signs the shares in the seed inputs
//! ([`seed_inputs`]), so a seed can get past the signature check and reach
//! the payload decoders.

use std::sync::OnceLock;

use fd_protocol::codec::{decode, decode_share, encode, encode_share};
use fd_protocol::control::{Control, SignedControl};
use fd_protocol::digest::sha256;
use fd_protocol::identity::{Signature, SigningKey};
use fd_protocol::message::*;
use fd_protocol::share::{LogitShare, PayloadEncoding, PublicSubset, RowWeights, ShareExpectation};
use fd_protocol::transfer::{CHUNK_BYTES, MAX_CHUNKS, ShareAnnouncement};

/// Federation id of the fixed [`expectation`].
pub const FEDERATION_ID: &str = "fd-fuzz";
/// Round of the fixed [`expectation`].
pub const ROUND: u64 = 7;
/// Rows (subset size) of the fixed [`expectation`].
pub const ROWS: u32 = 2;
/// Classes of the fixed [`expectation`].
pub const CLASSES: u32 = 3;
/// Seed of the key that signs the fixed shares.
pub const KEY_SEED: [u8; 32] = [0x5e; 32];
/// The logits of the fixed shares, rows × classes.
pub const LOGITS: [f32; 6] = [0.5, -1.0, 2.0, 3.25, 0.0, -7.5];
/// The encodings of the fixed unweighted shares, in the order a
/// `share_verify` input chooses them with its first byte.
pub const ENCODINGS: [PayloadEncoding; 6] = [
    PayloadEncoding::F32Le,
    PayloadEncoding::F16Le,
    PayloadEncoding::Int8,
    PayloadEncoding::TopK { k: 1 },
    PayloadEncoding::TopK { k: 2 },
    PayloadEncoding::TopK { k: 3 },
];
/// The row weights of the fixed weighted share (f32 logits), one per row.
pub const WEIGHTS: [f32; ROWS as usize] = [1.0, 0.25];
/// Number of fixed shares a `share_verify` input chooses from: one per
/// [`ENCODINGS`] entry, then the weighted one.
pub const SHARES: usize = ENCODINGS.len() + 1;

/// The round subset of the fixed [`expectation`].
pub fn subset() -> PublicSubset {
    PublicSubset {
        public_set_digest: sha256(b"fd-fuzz public set"),
        seed: 42,
        round: ROUND,
        size: ROWS,
    }
}

/// What the fuzz targets' receiver expects of a share.
pub fn expectation() -> ShareExpectation {
    ShareExpectation {
        federation_id: FEDERATION_ID.into(),
        round: ROUND,
        subset: subset(),
        classes: CLASSES,
    }
}

/// The key that signs the fixed shares.
pub fn signing_key() -> SigningKey {
    SigningKey::from_seed(KEY_SEED)
}

/// A share for the fixed [`expectation`] carrying `payload` as it is
/// (valid or not), without row weights, correctly signed by [`signing_key`].
pub fn signed_with_payload(encoding: PayloadEncoding, payload: Vec<u8>) -> LogitShare {
    signed_with(encoding, payload, None)
}

/// A share for the fixed [`expectation`] carrying `payload` and
/// `row_weights` as they are (valid or not: any number of weights),
/// correctly signed by [`signing_key`].
pub fn signed_with(
    encoding: PayloadEncoding,
    payload: Vec<u8>,
    row_weights: Option<RowWeights>,
) -> LogitShare {
    let key = signing_key();
    let mut share = LogitShare {
        federation_id: FEDERATION_ID.into(),
        round: ROUND,
        sender: key.public_key(),
        subset: subset(),
        rows: ROWS,
        classes: CLASSES,
        samples: 1000,
        encoding,
        payload,
        row_weights,
        signature: Signature([0; 64]),
    };
    share.signature = key.sign(&share.signing_bytes().expect("a small share encodes"));
    share
}

/// One original share of `share_verify`: its name in seed inputs, the share,
/// its frame, its own encoding ([`encode_share`]) and its decoded logits.
struct Original {
    name: String,
    share: LogitShare,
    frame: Vec<u8>,
    standalone: Vec<u8>,
    logits: Vec<f32>,
}

/// The [`SHARES`] valid signed shares of [`LOGITS`]: one per [`ENCODINGS`]
/// entry without row weights, then f32 with [`WEIGHTS`]; built (and signed)
/// once per process.
fn originals() -> &'static [Original] {
    static ORIGINALS: OnceLock<Vec<Original>> = OnceLock::new();
    ORIGINALS.get_or_init(|| {
        let weights = RowWeights::quantize(&WEIGHTS).expect("the fixed weights quantise");
        ENCODINGS
            .iter()
            .map(|&encoding| (encoding, None))
            .chain([(PayloadEncoding::F32Le, Some(weights))])
            .map(|(encoding, row_weights)| {
                let mut name = encoding.name().replace(':', "");
                if row_weights.is_some() {
                    name.push_str("-weighted");
                }
                let payload = encoding
                    .encode(&LOGITS, CLASSES)
                    .expect("the fixed logits encode");
                let share = signed_with(encoding, payload, row_weights);
                let frame = encode(&Message::Share(share.clone())).expect("the share encodes");
                let standalone = encode_share(&share).expect("the share encodes");
                let logits = share
                    .validate(&expectation())
                    .expect("the original share validates");
                Original {
                    name,
                    share,
                    frame,
                    standalone,
                    logits,
                }
            })
            .collect()
    })
}

/// Target `decode_message`: `bytes` as a received frame ([`decode`]) and as
/// a pulled share ([`decode_share`]).
///
/// Invariants:
/// - neither decoder panics;
/// - a decoded message re-encodes, the re-encoding decodes, and encoding that
///   again gives the same bytes (round trip, bit-exact so NaN metrics count);
///   the two decoded messages are equal (up to NaN ≠ NaN); the same for a
///   share decoded on its own;
/// - for a share (either way): [`LogitShare::validate`] against
///   [`expectation`] either rejects it or returns rows × classes finite
///   logits equal to what the payload decoder gives for the expected shape,
///   and the share it accepts has no row weights or one per row;
///   and the payload decoder run with the share's own claimed shape (no
///   signature needed, so the fuzzer reaches it with any payload) returns
///   rows × classes finite values or an error;
/// - for a `ShareAvailable` announcement that passes its
///   [`ShareAnnouncement::check`]: between 1 and [`MAX_CHUNKS`] chunks, each
///   1 to [`CHUNK_BYTES`] long, that add up to the announced size.
pub fn check_decode(bytes: &[u8]) {
    if let Ok(share) = decode_share(bytes) {
        let encoded = encode_share(&share).expect("a decoded share re-encodes");
        let again = decode_share(&encoded).expect("a re-encoded share decodes");
        assert_eq!(again, share, "share round trip changed the share");
        assert_eq!(
            encode_share(&again).expect("a decoded share re-encodes"),
            encoded,
            "encode_share ∘ decode_share is not stable"
        );
        check_share(&share);
    }
    let Ok(message) = decode(bytes) else {
        return;
    };
    let frame = encode(&message).expect("a decoded message re-encodes");
    let again = decode(&frame).expect("a re-encoded message decodes");
    assert_eq!(
        encode(&again).expect("a decoded message re-encodes"),
        frame,
        "encode ∘ decode is not stable"
    );
    if again != message {
        // Only NaN (which is not equal to itself) may tell them apart.
        assert_eq!(
            format!("{again:?}"),
            format!("{message:?}"),
            "round trip changed the message"
        );
    }
    match &message {
        Message::Share(share) => check_share(share),
        Message::ShareAvailable(announcement) => check_announcement(announcement),
        _ => {}
    }
}

fn check_announcement(announcement: &ShareAnnouncement) {
    if announcement.check(FEDERATION_ID).is_err() {
        return;
    }
    let chunks = announcement.chunks();
    assert!(
        (1..=MAX_CHUNKS).contains(&chunks),
        "{chunks} chunks for {} bytes",
        announcement.bytes
    );
    let full = u64::from(chunks - 1) * CHUNK_BYTES as u64;
    for index in 0..chunks - 1 {
        assert_eq!(announcement.chunk_len(index), Some(CHUNK_BYTES));
    }
    let last = announcement
        .chunk_len(chunks - 1)
        .expect("the last chunk exists");
    assert!((1..=CHUNK_BYTES).contains(&last));
    assert_eq!(
        full + last as u64,
        announcement.bytes,
        "chunks do not add up"
    );
    assert_eq!(announcement.chunk_len(chunks), None);
    assert_eq!(announcement.chunk_len(u32::MAX), None);
}

fn check_share(share: &LogitShare) {
    let expect = expectation();
    if let Ok(logits) = share.validate(&expect) {
        assert_eq!(logits.len(), (ROWS * CLASSES) as usize);
        assert_finite(&logits);
        let direct = share
            .encoding
            .decode(&share.payload, ROWS, CLASSES)
            .expect("a validated payload decodes");
        assert_eq!(bits(&direct), bits(&logits));
        if let Some(weights) = &share.row_weights {
            assert_eq!(weights.len(), ROWS as usize, "validated weights per row");
            assert!(weights.to_f32().iter().all(|w| (0.0..=1.0).contains(w)));
        }
    }
    if let Ok(values) = share
        .encoding
        .decode(&share.payload, share.rows, share.classes)
    {
        assert_eq!(
            values.len() as u64,
            u64::from(share.rows) * u64::from(share.classes),
            "decoder returned the wrong number of values"
        );
        assert_finite(&values);
    }
}

fn assert_finite(values: &[f32]) {
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        panic!("decoder returned non-finite value {} at {i}", values[i]);
    }
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// Target `share_verify`: `(bytes[0] & 0x7f) % SHARES` picks one of the
/// fixed valid signed shares (one per [`ENCODINGS`] entry, then the f32
/// share with [`WEIGHTS`]) and `bytes[0] >= 128` its form: a
/// `Message::Share` frame below 128, the share's own encoding
/// ([`encode_share`], as pulled in chunks) from 128. The rest of the input
/// are edits applied to those bytes (see [`mutate`]); the edited bytes then go
/// through [`check_decode`] and through decoding in the same form +
/// [`LogitShare::validate`].
///
/// Invariant: edited bytes are accepted only if they decode to exactly the
/// original share (same fields, payload and signature) and yield exactly the
/// original logits: a signature never verifies over changed content.
pub fn check_share_mutation(bytes: &[u8]) {
    let Some((&which, edits)) = bytes.split_first() else {
        return;
    };
    let original = &originals()[usize::from(which & 0x7f) % SHARES];
    let standalone = which >= 128;
    let edited = mutate(
        if standalone {
            &original.standalone
        } else {
            &original.frame
        },
        edits,
    );
    check_decode(&edited);
    let share = if standalone {
        decode_share(&edited).ok()
    } else {
        match decode(&edited) {
            Ok(Message::Share(share)) => Some(share),
            _ => None,
        }
    };
    let Some(share) = share else {
        return;
    };
    if let Ok(logits) = share.validate(&expectation()) {
        assert_eq!(
            share, original.share,
            "an edited share was accepted with changed content"
        );
        assert_eq!(bits(&logits), bits(&original.logits));
    }
}

/// Applies `edits` to a copy of `frame`. The edits are a sequence of
/// operations, each an opcode byte (taken modulo 6) and its arguments; a
/// position is a little-endian u16 taken modulo the frame length (plus one
/// where the end is a valid position). The edits stop where the input does.
///
/// | op | arguments | effect |
/// |---|---|---|
/// | 0 | pos, mask | XOR the byte at pos with mask |
/// | 1 | pos | truncate to pos bytes |
/// | 2 | n, n bytes | append the bytes |
/// | 3 | pos, byte | insert the byte before pos |
/// | 4 | pos, n | remove n % 8 + 1 bytes from pos |
/// | 5 | pos, n, n % 16 bytes | overwrite from pos (extending if needed) |
pub fn mutate(frame: &[u8], edits: &[u8]) -> Vec<u8> {
    let mut out = frame.to_vec();
    let mut input = edits.iter().copied();
    while let Some(op) = input.next() {
        match op % 6 {
            0 => {
                let Some(at) = pos(&mut input, out.len()) else {
                    break;
                };
                let Some(mask) = input.next() else { break };
                if let Some(b) = out.get_mut(at) {
                    *b ^= mask;
                }
            }
            1 => {
                let Some(at) = pos(&mut input, out.len() + 1) else {
                    break;
                };
                out.truncate(at);
            }
            2 => {
                let Some(n) = input.next() else { break };
                out.extend(input.by_ref().take(usize::from(n)));
            }
            3 => {
                let Some(at) = pos(&mut input, out.len() + 1) else {
                    break;
                };
                let Some(b) = input.next() else { break };
                out.insert(at, b);
            }
            4 => {
                let Some(at) = pos(&mut input, out.len()) else {
                    break;
                };
                let Some(n) = input.next() else { break };
                let end = (at + usize::from(n % 8) + 1).min(out.len());
                out.drain(at.min(end)..end);
            }
            _ => {
                let Some(at) = pos(&mut input, out.len() + 1) else {
                    break;
                };
                let Some(n) = input.next() else { break };
                for (i, b) in input.by_ref().take(usize::from(n % 16)).enumerate() {
                    match out.get_mut(at + i) {
                        Some(slot) => *slot = b,
                        None => out.push(b),
                    }
                }
            }
        }
    }
    out
}

/// The next little-endian u16 of `input` modulo `len` (0 when `len` is 0).
fn pos(input: &mut impl Iterator<Item = u8>, len: usize) -> Option<usize> {
    let raw = u16::from_le_bytes([input.next()?, input.next()?]);
    Some(if len == 0 { 0 } else { usize::from(raw) % len })
}

/// Named seed inputs for each target, `(target, name, bytes)`: for
/// `decode_message` a frame of every message kind, the valid signed shares
/// (with and without row weights) and signed shares whose payload each
/// decoder must reject or whose row weights are not one per row (each both
/// as a frame and encoded on its own); for `share_verify` each original
/// share, in both forms, unedited and with a few edits.
/// `protocol/tests/fuzz_corpus.rs` replays them and can write them out as a
/// starting corpus.
pub fn seed_inputs() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let mut frame = |name: &str, message: Message| {
        if let Message::Share(share) = &message {
            let bytes = encode_share(share).expect("a seed share encodes");
            seeds.push(("decode_message", format!("seed-pulled-{name}"), bytes));
        }
        let bytes = encode(&message).expect("a seed message encodes");
        seeds.push(("decode_message", format!("seed-{name}"), bytes));
    };
    let key = signing_key().public_key();
    let member = Member {
        key,
        name: "alice".into(),
        addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
    };
    let manifest = FederationManifest {
        federation_id: FEDERATION_ID.into(),
        public_set: PublicSetDescriptor {
            source: "fuzz".into(),
            samples: 100,
            digest: subset().public_set_digest,
        },
        classes: CLASSES,
        rounds: 10,
        subset_size: ROWS,
        seed: 42,
    };
    frame(
        "join",
        Message::Join(JoinRequest {
            federation_id: FEDERATION_ID.into(),
            member: member.clone(),
            public_set_digest: subset().public_set_digest,
            train_samples: 1000,
        }),
    );
    frame(
        "welcome",
        Message::Welcome {
            manifest,
            members: vec![member.clone()],
        },
    );
    frame(
        "join-refused",
        Message::JoinRefused {
            reason: "digest".into(),
        },
    );
    frame(
        "round",
        Message::Control(
            SignedControl::sign(
                Control::Round(RoundAnnouncement {
                    federation_id: FEDERATION_ID.into(),
                    round: ROUND,
                    deadline_unix_ms: 1_700_000_000_000,
                    members: vec![member],
                }),
                &signing_key(),
            )
            .expect("a seed announcement signs"),
        ),
    );
    frame("share-accepted", Message::ShareAccepted);
    frame(
        "share-rejected",
        Message::ShareRejected {
            code: "bad_signature".into(),
            reason: "bad signature".into(),
        },
    );
    frame(
        "metrics",
        Message::Metrics(RoundMetrics {
            test_accuracy: 0.8,
            local_accuracy: 0.7,
            bytes_sent: 1,
            bytes_received: 2,
            share_bytes: 3,
            shares_sent: 4,
            shares_aggregated: 5,
            shares_rejected: 6,
            rejections: vec![("bad_signature".into(), 1)],
            train_loss: 0.5,
            distill_loss: f64::NAN,
            train_seconds: 1.0,
            predict_seconds: 1.0,
            encode_seconds: 1.0,
            network_seconds: 1.0,
            verify_seconds: 1.0,
            aggregate_seconds: 1.0,
            distill_seconds: 1.0,
            checkpoint_seconds: 1.0,
            distilled: true,
            teacher_rows_kept: 0.5,
            ..RoundMetrics::new(FEDERATION_ID, ROUND, key, "alice")
        }),
    );
    frame(
        "done",
        Message::Control(
            SignedControl::sign(
                Control::Done {
                    federation_id: FEDERATION_ID.into(),
                    rounds: 10,
                },
                &signing_key(),
            )
            .expect("a seed done signs"),
        ),
    );
    frame(
        "refused",
        Message::Refused {
            code: "busy".into(),
            reason: "too many requests".into(),
        },
    );
    frame("ack", Message::Ack);
    // Secure aggregation: a real advertisement, key shares and masked input
    // of a two-member round (seeded), so the fuzzer starts inside them.
    {
        use fd_protocol::secagg::{Participant, RoundContext, SecAggMessage};
        use rand_chacha::ChaCha20Rng;
        use rand_chacha::rand_core::SeedableRng;
        let bob = SigningKey::from_seed([9; 32]);
        let members = [signing_key().public_key(), bob.public_key()];
        let ctx = RoundContext::new(FEDERATION_ID, ROUND, &members, 2).expect("two members");
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let (mut alice, advert) = Participant::new(ctx.clone(), &signing_key(), &mut rng).expect("member");
        let (_, bobs) = Participant::new(ctx, &bob, &mut rng).expect("member");
        alice.accept_advertisement(bobs).expect("signed");
        let shares = alice.key_shares(&mut rng).expect("two advertised");
        let input = alice.masked_input(&[1, 2, 3, 4]).expect("after key shares");
        frame("secagg-advertise", Message::SecAgg(SecAggMessage::Advertise(advert)));
        frame("secagg-key-shares", Message::SecAgg(SecAggMessage::KeyShares(shares[0].clone())));
        frame("secagg-input", Message::SecAgg(SecAggMessage::Input(input)));
    }
    let pulled = &originals()[0].standalone;
    let announcement = ShareAnnouncement::describe(FEDERATION_ID, ROUND, key, pulled);
    frame(
        "share-available",
        Message::ShareAvailable(ShareAnnouncement {
            bytes: 3 * CHUNK_BYTES as u64 + 17,
            ..announcement.clone()
        }),
    );
    frame(
        "fetch-chunk",
        Message::FetchChunk {
            round: ROUND,
            digest: announcement.digest,
            index: 0,
        },
    );
    frame(
        "chunk",
        Message::Chunk {
            index: 0,
            data: pulled.clone(),
        },
    );
    frame(
        "chunk-unavailable",
        Message::ChunkUnavailable {
            reason: "gone".into(),
        },
    );
    for original in originals() {
        frame(
            &format!("share-{}", original.name),
            Message::Share(original.share.clone()),
        );
    }
    // Signed shares of the right shape whose payload the decoder must refuse:
    // past the signature check, so only a seed (the fuzzer cannot sign) gets
    // them to the decoders' error paths.
    let f16 = |v: f32| half::f16::from_f32(v).to_le_bytes();
    let int8_row = |scale: f32, values: [i8; 3]| {
        let mut row = scale.to_le_bytes().to_vec();
        row.extend(values.map(|v| v as u8));
        row
    };
    let top_k = |pairs: &[(u8, f32)]| {
        let mut p = Vec::new();
        for &(class, prob) in pairs {
            p.push(class);
            p.extend(f16(prob));
        }
        p
    };
    let mut f32_nan = PayloadEncoding::F32Le.encode(&LOGITS, CLASSES).unwrap();
    f32_nan[16..20].copy_from_slice(&f32::NAN.to_le_bytes());
    let mut f16_inf = PayloadEncoding::F16Le.encode(&LOGITS, CLASSES).unwrap();
    f16_inf[2..4].copy_from_slice(&f16(f32::INFINITY));
    let k2 = PayloadEncoding::TopK { k: 2 };
    let bad: [(&str, PayloadEncoding, Vec<u8>); 9] = [
        ("f32-nan", PayloadEncoding::F32Le, f32_nan),
        ("f16-inf", PayloadEncoding::F16Le, f16_inf),
        (
            "int8-negative-scale",
            PayloadEncoding::Int8,
            [int8_row(0.5, [1, 2, 3]), int8_row(-0.5, [1, 2, 3])].concat(),
        ),
        (
            "int8-minus-128",
            PayloadEncoding::Int8,
            [int8_row(0.5, [1, -128, 3]), int8_row(0.5, [1, 2, 3])].concat(),
        ),
        (
            "int8-overflow",
            PayloadEncoding::Int8,
            [int8_row(0.5, [1, 2, 3]), int8_row(f32::MAX, [0, 0, 127])].concat(),
        ),
        (
            "topk-index",
            k2,
            [top_k(&[(2, 0.6), (0, 0.3)]), top_k(&[(3, 0.6), (0, 0.3)])].concat(),
        ),
        (
            "topk-twice",
            k2,
            [top_k(&[(1, 0.6), (1, 0.3)]), top_k(&[(2, 0.6), (0, 0.3)])].concat(),
        ),
        (
            "topk-range",
            k2,
            [
                top_k(&[(2, 0.6), (0, 0.3)]),
                top_k(&[(2, 1.5), (0, f32::NAN)]),
            ]
            .concat(),
        ),
        (
            "topk-mass",
            k2,
            [top_k(&[(2, 0.6), (0, 0.5)]), top_k(&[(2, 0.6), (0, 0.3)])].concat(),
        ),
    ];
    for (name, encoding, payload) in bad {
        frame(
            &format!("signed-{name}"),
            Message::Share(signed_with_payload(encoding, payload)),
        );
    }
    // Signed f32 shares with one weight too few and one too many
    // (`bad_weights`; refused before the signature, but a signed seed shows
    // that the count alone decides).
    let f32_logits = PayloadEncoding::F32Le.encode(&LOGITS, CLASSES).unwrap();
    for (name, levels) in [("short", vec![255]), ("long", vec![255, 64, 0])] {
        frame(
            &format!("signed-weights-{name}"),
            Message::Share(signed_with(
                PayloadEncoding::F32Le,
                f32_logits.clone(),
                Some(RowWeights::from_levels(levels)),
            )),
        );
    }

    for (which, standalone) in (0..SHARES).flat_map(|w| [(w, false), (w, true)]) {
        let original = &originals()[which];
        let (which, form, len) = if standalone {
            (which as u8 + 128, "pulled-", original.standalone.len())
        } else {
            (which as u8, "", original.frame.len())
        };
        let name = format!("{form}{}", original.name);
        // The frame ends with the payload, the row weights (an option) and
        // the signature (a length byte and 64 bytes).
        let weights_len = fd_protocol::codec::canonical_bytes(&original.share.row_weights)
            .expect("the weights encode")
            .len();
        let payload_end = (len - 65 - weights_len - 1) as u16;
        let [lo, hi] = payload_end.to_le_bytes();
        let edits: [(&str, Vec<u8>); 4] = [
            ("original", vec![]),
            // XOR the last payload byte.
            ("xor", vec![0, lo, hi, 0x01]),
            // Cut the last payload byte and the signature, append four bytes.
            ("truncate-pad", vec![1, lo, hi, 2, 4, 0, 0, 0, 0]),
            // A no-op XOR: must still be accepted.
            ("noop", vec![0, 3, 0, 0]),
        ];
        for (edit, tail) in edits {
            let mut bytes = vec![which];
            bytes.extend(tail);
            seeds.push(("share_verify", format!("seed-{name}-{edit}"), bytes));
        }
    }
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_pass_their_checks() {
        for (target, name, bytes) in seed_inputs() {
            match target {
                "decode_message" => check_decode(&bytes),
                "share_verify" => check_share_mutation(&bytes),
                other => panic!("{name}: unknown target {other}"),
            }
        }
    }

    #[test]
    fn bad_payload_seeds_get_past_the_signature() {
        use fd_protocol::error::RejectReason;
        let mut seen = 0;
        for (_, name, bytes) in seed_inputs() {
            let (expected, share) = if let Some(expected) = name.strip_prefix("seed-signed-") {
                let Ok(Message::Share(share)) = decode(&bytes) else {
                    panic!("{name} is not a share");
                };
                (expected, share)
            } else if let Some(expected) = name.strip_prefix("seed-pulled-signed-") {
                (expected, decode_share(&bytes).expect("a share"))
            } else {
                continue;
            };
            let reason = share.validate(&expectation()).unwrap_err().reason();
            let want = if expected.starts_with("weights-") {
                // Correctly signed: the count alone is refused.
                share.verify_signature().expect("a signed seed");
                RejectReason::BadWeights
            } else if expected.ends_with("nan")
                || expected.ends_with("inf")
                || expected.ends_with("overflow")
            {
                RejectReason::NonFinite
            } else {
                RejectReason::InvalidField
            };
            assert_eq!(reason, want, "{name}");
            seen += 1;
        }
        assert_eq!(seen, 22);
    }

    #[test]
    fn xor_seeds_flip_the_last_payload_byte() {
        let mut seen = 0;
        for (target, name, bytes) in seed_inputs() {
            if target != "share_verify" || !name.ends_with("-xor") {
                continue;
            }
            let original = &originals()[usize::from(bytes[0] & 0x7f) % SHARES];
            assert!(name.contains(&original.name), "{name}");
            let standalone = bytes[0] >= 128;
            let edited = mutate(
                if standalone {
                    &original.standalone
                } else {
                    &original.frame
                },
                &bytes[1..],
            );
            let share = if standalone {
                decode_share(&edited).unwrap()
            } else {
                match decode(&edited).unwrap() {
                    Message::Share(share) => share,
                    other => panic!("{name}: {other:?}"),
                }
            };
            let mut want = original.share.clone();
            *want.payload.last_mut().unwrap() ^= 0x01;
            assert_eq!(share, want, "{name}");
            seen += 1;
        }
        assert_eq!(seen, 2 * SHARES);
    }

    #[test]
    fn mutations_do_what_the_table_says() {
        let f = [10, 20, 30, 40];
        assert_eq!(mutate(&f, &[]), f);
        assert_eq!(mutate(&f, &[0, 1, 0, 0xff]), [10, !20, 30, 40]);
        assert_eq!(mutate(&f, &[1, 2, 0]), [10, 20]);
        assert_eq!(mutate(&f, &[2, 2, 7, 8, 9]), [10, 20, 30, 40, 7, 8]);
        assert_eq!(mutate(&f, &[3, 4, 0, 5]), [10, 20, 30, 40, 5]);
        assert_eq!(mutate(&f, &[4, 1, 0, 1]), [10, 40]);
        assert_eq!(mutate(&f, &[5, 3, 0, 3, 1, 2, 3]), [10, 20, 30, 1, 2, 3]);
        // Positions wrap; an unfinished edit is dropped.
        assert_eq!(mutate(&f, &[0, 5, 0, 1]), [10, 21, 30, 40]);
        assert_eq!(mutate(&f, &[0, 5, 0]), f);
    }

    #[test]
    fn an_accepted_edit_must_keep_the_content() {
        // The no-op XOR and the unedited share are accepted.
        check_share_mutation(&[0]);
        check_share_mutation(&[2, 0, 9, 0, 0]);
        check_share_mutation(&[128]);
        check_share_mutation(&[131, 0, 9, 0, 0]);
        // The weighted share, in both forms.
        check_share_mutation(&[SHARES as u8 - 1]);
        check_share_mutation(&[128 + SHARES as u8 - 1, 0, 9, 0, 0]);
        assert!(originals()[SHARES - 1].share.row_weights.is_some());
        assert_eq!(
            originals()[SHARES - 1]
                .share
                .row_weights
                .as_ref()
                .unwrap()
                .levels(),
            [255, 64]
        );
        let original = &originals()[0];
        assert!(original.frame.len() > 100, "{} bytes", original.frame.len());
    }
}
