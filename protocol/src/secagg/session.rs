//! One member's side of a secure-aggregation round, as a state machine over
//! the protocol's messages (see the module doc of [`super`] for the flow
//! and the rules). Each step checks what it receives against the round's
//! member list and the signed advertisements; nothing here touches the
//! network, so the node decides how messages travel and the simulator and
//! tests drive the same code directly.

use std::collections::{BTreeMap, BTreeSet};

use rand_chacha::rand_core::CryptoRng;
use serde::{Deserialize, Serialize};
use x25519_dalek::{X25519_BASEPOINT_BYTES, x25519};

use super::SecAggError;
use super::crypto::{DhKeyPair, Purpose, apply_mask, derive_key, open, seal};
use super::shamir::{self, SecretShare};
use crate::digest::{Digest, Sha256, sha256};
use crate::identity::{PublicKey, Signature, SigningKey};

/// The round a participant takes part in: the federation, the round, its
/// member list (from the signed round announcement, so every member has the
/// same one) and the Shamir threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundContext {
    federation_id: String,
    round: u64,
    /// Sorted, distinct; a member's Shamir x is its position + 1.
    members: Vec<PublicKey>,
    threshold: usize,
}

impl RoundContext {
    /// Refuses fewer than 2 or more than 255 members, and a threshold that
    /// is not a majority of them (t − 1 colluders must not reach t).
    pub fn new(
        federation_id: impl Into<String>,
        round: u64,
        members: &[PublicKey],
        threshold: usize,
    ) -> Result<Self, SecAggError> {
        let mut sorted = members.to_vec();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != members.len() {
            return Err(SecAggError::Config("the member list repeats a member".into()));
        }
        let n = sorted.len();
        if !(2..=shamir::MAX_HOLDERS).contains(&n) {
            return Err(SecAggError::Config(format!(
                "secure aggregation needs 2..={} members, the round has {n}",
                shamir::MAX_HOLDERS
            )));
        }
        let minimum = Self::minimum_threshold(n);
        if threshold < minimum || threshold > n {
            return Err(SecAggError::Config(format!(
                "`threshold` = {threshold} must be in {minimum}..={n} for {n} members (a majority, so that fewer colluders cannot rebuild a secret)"
            )));
        }
        Ok(RoundContext {
            federation_id: federation_id.into(),
            round,
            members: sorted,
            threshold,
        })
    }

    /// The smallest allowed threshold for `members`: a strict majority.
    pub fn minimum_threshold(members: usize) -> usize {
        members / 2 + 1
    }

    pub fn round(&self) -> u64 {
        self.round
    }

    pub fn threshold(&self) -> usize {
        self.threshold
    }

    pub fn members(&self) -> &[PublicKey] {
        &self.members
    }

    fn x_of(&self, member: &PublicKey) -> Result<u8, SecAggError> {
        self.members
            .binary_search(member)
            .map(|i| (i + 1) as u8)
            .map_err(|_| SecAggError::NotAMember(*member))
    }

    fn check(&self, federation_id: &str, round: u64, from: &PublicKey) -> Result<(), SecAggError> {
        if federation_id != self.federation_id {
            return Err(SecAggError::Rejected {
                from: *from,
                reason: format!("message for federation `{federation_id}`"),
            });
        }
        if round != self.round {
            return Err(SecAggError::Rejected {
                from: *from,
                reason: format!("message for round {round}, this is round {}", self.round),
            });
        }
        self.x_of(from).map(|_| ())
    }

    /// The digest every reveal is bound to: the sorted survivor set.
    fn survivors_digest(&self, survivors: &BTreeSet<PublicKey>) -> Digest {
        let mut h = Sha256::new();
        h.update(b"fd/secagg/survivors/v1");
        h.update(&self.round.to_le_bytes());
        for s in survivors {
            h.update(&s.0);
        }
        h.finish()
    }

    fn normalise(&self, survivors: &[PublicKey]) -> Result<BTreeSet<PublicKey>, SecAggError> {
        let set: BTreeSet<PublicKey> = survivors.iter().copied().collect();
        for s in &set {
            self.x_of(s)?;
        }
        Ok(set)
    }
}

