//! Secure aggregation end to end over its messages: sums, dropouts, the
//! threshold, uniformity of a masked input, and the reveal rules.

use fd_protocol::SigningKey;
use fd_protocol::identity::PublicKey;
use fd_protocol::secagg::{
    KnowledgeSums, MaskedInput, Participant, Reveal, RoundContext, SecAggError, encode_knowledge,
};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

const FED: &str = "secagg-test";

/// How far a member gets in the round.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stage {
    /// Advertises, then disappears before sharing keys.
    AfterAdvertise,
    /// Shares keys, then disappears before its masked input: its pair
    /// masks are in the others' inputs and must be recovered.
    AfterKeyShares,
    /// Sends its masked input, then disappears before revealing.
    AfterInput,
    /// Completes the round.
    Complete,
}

fn keys(n: usize, seed: u64) -> Vec<SigningKey> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let mut s = [0u8; 32];
            rng.fill_bytes(&mut s);
            SigningKey::from_seed(s)
        })
        .collect()
}

/// A random distribution per row and a random weight per row.
fn knowledge(rows: usize, classes: usize, rng: &mut ChaCha20Rng) -> (Vec<f32>, Vec<f32>) {
    let mut p = Vec::with_capacity(rows * classes);
    for _ in 0..rows {
        let raw: Vec<f32> = (0..classes).map(|_| (rng.next_u32() % 1000) as f32 + 1.0).collect();
        let total: f32 = raw.iter().sum();
        p.extend(raw.iter().map(|v| v / total));
    }
    let w = (0..rows).map(|_| (rng.next_u32() % 256) as f32 / 255.0).collect();
    (p, w)
}

/// Every member starts the round and advertises to all; those for which
/// `shares_keys(i)` holds then share their keys, and every message arrives.
fn through_key_shares(
    keys: &[SigningKey],
    ctx: &RoundContext,
    rng: &mut ChaCha20Rng,
    shares_keys: impl Fn(usize) -> bool,
) -> Vec<Participant> {
    let (mut parts, adverts): (Vec<Participant>, Vec<_>) = keys
        .iter()
        .map(|k| Participant::new(ctx.clone(), k, rng).unwrap())
        .unzip();
    for p in parts.iter_mut() {
        for a in &adverts {
            p.accept_advertisement(a.clone()).unwrap();
        }
    }
    let mut sealed = Vec::new();
    for (i, p) in parts.iter_mut().enumerate() {
        if shares_keys(i) {
            sealed.extend(p.key_shares(rng).unwrap());
        }
    }
    let members: Vec<PublicKey> = keys.iter().map(SigningKey::public_key).collect();
    for m in &sealed {
        let to = members.iter().position(|k| *k == m.to).unwrap();
        parts[to].accept_key_shares(m).unwrap();
    }
    parts
}

struct Outcome {
    /// What each completing member unmasked.
    results: Vec<Result<Vec<u32>, SecAggError>>,
    /// The exact sum of the survivors' encoded inputs.
    expected: Vec<u32>,
    survivors: Vec<PublicKey>,
}

/// Plays one round with every message delivered, members stopping at
/// `stages`, and every completing member unmasking.
fn play(stages: &[Stage], threshold: usize, inputs: &[Vec<u32>], seed: u64) -> Outcome {
    let n = stages.len();
    let keys = keys(n, seed);
    let members: Vec<PublicKey> = keys.iter().map(SigningKey::public_key).collect();
    let ctx = RoundContext::new(FED, 7, &members, threshold).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(seed ^ 0x5ec);
    let mut parts =
        through_key_shares(&keys, &ctx, &mut rng, |i| stages[i] != Stage::AfterAdvertise);
    let mut masked: Vec<MaskedInput> = Vec::new();
    for (i, p) in parts.iter_mut().enumerate() {
        if matches!(stages[i], Stage::AfterInput | Stage::Complete) {
            masked.push(p.masked_input(&inputs[i]).unwrap());
        }
    }
    let survivors: Vec<PublicKey> = masked.iter().map(|m| m.from).collect();
    let mut reveals: Vec<Reveal> = Vec::new();
    for (i, p) in parts.iter_mut().enumerate() {
        if stages[i] == Stage::Complete {
            for m in &masked {
                p.accept_masked_input(m).unwrap();
            }
            reveals.push(p.reveal(&survivors).unwrap());
        }
    }
    let len = inputs[0].len();
    let mut expected = vec![0u32; len];
    for (i, input) in inputs.iter().enumerate() {
        if matches!(stages[i], Stage::AfterInput | Stage::Complete) {
            for (e, v) in expected.iter_mut().zip(input) {
                *e = e.wrapping_add(*v);
            }
        }
    }
    let results = parts
        .iter()
        .enumerate()
        .filter(|(i, _)| stages[*i] == Stage::Complete)
        .map(|(_, p)| p.unmask(&survivors, &masked, &reveals).map(|u| u.sum))
        .collect();
    Outcome {
        results,
        expected,
        survivors,
    }
}