/// Length-prefixed signing transcript with a domain.
struct Transcript(Vec<u8>);

impl Transcript {
    fn new(domain: &[u8], federation_id: &str, round: u64, from: &PublicKey) -> Self {
        let mut t = Transcript(Vec::with_capacity(256));
        t.bytes(domain);
        t.bytes(federation_id.as_bytes());
        t.0.extend_from_slice(&round.to_le_bytes());
        t.0.extend_from_slice(&from.0);
        t
    }

    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(&(b.len() as u64).to_le_bytes());
        self.0.extend_from_slice(b);
    }
}

/// Step 1: a member's keys for this round, signed with its identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyAdvertisement {
    pub federation_id: String,
    pub round: u64,
    pub member: PublicKey,
    /// X25519 public key that seals key shares to and from this member.
    pub encryption_key: [u8; 32],
    /// X25519 public key of this member's pair masks.
    pub mask_key: [u8; 32],
    /// SHA-256 of the member's self-mask seed: checks its rebuilt value.
    pub self_mask_commitment: Digest,
    pub signature: Signature,
}

impl KeyAdvertisement {
    /// The bytes its signature covers (domain-separated, every field).
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut t = Transcript::new(
            b"fd/secagg/advertise/v1",
            &self.federation_id,
            self.round,
            &self.member,
        );
        t.0.extend_from_slice(&self.encryption_key);
        t.0.extend_from_slice(&self.mask_key);
        t.0.extend_from_slice(&self.self_mask_commitment.0);
        t.0
    }

    /// Checks the round, membership and signature.
    pub fn verify(&self, ctx: &RoundContext) -> Result<(), SecAggError> {
        ctx.check(&self.federation_id, self.round, &self.member)?;
        self.member
            .verify(&self.signing_bytes(), &self.signature)
            .map_err(|_| SecAggError::Rejected {
                from: self.member,
                reason: "bad signature on its key advertisement".into(),
            })
    }
}

/// Step 2: `from`'s Shamir shares for `to`, sealed so only `to` reads them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptedKeyShares {
    pub federation_id: String,
    pub round: u64,
    pub from: PublicKey,
    pub to: PublicKey,
    /// ChaCha20-Poly1305 of (mask-secret share ‖ self-seed share).
    pub ciphertext: Vec<u8>,
}

/// Step 3: a member's masked vector, signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskedInput {
    pub federation_id: String,
    pub round: u64,
    pub from: PublicKey,
    /// The members whose pair masks are in `values` (sorted).
    pub masked_with: Vec<PublicKey>,
    /// Little-endian words on the wire (bincode's varints would spend 5
    /// bytes on a uniform u32).
    #[serde(with = "words_le")]
    pub values: Vec<u32>,
    pub signature: Signature,
}

/// `Vec<u32>` as one byte string of little-endian words.
mod words_le {
    use serde::{Deserializer, Serializer, de::Error as _};

    pub fn serialize<S: Serializer>(values: &[u32], s: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        s.serialize_bytes(&bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
        let bytes: Vec<u8> = serde_bytes_compat::deserialize(d)?;
        if !bytes.len().is_multiple_of(4) {
            return Err(D::Error::custom(format!(
                "masked input of {} bytes is not whole 32-bit words",
                bytes.len()
            )));
        }
        Ok(bytes
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect())
    }

    /// Reads a byte string (bincode writes `serialize_bytes` as a length
    /// and the bytes; a visitor accepts it as bytes or as a sequence).
    mod serde_bytes_compat {
        use serde::Deserializer;
        use serde::de::{SeqAccess, Visitor};

        struct Bytes;

        impl<'de> Visitor<'de> for Bytes {
            type Value = Vec<u8>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }

            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }

            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
            d.deserialize_byte_buf(Bytes)
        }
    }
}