#[test]
fn masked_sums_equal_the_plain_sum_for_2_to_20_members_with_dropouts() {
    let mut rng = ChaCha20Rng::seed_from_u64(2024);
    let (rows, classes) = (7, 4);
    let mut checked_success = 0;
    let mut checked_refusal = 0;
    for n in 2..=20usize {
        for trial in 0..4u64 {
            let threshold = RoundContext::minimum_threshold(n)
                + (rng.next_u32() as usize % (n - RoundContext::minimum_threshold(n) + 1));
            // Trial 0: nobody drops; later trials drop members at random stages.
            let stages: Vec<Stage> = (0..n)
                .map(|_| match (trial, rng.next_u32() % 8) {
                    (0, _) => Stage::Complete,
                    (_, 0) => Stage::AfterAdvertise,
                    (_, 1) => Stage::AfterKeyShares,
                    (_, 2) => Stage::AfterInput,
                    _ => Stage::Complete,
                })
                .collect();
            let completing = stages.iter().filter(|s| **s == Stage::Complete).count();
            let sharing = stages.iter().filter(|s| **s != Stage::AfterAdvertise).count();
            if completing == 0 || sharing < threshold {
                continue;
            }
            let knowledge: Vec<(Vec<f32>, Vec<f32>)> =
                (0..n).map(|_| knowledge(rows, classes, &mut rng)).collect();
            let inputs: Vec<Vec<u32>> = knowledge
                .iter()
                .map(|(p, w)| encode_knowledge(p, Some(w), classes).unwrap())
                .collect();
            let outcome = play(&stages, threshold, &inputs, 100 * n as u64 + trial);
            for result in &outcome.results {
                if completing >= threshold {
                    let sum = result.as_ref().unwrap_or_else(|e| {
                        panic!("n {n}, t {threshold}, stages {stages:?}: {e}")
                    });
                    assert_eq!(*sum, outcome.expected, "n {n} t {threshold} {stages:?}");
                    // And the decoded sums are the float sums within the
                    // encoding's tolerance (half a step per value).
                    let sums = KnowledgeSums::decode(sum, classes).unwrap();
                    let tolerance = outcome.survivors.len() as f64 * 0.5 / f64::from(1u32 << 20);
                    for r in 0..rows {
                        let exact: f64 = stages
                            .iter()
                            .zip(&knowledge)
                            .filter(|(s, _)| matches!(s, Stage::AfterInput | Stage::Complete))
                            .map(|(_, (_, w))| f64::from(w[r]))
                            .sum();
                        assert!((sums.weight[r] - exact).abs() <= tolerance + 1e-12);
                    }
                    checked_success += 1;
                } else {
                    assert!(
                        matches!(result, Err(SecAggError::BelowThreshold { .. })),
                        "n {n} t {threshold} {stages:?}: {result:?}"
                    );
                    checked_refusal += 1;
                }
            }
        }
    }
    assert!(checked_success > 100, "{checked_success} successful unmaskings checked");
    assert!(checked_refusal > 5, "{checked_refusal} refusals below the threshold checked");
}

#[test]
fn below_the_threshold_the_round_refuses_to_unmask() {
    // 5 members, threshold 4: two drop after their inputs, so only 3 reveal.
    let stages = [
        Stage::Complete,
        Stage::Complete,
        Stage::Complete,
        Stage::AfterInput,
        Stage::AfterInput,
    ];
    let inputs = vec![vec![1u32, 2, 3]; 5];
    let outcome = play(&stages, 4, &inputs, 9);
    for r in outcome.results {
        let Err(SecAggError::BelowThreshold { have: 3, need: 4, .. }) = r else {
            panic!("expected a refusal below the threshold, got {r:?}");
        };
    }
    // With threshold 3 the same round unmasks.
    let outcome = play(&stages, 3, &inputs, 9);
    for r in outcome.results {
        assert_eq!(r.unwrap(), outcome.expected);
    }
}