impl MaskedInput {
    /// The bytes its signature covers (domain-separated, every field).
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut t = Transcript::new(b"fd/secagg/input/v1", &self.federation_id, self.round, &self.from);
        t.0.extend_from_slice(&(self.masked_with.len() as u64).to_le_bytes());
        for m in &self.masked_with {
            t.0.extend_from_slice(&m.0);
        }
        let mut h = Sha256::new();
        for v in &self.values {
            h.update(&v.to_le_bytes());
        }
        t.0.extend_from_slice(&(self.values.len() as u64).to_le_bytes());
        t.0.extend_from_slice(&h.finish().0);
        t.0
    }

    /// Checks the round, membership and signature.
    pub fn verify(&self, ctx: &RoundContext) -> Result<(), SecAggError> {
        ctx.check(&self.federation_id, self.round, &self.from)?;
        self.from
            .verify(&self.signing_bytes(), &self.signature)
            .map_err(|_| SecAggError::Rejected {
                from: self.from,
                reason: "bad signature on its masked input".into(),
            })
    }
}

/// Step 4: a member's shares of the secrets the survivor set calls for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reveal {
    pub federation_id: String,
    pub round: u64,
    pub from: PublicKey,
    /// Digest of the survivor set this reveal is for.
    pub survivors: Digest,
    /// (survivor, the revealer's share of its self-mask seed).
    pub self_mask_shares: Vec<(PublicKey, [u8; 32])>,
    /// (dropped member, the revealer's share of its mask secret).
    pub mask_key_shares: Vec<(PublicKey, [u8; 32])>,
    pub signature: Signature,
}

impl Reveal {
    /// The bytes its signature covers (domain-separated, every field).
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut t = Transcript::new(b"fd/secagg/reveal/v1", &self.federation_id, self.round, &self.from);
        t.0.extend_from_slice(&self.survivors.0);
        for list in [&self.self_mask_shares, &self.mask_key_shares] {
            t.0.extend_from_slice(&(list.len() as u64).to_le_bytes());
            for (m, y) in list {
                t.0.extend_from_slice(&m.0);
                t.0.extend_from_slice(y);
            }
        }
        t.0
    }

    /// Checks the round, membership, signature, the survivor set and that
    /// it reveals only what that set allows.
    fn verify(&self, ctx: &RoundContext, survivors: &BTreeSet<PublicKey>) -> Result<(), SecAggError> {
        ctx.check(&self.federation_id, self.round, &self.from)?;
        let reject = |reason: String| SecAggError::Rejected {
            from: self.from,
            reason,
        };
        self.from
            .verify(&self.signing_bytes(), &self.signature)
            .map_err(|_| reject("bad signature on its reveal".into()))?;
        if self.survivors != ctx.survivors_digest(survivors) {
            return Err(reject("reveal for a different survivor set".into()));
        }
        if let Some((m, _)) = self.self_mask_shares.iter().find(|(m, _)| !survivors.contains(m)) {
            return Err(reject(format!("reveals the self seed of {m}, who did not survive")));
        }
        if let Some((m, _)) = self.mask_key_shares.iter().find(|(m, _)| survivors.contains(m)) {
            return Err(reject(format!("reveals the mask secret of {m}, a survivor")));
        }
        Ok(())
    }
}

/// Between steps 3 and 4: the survivor set a member is about to reveal
/// for (every member whose masked input it accepted, itself included),
/// signed. A member reveals only once every other member of its set has
/// sent the same set ([`Participant::reveal_confirmed`]): without a server
/// that announces one set to all, this is what keeps two honest members
/// from revealing for different sets, which together could expose both
/// secrets of one member (the consistency check of Bonawitz et al.'s
/// malicious-server variant, done among the members).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SurvivorView {
    pub federation_id: String,
    pub round: u64,
    pub from: PublicKey,
    /// Sorted, distinct.
    pub survivors: Vec<PublicKey>,
    pub signature: Signature,
}

impl SurvivorView {
    /// The bytes its signature covers (domain-separated, every field).
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut t = Transcript::new(b"fd/secagg/view/v1", &self.federation_id, self.round, &self.from);
        t.0.extend_from_slice(&(self.survivors.len() as u64).to_le_bytes());
        for s in &self.survivors {
            t.0.extend_from_slice(&s.0);
        }
        t.0
    }

    /// Checks the round, membership, signature, and that the set is sorted,
    /// distinct, made of members and contains its sender.
    pub fn verify(&self, ctx: &RoundContext) -> Result<(), SecAggError> {
        ctx.check(&self.federation_id, self.round, &self.from)?;
        let reject = |reason: String| SecAggError::Rejected {
            from: self.from,
            reason,
        };
        self.from
            .verify(&self.signing_bytes(), &self.signature)
            .map_err(|_| reject("bad signature on its survivor view".into()))?;
        if !self.survivors.windows(2).all(|w| w[0] < w[1]) {
            return Err(reject("survivor view is not sorted and distinct".into()));
        }
        for s in &self.survivors {
            ctx.x_of(s)?;
        }
        if !self.survivors.contains(&self.from) {
            return Err(reject("survivor view leaves out its own sender".into()));
        }
        Ok(())
    }
}

/// The sum of the survivors' inputs, and the reveals that were not used
/// because they failed a check (each with why).
#[derive(Debug, Clone, PartialEq)]
pub struct Unmasked {
    pub sum: Vec<u32>,
    pub refused: Vec<SecAggError>,
}

/// Shares this member holds of another member's two secrets.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Held {
    mask_secret: [u8; 32],
    self_seed: [u8; 32],
}

/// One member's state in one round.
pub struct Participant {
    ctx: RoundContext,
    signing: SigningKey,
    me: PublicKey,
    encryption: DhKeyPair,
    mask: DhKeyPair,
    self_seed: [u8; 32],
    advertisements: BTreeMap<PublicKey, KeyAdvertisement>,
    held: BTreeMap<PublicKey, Held>,
    shares_sent: bool,
    input_sent: bool,
    inputs_accepted: BTreeSet<PublicKey>,
    revealed_for: Option<Digest>,
    mask_secret_revealed: BTreeSet<PublicKey>,
    /// The survivor set this member announced ([`Self::survivor_view`]).
    my_view: Option<Vec<PublicKey>>,
    /// Other members' signed survivor sets.
    views: BTreeMap<PublicKey, Vec<PublicKey>>,
}

impl Participant {
    /// Starts a round: fresh keys and self seed from `rng` (the node seeds
    /// it from the OS; tests and the simulator from their seed), and the
    /// signed advertisement to send to every member.
    pub fn new(
        ctx: RoundContext,
        signing: &SigningKey,
        rng: &mut impl CryptoRng,
    ) -> Result<(Self, KeyAdvertisement), SecAggError> {
        let me = signing.public_key();
        ctx.x_of(&me)?;
        let encryption = DhKeyPair::generate(rng);
        let mask = DhKeyPair::generate(rng);
        let mut self_seed = [0u8; 32];
        rng.fill_bytes(&mut self_seed);
        let mut advertisement = KeyAdvertisement {
            federation_id: ctx.federation_id.clone(),
            round: ctx.round,
            member: me,
            encryption_key: encryption.public,
            mask_key: mask.public,
            self_mask_commitment: sha256(&self_seed),
            signature: Signature([0; 64]),
        };
        advertisement.signature = signing.sign(&advertisement.signing_bytes());
        let mut advertisements = BTreeMap::new();
        advertisements.insert(me, advertisement.clone());
        Ok((
            Participant {
                ctx,
                signing: signing.clone(),
                me,
                encryption,
                mask,
                self_seed,
                advertisements,
                held: BTreeMap::new(),
                shares_sent: false,
                input_sent: false,
                inputs_accepted: BTreeSet::new(),
                revealed_for: None,
                mask_secret_revealed: BTreeSet::new(),
                my_view: None,
                views: BTreeMap::new(),
            },
            advertisement,
        ))
    }

    pub fn context(&self) -> &RoundContext {
        &self.ctx
    }