#[test]
fn one_masked_input_alone_is_uniform() {
    // A member's masked input of an all-zero vector, as the only thing a
    // curious member sees of it: chi-square of the low and high bytes of
    // 2^16 words against uniform.
    let keys = keys(3, 5);
    let members: Vec<PublicKey> = keys.iter().map(SigningKey::public_key).collect();
    let ctx = RoundContext::new(FED, 1, &members, 2).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(77);
    let mut parts = through_key_shares(&keys, &ctx, &mut rng, |_| true);
    let masked = parts[0].masked_input(&vec![0u32; 1 << 16]).unwrap();
    for shift in [0u32, 24] {
        let mut counts = [0u64; 256];
        for v in &masked.values {
            counts[((v >> shift) & 0xff) as usize] += 1;
        }
        let expected = masked.values.len() as f64 / 256.0;
        let chi2: f64 = counts.iter().map(|&c| (c as f64 - expected).powi(2) / expected).sum();
        // 255 degrees of freedom: the 99.9 % quantile is 330.5.
        assert!(chi2 < 330.5, "byte at shift {shift}: chi-square {chi2}");
    }
}

/// Three members, all past key sharing; returns them, their masked inputs
/// and their keys.
fn three_with_inputs(seed: u64) -> (Vec<Participant>, Vec<MaskedInput>, Vec<PublicKey>) {
    let keys = keys(3, seed);
    let members: Vec<PublicKey> = keys.iter().map(SigningKey::public_key).collect();
    let ctx = RoundContext::new(FED, 2, &members, 2).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut parts = through_key_shares(&keys, &ctx, &mut rng, |_| true);
    let inputs = parts
        .iter_mut()
        .enumerate()
        .map(|(i, p)| p.masked_input(&[i as u32 * 10, 1, 2]).unwrap())
        .collect();
    (parts, inputs, members)
}

#[test]
fn a_delivering_members_mask_secret_is_never_revealed() {
    let (mut parts, inputs, members) = three_with_inputs(21);
    // Member 0 accepted member 2's input; the clock nevertheless calls 2
    // dropped. Member 0 withholds 2's mask secret; member 1, which did not
    // see 2's input, reveals it and from then on refuses that input.
    parts[0].accept_masked_input(&inputs[2]).unwrap();
    let survivors = [members[0], members[1]];
    let r0 = parts[0].reveal(&survivors).unwrap();
    assert!(r0.mask_key_shares.is_empty(), "a delivered member's mask secret was revealed");
    assert_eq!(r0.self_mask_shares.len(), 2);
    let r1 = parts[1].reveal(&survivors).unwrap();
    assert_eq!(r1.mask_key_shares.iter().map(|(m, _)| *m).collect::<Vec<_>>(), vec![members[2]]);
    let Err(SecAggError::Rejected { .. }) = parts[1].accept_masked_input(&inputs[2]) else {
        panic!("an input whose mask secret was revealed must be refused");
    };
    // No member reveals for two different survivor sets in one round.
    assert!(matches!(
        parts[1].reveal(&members),
        Err(SecAggError::OutOfOrder(_))
    ));
    // With only one mask-secret share of member 2 (threshold 2), the sum
    // cannot be unmasked: the round is refused rather than leaking.
    let Err(SecAggError::BelowThreshold { secret: "mask secret", .. }) =
        parts[1].unmask(&survivors, &inputs, &[r0, r1])
    else {
        panic!("expected a refusal below the threshold");
    };
}