    /// Records a peer's advertisement. A second, different advertisement
    /// from the same member is equivocation and refused.
    pub fn accept_advertisement(&mut self, advertisement: KeyAdvertisement) -> Result<(), SecAggError> {
        advertisement.verify(&self.ctx)?;
        if self.shares_sent {
            return Err(SecAggError::Rejected {
                from: advertisement.member,
                reason: "advertisement after key shares went out".into(),
            });
        }
        match self.advertisements.get(&advertisement.member) {
            Some(known) if *known != advertisement => Err(SecAggError::Rejected {
                from: advertisement.member,
                reason: "a second, different key advertisement for the round".into(),
            }),
            Some(_) => Ok(()),
            None => {
                self.advertisements.insert(advertisement.member, advertisement);
                Ok(())
            }
        }
    }

    /// Splits this member's mask secret and self seed among all the round's
    /// members and seals each advertised member's shares to it. Needs at
    /// least `threshold` advertisements (its own included).
    pub fn key_shares(
        &mut self,
        rng: &mut impl CryptoRng,
    ) -> Result<Vec<EncryptedKeyShares>, SecAggError> {
        if self.shares_sent {
            return Err(SecAggError::OutOfOrder("key shares were already sent this round"));
        }
        let t = self.ctx.threshold;
        if self.advertisements.len() < t {
            return Err(SecAggError::BelowThreshold {
                member: self.me,
                secret: "round (advertisements)",
                have: self.advertisements.len(),
                need: t,
            });
        }
        let n = self.ctx.members.len();
        let mask_shares = shamir::split(&self.mask.secret, t, n, rng)?;
        let seed_shares = shamir::split(&self.self_seed, t, n, rng)?;
        self.shares_sent = true;
        let mut out = Vec::with_capacity(self.advertisements.len());
        for (peer, advertisement) in &self.advertisements {
            let x = self.ctx.x_of(peer)? as usize;
            let (m, s) = (mask_shares[x - 1], seed_shares[x - 1]);
            if *peer == self.me {
                self.held.insert(
                    self.me,
                    Held {
                        mask_secret: m.y,
                        self_seed: s.y,
                    },
                );
                continue;
            }
            let key = derive_key(
                &self.encryption.secret,
                &advertisement.encryption_key,
                &self.ctx.federation_id,
                self.ctx.round,
                &self.me,
                peer,
                Purpose::SealShares,
            )?;
            let mut plain = [0u8; 64];
            plain[..32].copy_from_slice(&m.y);
            plain[32..].copy_from_slice(&s.y);
            out.push(EncryptedKeyShares {
                federation_id: self.ctx.federation_id.clone(),
                round: self.ctx.round,
                from: self.me,
                to: *peer,
                ciphertext: seal(key, &self.ctx.federation_id, self.ctx.round, &self.me, peer, &plain)?,
            });
        }
        Ok(out)
    }

    /// Opens and keeps a peer's shares for this member.
    pub fn accept_key_shares(&mut self, message: &EncryptedKeyShares) -> Result<(), SecAggError> {
        self.ctx.check(&message.federation_id, message.round, &message.from)?;
        let reject = |reason: &str| SecAggError::Rejected {
            from: message.from,
            reason: reason.into(),
        };
        if message.to != self.me {
            return Err(reject("key shares addressed to another member"));
        }
        if self.input_sent {
            return Err(reject("key shares after this member's masked input went out"));
        }
        let advertisement = self
            .advertisements
            .get(&message.from)
            .ok_or_else(|| reject("key shares from a member that did not advertise"))?;
        let key = derive_key(
            &self.encryption.secret,
            &advertisement.encryption_key,
            &self.ctx.federation_id,
            self.ctx.round,
            &message.from,
            &self.me,
            Purpose::SealShares,
        )?;
        let plain = open(
            key,
            &self.ctx.federation_id,
            self.ctx.round,
            &message.from,
            &self.me,
            &message.ciphertext,
        )?;
        if plain.len() != 64 {
            return Err(reject("key shares of the wrong length"));
        }
        let held = Held {
            mask_secret: plain[..32].try_into().expect("32 bytes"),
            self_seed: plain[32..].try_into().expect("32 bytes"),
        };
        match self.held.get(&message.from) {
            Some(known) if *known != held => Err(reject("a second, different set of key shares")),
            _ => {
                self.held.insert(message.from, held);
                Ok(())
            }
        }
    }

    /// Masks `values` (from [`super::encode_knowledge`]) with this member's
    /// self mask and a pair mask with every member whose key shares it
    /// holds, and signs the result. Once per round.
    pub fn masked_input(&mut self, values: &[u32]) -> Result<MaskedInput, SecAggError> {
        if !self.shares_sent {
            return Err(SecAggError::OutOfOrder("masked input before key shares were sent"));
        }
        if self.input_sent {
            return Err(SecAggError::OutOfOrder("masked input already sent this round"));
        }
        let mut masked = values.to_vec();
        let masked_with: Vec<PublicKey> =
            self.held.keys().copied().filter(|p| *p != self.me).collect();
        for peer in &masked_with {
            let seed = self.pair_seed(&self.mask.secret, &self.me, peer)?;
            apply_mask(&mut masked, &seed, self.me < *peer);
        }
        apply_mask(&mut masked, &self.self_seed, true);
        self.input_sent = true;
        let mut input = MaskedInput {
            federation_id: self.ctx.federation_id.clone(),
            round: self.ctx.round,
            from: self.me,
            masked_with,
            values: masked,
            signature: Signature([0; 64]),
        };
        input.signature = self.signing.sign(&input.signing_bytes());
        Ok(input)
    }

    /// The pair-mask seed between `owner` (whose mask secret is `secret`)
    /// and `other` (whose advertised mask key is used).
    fn pair_seed(&self, secret: &[u8; 32], owner: &PublicKey, other: &PublicKey) -> Result<[u8; 32], SecAggError> {
        let advertisement = self
            .advertisements
            .get(other)
            .ok_or(SecAggError::Rejected {
                from: *other,
                reason: "no key advertisement for a member it was masked with".into(),
            })?;
        let (first, second) = if owner < other { (owner, other) } else { (other, owner) };
        derive_key(
            secret,
            &advertisement.mask_key,
            &self.ctx.federation_id,
            self.ctx.round,
            first,
            second,
            Purpose::PairMask,
        )
    }

    /// Accepts a peer's masked input for the sum. Refused once this member
    /// revealed the sender's mask secret (the input could then be unmasked
    /// alone).
    pub fn accept_masked_input(&mut self, input: &MaskedInput) -> Result<(), SecAggError> {
        input.verify(&self.ctx)?;
        if self.mask_secret_revealed.contains(&input.from) {
            return Err(SecAggError::Rejected {
                from: input.from,
                reason: "masked input after its mask secret was revealed as dropped".into(),
            });
        }
        self.inputs_accepted.insert(input.from);
        Ok(())
    }

    /// This member's reveal for the agreed `survivors`: self-seed shares of
    /// survivors, mask-secret shares of the others whose shares it holds,
    /// except those whose masked input it accepted (withheld). Refuses a
    /// second reveal for a different survivor set.
    pub fn reveal(&mut self, survivors: &[PublicKey]) -> Result<Reveal, SecAggError> {
        let set = self.ctx.normalise(survivors)?;
        let digest = self.ctx.survivors_digest(&set);
        match self.revealed_for {
            Some(d) if d != digest => {
                return Err(SecAggError::OutOfOrder(
                    "already revealed for a different survivor set this round",
                ));
            }
            _ => self.revealed_for = Some(digest),
        }
        let mut self_mask_shares = Vec::new();
        let mut mask_key_shares = Vec::new();
        for (member, held) in &self.held {
            if set.contains(member) {
                self_mask_shares.push((*member, held.self_seed));
            } else if !self.inputs_accepted.contains(member) && *member != self.me {
                mask_key_shares.push((*member, held.mask_secret));
                self.mask_secret_revealed.insert(*member);
            }
        }
        let mut reveal = Reveal {
            federation_id: self.ctx.federation_id.clone(),
            round: self.ctx.round,
            from: self.me,
            survivors: digest,
            self_mask_shares,
            mask_key_shares,
            signature: Signature([0; 64]),
        };
        reveal.signature = self.signing.sign(&reveal.signing_bytes());
        Ok(reveal)
    }