#[test]
fn forged_reveals_and_tampered_messages_are_refused() {
    let (mut parts, inputs, members) = three_with_inputs(33);
    let survivors = members.clone();
    let reveals: Vec<Reveal> = parts.iter_mut().map(|p| p.reveal(&survivors).unwrap()).collect();
    let plain = parts[0].unmask(&survivors, &inputs, &reveals).unwrap();
    assert_eq!(plain.sum, vec![30, 3, 6]);
    assert!(plain.refused.is_empty());

    // A reveal with a changed share no longer verifies: it is refused and
    // the remaining two still unmask.
    let mut forged = reveals.clone();
    forged[2].self_mask_shares[0].1[0] ^= 1;
    let u = parts[0].unmask(&survivors, &inputs, &forged).unwrap();
    assert_eq!(u.sum, vec![30, 3, 6]);
    assert_eq!(u.refused.len(), 1);

    // A tampered masked input fails its signature.
    let mut tampered = inputs.clone();
    tampered[1].values[0] ^= 1;
    assert!(matches!(
        parts[0].unmask(&survivors, &tampered, &reveals),
        Err(SecAggError::Rejected { .. })
    ));
    // A missing survivor input is named.
    assert!(matches!(
        parts[0].unmask(&survivors, &inputs[..2], &reveals),
        Err(SecAggError::MissingInput(m)) if m == members[2]
    ));
}

#[test]
fn a_signed_reveal_of_a_survivors_mask_secret_is_refused() {
    // A malicious member signs a reveal that hands out a survivor's mask
    // secret share (with the self-seed share, that would unmask it alone).
    let keys = keys(3, 44);
    let (mut parts, inputs, members) = three_with_inputs(44);
    let honest = parts[0].reveal(&members).unwrap();
    let mut evil = parts[1].reveal(&members).unwrap();
    evil.mask_key_shares.push((members[0], [0u8; 32]));
    // Re-sign as member 1 through the public API: build it from scratch.
    let signer = keys.iter().find(|k| k.public_key() == members[1]).unwrap();
    let resigned = resign(evil, signer);
    let u = parts[2].unmask(&members, &inputs, &[honest, resigned]);
    // The evil reveal is refused, and one honest reveal is below threshold 2.
    assert!(matches!(u, Err(SecAggError::BelowThreshold { .. })), "{u:?}");
}

/// Signs `reveal` again with `key` after its content was changed: what a
/// malicious member can do with its own reveal.
fn resign(mut reveal: Reveal, key: &SigningKey) -> Reveal {
    reveal.signature = key.sign(&reveal.signing_bytes());
    reveal
}

#[test]
fn context_and_key_shares_are_checked() {
    let keys = keys(4, 8);
    let members: Vec<PublicKey> = keys.iter().map(SigningKey::public_key).collect();
    let e = RoundContext::new(FED, 1, &members, 2).unwrap_err();
    assert!(e.to_string().contains("threshold"), "{e}");
    assert!(RoundContext::new(FED, 1, &members[..1], 1).is_err());
    let mut twice = members.clone();
    twice.push(members[0]);
    assert!(RoundContext::new(FED, 1, &twice, 3).is_err());

    let ctx = RoundContext::new(FED, 1, &members, 3).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(8);
    let (mut parts, adverts): (Vec<Participant>, Vec<_>) = keys
        .iter()
        .map(|k| Participant::new(ctx.clone(), k, &mut rng).unwrap())
        .unzip();
    // Fewer advertisements than the threshold: no key shares go out.
    assert!(matches!(
        parts[0].key_shares(&mut rng),
        Err(SecAggError::BelowThreshold { .. })
    ));
    for p in parts.iter_mut() {
        for a in &adverts {
            p.accept_advertisement(a.clone()).unwrap();
        }
    }
    // An advertisement with a changed key fails its signature.
    let mut forged = adverts[1].clone();
    forged.mask_key[0] ^= 1;
    assert!(parts[2].accept_advertisement(forged).is_err());
    let sealed = parts[0].key_shares(&mut rng).unwrap();
    assert_eq!(sealed.len(), 3);
    let to = members.iter().position(|k| *k == sealed[0].to).unwrap();
    let mut tampered = sealed[0].clone();
    tampered.ciphertext[3] ^= 1;
    assert!(parts[to].accept_key_shares(&tampered).is_err());
    // Shares addressed to someone else (neither sender nor addressee) are refused.
    let other = (1..4).find(|&i| i != to).unwrap();
    assert!(parts[other].accept_key_shares(&sealed[0]).is_err());
    parts[to].accept_key_shares(&sealed[0]).unwrap();
}