    /// Signs the survivor set this member will reveal for: itself and
    /// every member whose masked input it accepted. Once per round.
    pub fn survivor_view(&mut self) -> Result<SurvivorView, SecAggError> {
        if self.my_view.is_some() {
            return Err(SecAggError::OutOfOrder("survivor view already sent this round"));
        }
        if !self.input_sent {
            return Err(SecAggError::OutOfOrder("survivor view before this member's masked input"));
        }
        let mut survivors: Vec<PublicKey> = self.inputs_accepted.iter().copied().collect();
        survivors.push(self.me);
        survivors.sort();
        survivors.dedup();
        self.my_view = Some(survivors.clone());
        let mut view = SurvivorView {
            federation_id: self.ctx.federation_id.clone(),
            round: self.ctx.round,
            from: self.me,
            survivors,
            signature: Signature([0; 64]),
        };
        view.signature = self.signing.sign(&view.signing_bytes());
        Ok(view)
    }

    /// Records a peer's survivor view. A second, different view from the
    /// same member is equivocation and refused.
    pub fn accept_view(&mut self, view: &SurvivorView) -> Result<(), SecAggError> {
        view.verify(&self.ctx)?;
        match self.views.get(&view.from) {
            Some(known) if *known != view.survivors => Err(SecAggError::Rejected {
                from: view.from,
                reason: "a second, different survivor view for the round".into(),
            }),
            _ => {
                self.views.insert(view.from, view.survivors.clone());
                Ok(())
            }
        }
    }

    /// The survivor set this member announced, once every other member of
    /// it has announced the same set; the error names the first member that
    /// did not (missing) or saw another set (then this member must not
    /// reveal: the round is not aggregated).
    pub fn confirmed_survivors(&self) -> Result<Vec<PublicKey>, SecAggError> {
        let mine = self
            .my_view
            .as_ref()
            .ok_or(SecAggError::OutOfOrder("reveal before this member's survivor view"))?;
        for member in mine.iter().filter(|m| **m != self.me) {
            match self.views.get(member) {
                None => return Err(SecAggError::Unconfirmed { member: *member }),
                Some(theirs) if theirs != mine => {
                    return Err(SecAggError::Disagreement {
                        member: *member,
                        theirs: theirs.len(),
                        mine: mine.len(),
                    });
                }
                Some(_) => {}
            }
        }
        Ok(mine.clone())
    }

    /// [`Self::reveal`] for the survivor set every survivor confirmed
    /// ([`Self::confirmed_survivors`]): what a member runs between
    /// processes, where nobody announces one set to all.
    pub fn reveal_confirmed(&mut self) -> Result<(Vec<PublicKey>, Reveal), SecAggError> {
        let survivors = self.confirmed_survivors()?;
        let reveal = self.reveal(&survivors)?;
        Ok((survivors, reveal))
    }

    /// Verifies a peer's reveal for `survivors` without using it (the
    /// node checks reveals as they arrive; [`Self::unmask`] checks again).
    pub fn check_reveal(&self, reveal: &Reveal, survivors: &[PublicKey]) -> Result<(), SecAggError> {
        let set = self.ctx.normalise(survivors)?;
        reveal.verify(&self.ctx, &set)
    }