#[test]
fn a_masked_input_takes_four_bytes_a_word_and_round_trips() {
    let (_, inputs, _) = three_with_inputs(55);
    let input = &inputs[0];
    let bytes = bincode::serde::encode_to_vec(input, bincode::config::standard()).unwrap();
    let (back, _): (MaskedInput, usize) =
        bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
    assert_eq!(&back, input);
    // Bincode's varint length: 1 byte for 12, 3 bytes for 4,000; then the
    // words at 4 bytes each (a varint u32 would take 5).
    let mut bigger = input.clone();
    bigger.values = vec![u32::MAX; 1000];
    let big = fd_protocol::secagg::wire_len(&bigger);
    let small = fd_protocol::secagg::wire_len(input);
    assert_eq!(big - small, (3 + 4000) - (1 + 12), "{big} vs {small}");
}

/// Between processes nobody announces the survivor set: a member reveals
/// only once every other survivor it saw confirmed the same set. An input
/// that reached member 0 but not member 1 (its sender crashed while
/// sending) must not make 0 reveal 2's self seed while 1 reveals 2's mask
/// secret: together those would unmask 2's input alone.
#[test]
fn members_that_saw_different_survivors_do_not_reveal() {
    let (mut parts, inputs, members) = three_with_inputs(45);
    // Member 2 crashed after its input reached member 0 only.
    for i in [0, 1] {
        for (j, input) in inputs.iter().enumerate().take(2) {
            if i != j {
                parts[i].accept_masked_input(input).unwrap();
            }
        }
    }
    parts[0].accept_masked_input(&inputs[2]).unwrap();
    let v0 = parts[0].survivor_view().unwrap();
    let v1 = parts[1].survivor_view().unwrap();
    assert_eq!(v0.survivors.len(), 3);
    assert_eq!(v1.survivors.len(), 2);
    // Before any confirmation nobody reveals.
    let Err(SecAggError::Unconfirmed { .. }) = parts[0].reveal_confirmed() else {
        panic!("revealed without confirmations");
    };
    parts[0].accept_view(&v1).unwrap();
    parts[1].accept_view(&v0).unwrap();
    let Err(SecAggError::Disagreement { member, theirs: 2, mine: 3 }) = parts[0].reveal_confirmed()
    else {
        panic!("member 0 revealed although member 1 saw another set");
    };
    assert_eq!(member, members[1]);
    let Err(SecAggError::Disagreement { theirs: 3, mine: 2, .. }) = parts[1].reveal_confirmed() else {
        panic!("member 1 revealed although member 0 saw another set");
    };
    // A second, different view from the same member is refused.
    let mut other = v1.clone();
    other.survivors = members.clone();
    other.survivors.sort();
    let key = keys(3, 45).into_iter().find(|k| k.public_key() == v1.from).unwrap();
    other.signature = key.sign(&other.signing_bytes());
    assert!(matches!(parts[0].accept_view(&other), Err(SecAggError::Rejected { .. })));
    // A view whose set leaves out its sender, or is forged, is refused.
    let mut forged = v1.clone();
    forged.survivors.retain(|m| *m != v1.from);
    assert!(parts[2].accept_view(&forged).is_err());
}

#[test]
fn survivors_that_agree_reveal_and_unmask_the_sum() {
    let (mut parts, inputs, _) = three_with_inputs(46);
    for (i, p) in parts.iter_mut().enumerate() {
        for (j, input) in inputs.iter().enumerate() {
            if i != j {
                p.accept_masked_input(input).unwrap();
            }
        }
    }
    let views: Vec<_> = parts.iter_mut().map(|p| p.survivor_view().unwrap()).collect();
    for (i, p) in parts.iter_mut().enumerate() {
        for (j, v) in views.iter().enumerate() {
            if i != j {
                p.accept_view(v).unwrap();
            }
        }
    }
    let mut reveals = Vec::new();
    let mut sets = Vec::new();
    for p in parts.iter_mut() {
        let (set, reveal) = p.reveal_confirmed().unwrap();
        sets.push(set);
        reveals.push(reveal);
    }
    assert!(sets.windows(2).all(|w| w[0] == w[1]));
    for r in &reveals {
        parts[0].check_reveal(r, &sets[0]).unwrap();
    }
    let sum = parts[0].unmask(&sets[0], &inputs, &reveals).unwrap().sum;
    // Inputs [10·i, 1, 2] of members 0, 1, 2.
    assert_eq!(sum, vec![30, 3, 6]);
}