    /// The sum of the survivors' inputs. `inputs` must hold every
    /// survivor's masked input; `reveals` those received (reveals that fail
    /// a check are listed in [`Unmasked::refused`] and not used).
    pub fn unmask(
        &self,
        survivors: &[PublicKey],
        inputs: &[MaskedInput],
        reveals: &[Reveal],
    ) -> Result<Unmasked, SecAggError> {
        let set = self.ctx.normalise(survivors)?;
        if set.is_empty() {
            return Err(SecAggError::Config("the survivor set is empty".into()));
        }
        let mut by_member: BTreeMap<PublicKey, &MaskedInput> = BTreeMap::new();
        for input in inputs.iter().filter(|i| set.contains(&i.from)) {
            input.verify(&self.ctx)?;
            by_member.insert(input.from, input);
        }
        let len = match set.iter().next().and_then(|s| by_member.get(s)) {
            Some(first) => first.values.len(),
            None => return Err(SecAggError::MissingInput(*set.iter().next().expect("non-empty"))),
        };
        for s in &set {
            let input = by_member.get(s).ok_or(SecAggError::MissingInput(*s))?;
            if input.values.len() != len {
                return Err(SecAggError::Malformed(format!(
                    "masked input of {s} has {} values, others {len}",
                    input.values.len()
                )));
            }
            for m in &input.masked_with {
                self.ctx.x_of(m)?;
                if set.contains(m) && !by_member[m].masked_with.contains(s) {
                    return Err(SecAggError::Inconsistent { a: *s, b: *m });
                }
            }
        }
        // Dropped members whose pair masks are in some survivor's input.
        let dropped: BTreeSet<PublicKey> = by_member
            .values()
            .flat_map(|i| i.masked_with.iter().copied())
            .filter(|m| !set.contains(m))
            .collect();

        let mut refused = Vec::new();
        let mut self_shares: BTreeMap<PublicKey, Vec<SecretShare>> = BTreeMap::new();
        let mut mask_shares: BTreeMap<PublicKey, Vec<SecretShare>> = BTreeMap::new();
        let mut revealers = BTreeSet::new();
        for reveal in reveals {
            if let Err(e) = reveal.verify(&self.ctx, &set) {
                refused.push(e);
                continue;
            }
            if !revealers.insert(reveal.from) {
                continue;
            }
            let x = self.ctx.x_of(&reveal.from)?;
            for (m, y) in &reveal.self_mask_shares {
                self_shares.entry(*m).or_default().push(SecretShare { x, y: *y });
            }
            for (m, y) in &reveal.mask_key_shares {
                mask_shares.entry(*m).or_default().push(SecretShare { x, y: *y });
            }
        }

        let t = self.ctx.threshold;
        let rebuild = |shares: Option<&Vec<SecretShare>>, member: &PublicKey, secret: &'static str| {
            let shares = shares.map_or(&[][..], Vec::as_slice);
            if shares.len() < t {
                return Err(SecAggError::BelowThreshold {
                    member: *member,
                    secret,
                    have: shares.len(),
                    need: t,
                });
            }
            shamir::combine(shares, t)
        };

        let mut sum = vec![0u32; len];
        for input in by_member.values() {
            for (s, v) in sum.iter_mut().zip(&input.values) {
                *s = s.wrapping_add(*v);
            }
        }
        for s in &set {
            let seed = rebuild(self_shares.get(s), s, "self-mask seed")?;
            let advertised = self.advertisements.get(s).ok_or(SecAggError::Rejected {
                from: *s,
                reason: "no key advertisement for a survivor".into(),
            })?;
            if sha256(&seed) != advertised.self_mask_commitment {
                return Err(SecAggError::BadReveal {
                    member: *s,
                    secret: "self-mask seed",
                });
            }
            apply_mask(&mut sum, &seed, false);
        }
        for d in &dropped {
            let secret = rebuild(mask_shares.get(d), d, "mask secret")?;
            let advertised = self.advertisements.get(d).ok_or(SecAggError::Rejected {
                from: *d,
                reason: "no key advertisement for a dropped member".into(),
            })?;
            if x25519(secret, X25519_BASEPOINT_BYTES) != advertised.mask_key {
                return Err(SecAggError::BadReveal {
                    member: *d,
                    secret: "mask secret",
                });
            }
            for (s, input) in &by_member {
                if input.masked_with.contains(d) {
                    // s added +mask if s < d; remove what it added.
                    let seed = self.pair_seed(&secret, d, s)?;
                    apply_mask(&mut sum, &seed, s >= d);
                }
            }
        }
        Ok(Unmasked { sum, refused })
    }
}
