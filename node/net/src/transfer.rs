//! Large shares: announce on gossip, pull in chunks over request-response.
//!
//! # Design
//!
//! A share no larger than [`INLINE_SHARE_BYTES`](fd_protocol::INLINE_SHARE_BYTES)
//! is pushed whole as one `Message::Share` request, as before. A larger one
//! (up to [`MAX_SHARE_BYTES`]) would not fit a frame
//! ([`MAX_MESSAGE_BYTES`](fd_protocol::MAX_MESSAGE_BYTES), 4 MiB), and must
//! not be flooded through gossip (every peer would relay every copy), so it
//! moves in two steps (wire format: [`fd_protocol::transfer`]):
//!
//! 1. The sender encodes the share once
//!    ([`fd_protocol::encode_share`]), describes it with a
//!    [`ShareAnnouncement`] (digest = SHA-256 of the encoding) and calls
//!    [`Client::offer_share`](super::Client::offer_share): the bytes go into the
//!    event loop's [`OutgoingStore`]. It then calls
//!    [`Client::announce`](super::Client::announce), which publishes
//!    `Message::ShareAvailable(announcement)` on the federation's gossipsub
//!    topic `/fd/<federation_id>/shares`, after waiting (bounded) until the
//!    peers it names are connected and subscribed, dialling them if needed:
//!    gossipsub only delivers to peers whose subscription it has seen, and
//!    `flood_publish` sends the message straight to every one of them.
//! 2. Each receiver's event loop checks the announcement (its federation,
//!    size limits, and that the gossip author, verified by gossipsub's
//!    strict signature mode, is the announced sender's libp2p identity)
//!    before accepting it for propagation and handing it to the program on
//!    [`Network::announcements`](super::Network::announcements). The program
//!    decides whether it wants the share (member? open round?) and calls
//!    [`Client::fetch_share`](super::Client::fetch_share), which asks the
//!    sender for the chunks with `Message::FetchChunk`, a few requests in
//!    flight at a time ([`FETCH_WINDOW`]), checks every chunk's index and
//!    length against the announcement, and the SHA-256 of the whole against
//!    the digest. The program then decodes ([`fd_protocol::decode_share`])
//!    and validates the share exactly like a pushed one.
//!
//! The sender's event loop answers `FetchChunk` itself from the
//! [`OutgoingStore`]; the program never sees chunk requests. The store keeps
//! the shares of the last [`OUTGOING_ROUNDS`] rounds offered and at most
//! [`OUTGOING_MAX_BYTES`] in all (older rounds go first; the newest share is
//! always kept). A request for a share it no longer holds gets
//! `ChunkUnavailable`.
//!
//! An announcement can also be pushed to one peer as a `ShareAvailable`
//! request (e.g. to a peer that was not subscribed in time); the receiving
//! event loop applies the same checks (the requesting peer must be the
//! announced sender), answers `Ack` or `ShareRejected`, and delivers it on
//! the same channel.
//!
//! # Accounting
//!
//! Chunk frames pass through [`super::FdCodec`] and are counted as share
//! traffic; gossip announcements are counted by their data length, once per
//! recipient on the sending side (gossipsub's own control traffic and
//! relaying are not counted). A pulled share counts as sent
//! ([`super::Traffic::shares_sent`]) when its last chunk is served.
//!
//! # Limits
//!
//! Chunk data is at most [`CHUNK_BYTES`] (1 MiB); a share at most
//! [`MAX_SHARE_BYTES`] (256 MiB); a receiver never buffers more than the
//! announced size (checked chunk by chunk) and reserves at most
//! [`PREALLOCATE_MAX`] before data arrives. A forged announcement costs the
//! receiver at most one
//! download of the announced size before the digest check throws it away.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use anyhow::{Context as _, anyhow, bail};
use fd_protocol::transfer::{CHUNK_BYTES, MAX_CHUNKS, MAX_SHARE_BYTES, ShareAnnouncement};
use fd_protocol::{Digest, Message};
use futures::StreamExt as _;
use libp2p::PeerId;

use super::Client;

/// Rounds whose offered shares the event loop keeps for fetching.
pub const OUTGOING_ROUNDS: u64 = 3;

/// Bytes of offered shares the event loop keeps at most (the newest share is
/// kept even if it alone is larger).
pub const OUTGOING_MAX_BYTES: usize = 2 * MAX_SHARE_BYTES;

/// Chunk requests a fetch keeps in flight.
pub const FETCH_WINDOW: usize = 4;

/// A fetch reserves at most this much memory before data arrives.
pub const PREALLOCATE_MAX: usize = 16 * CHUNK_BYTES;

/// A share offered for fetching.
struct Offered {
    bytes: Arc<Vec<u8>>,
    /// Once announced, only the peers it was announced to may fetch it.
    recipients: Option<HashSet<PeerId>>,
}

/// Shares offered for fetching, by (round, digest), with pruning.
#[derive(Default)]
pub struct OutgoingStore {
    shares: BTreeMap<(u64, Digest), Offered>,
    bytes: usize,
}

impl OutgoingStore {
    /// Keeps `bytes` as round `round`'s share with `digest`, then prunes.
    pub fn insert(&mut self, round: u64, digest: Digest, bytes: Arc<Vec<u8>>) {
        self.bytes += bytes.len();
        let offered = Offered {
            bytes,
            recipients: None,
        };
        if let Some(old) = self.shares.insert((round, digest), offered) {
            self.bytes -= old.bytes.len();
        }
        self.prune(round, digest);
    }

    /// From now on only `recipients` (the peers the share is announced to)
    /// may fetch the share; anyone else is answered `ChunkUnavailable`.
    /// Adds to the recipients of an earlier announcement of the same share.
    pub fn restrict(&mut self, round: u64, digest: &Digest, recipients: &[PeerId]) {
        if let Some(offered) = self.shares.get_mut(&(round, *digest)) {
            offered
                .recipients
                .get_or_insert_with(HashSet::new)
                .extend(recipients.iter().copied());
        }
    }

    fn prune(&mut self, newest_round: u64, newest: Digest) {
        let latest = self
            .shares
            .keys()
            .map(|(r, _)| *r)
            .max()
            .unwrap_or(newest_round);
        let oldest_kept = latest.saturating_sub(OUTGOING_ROUNDS - 1);
        let keys: Vec<_> = self.shares.keys().copied().collect();
        // Oldest first; BTreeMap orders by round.
        for key in keys {
            let too_old = key.0 < oldest_kept;
            let too_big = self.bytes > OUTGOING_MAX_BYTES;
            if key == (newest_round, newest) || !(too_old || too_big) {
                continue;
            }
            if let Some(old) = self.shares.remove(&key) {
                self.bytes -= old.bytes.len();
            }
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Number of shares held.
    pub fn len(&self) -> usize {
        self.shares.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shares.is_empty()
    }

    /// The answer to `FetchChunk { round, digest, index }` from `peer`, and
    /// whether it is the share's last chunk.
    pub fn answer(
        &self,
        peer: &PeerId,
        round: u64,
        digest: &Digest,
        index: u32,
    ) -> (Message, bool) {
        let offered = self
            .shares
            .get(&(round, *digest))
            .filter(|o| o.recipients.as_ref().is_none_or(|r| r.contains(peer)));
        let Some(share) = offered.map(|o| &o.bytes) else {
            return (
                Message::ChunkUnavailable {
                    reason: format!(
                        "no share of round {round} with digest {} is held here",
                        digest.to_hex()
                    ),
                },
                false,
            );
        };
        let start = index as usize * CHUNK_BYTES;
        if index >= MAX_CHUNKS || start >= share.len() {
            return (
                Message::ChunkUnavailable {
                    reason: format!(
                        "chunk {index} is past the end of a {}-byte share",
                        share.len()
                    ),
                },
                false,
            );
        }
        let end = (start + CHUNK_BYTES).min(share.len());
        (
            Message::Chunk {
                index,
                data: share[start..end].to_vec(),
            },
            end == share.len(),
        )
    }
}

/// Pulls the share `announcement` describes from `peer` (see the module doc)
/// and returns its encoded bytes once length and digest match.
pub(crate) async fn fetch(
    client: &Client,
    peer: PeerId,
    announcement: &ShareAnnouncement,
) -> anyhow::Result<Vec<u8>> {
    let total = announcement.bytes;
    if total == 0 || total > MAX_SHARE_BYTES as u64 {
        bail!(
            "announced share of {total} bytes is outside 1..={MAX_SHARE_BYTES} bytes; not fetching"
        );
    }
    let chunks = announcement.chunks();
    let round = announcement.round;
    let digest = announcement.digest;
    let mut out = Vec::with_capacity((total as usize).min(PREALLOCATE_MAX));
    let mut responses = futures::stream::iter(0..chunks)
        .map(|index| {
            let client = client.clone();
            async move {
                let answer = client
                    .request(
                        peer,
                        Message::FetchChunk {
                            round,
                            digest,
                            index,
                        },
                    )
                    .await
                    .with_context(|| format!("fetching chunk {index} of {chunks} from {peer}"))?;
                anyhow::Ok((index, answer))
            }
        })
        .buffered(FETCH_WINDOW);
    while let Some(next) = responses.next().await {
        let (index, answer) = next?;
        let expected = announcement.chunk_len(index).expect("index < chunk count");
        match answer {
            Message::Chunk { index: got, data } => {
                if got != index {
                    bail!("{peer} answered chunk {got} to a request for chunk {index}");
                }
                if data.len() != expected {
                    bail!(
                        "chunk {index} from {peer} has {} bytes, expected {expected} \
                         (announced share of {total} bytes)",
                        data.len()
                    );
                }
                out.extend_from_slice(&data);
            }
            Message::ChunkUnavailable { reason } => {
                return Err(anyhow!("{peer} cannot serve chunk {index}: {reason}"));
            }
            other => bail!(
                "{peer} answered a chunk request with {}",
                Message::kind(&other)
            ),
        }
    }
    announcement
        .verify(&out)
        .map_err(|e| anyhow!("share fetched from {peer} does not match its announcement: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any peer: the tests below fetch shares that were never announced.
    #[allow(non_upper_case_globals)]
    static anyone: std::sync::LazyLock<PeerId> = std::sync::LazyLock::new(PeerId::random);

    fn digest(n: u8) -> Digest {
        Digest([n; 32])
    }

    #[test]
    fn store_serves_chunks_and_prunes_old_rounds() {
        let mut store = OutgoingStore::default();
        let share = Arc::new(
            (0..(2 * CHUNK_BYTES + 10))
                .map(|i| i as u8)
                .collect::<Vec<_>>(),
        );
        store.insert(1, digest(1), share.clone());
        let (m, last) = store.answer(&anyone, 1, &digest(1), 0);
        assert!(
            matches!(m, Message::Chunk { index: 0, ref data } if data[..] == share[..CHUNK_BYTES])
        );
        assert!(!last);
        let (m, last) = store.answer(&anyone, 1, &digest(1), 2);
        assert!(matches!(m, Message::Chunk { index: 2, ref data } if data.len() == 10));
        assert!(last);
        assert!(matches!(
            store.answer(&anyone, 1, &digest(1), 3).0,
            Message::ChunkUnavailable { .. }
        ));
        assert!(matches!(
            store.answer(&anyone, 1, &digest(2), 0).0,
            Message::ChunkUnavailable { .. }
        ));
        assert!(matches!(
            store.answer(&anyone, 2, &digest(1), 0).0,
            Message::ChunkUnavailable { .. }
        ));

        for round in 2..=OUTGOING_ROUNDS + 1 {
            store.insert(round, digest(round as u8), Arc::new(vec![0; 5]));
        }
        // Round 1 fell out of the window; the last OUTGOING_ROUNDS remain.
        assert_eq!(store.len(), OUTGOING_ROUNDS as usize);
        assert!(matches!(
            store.answer(&anyone, 1, &digest(1), 0).0,
            Message::ChunkUnavailable { .. }
        ));
        assert_eq!(store.bytes(), 5 * OUTGOING_ROUNDS as usize);
    }

    #[test]
    fn store_is_bounded_by_bytes_but_keeps_the_newest() {
        let mut store = OutgoingStore::default();
        let big = Arc::new(vec![0u8; OUTGOING_MAX_BYTES / 2 + 1]);
        store.insert(1, digest(1), big.clone());
        store.insert(1, digest(2), big.clone());
        // Two would exceed the bound: the older one goes.
        assert_eq!(store.len(), 1);
        assert!(matches!(
            store.answer(&anyone, 1, &digest(2), 0).0,
            Message::Chunk { .. }
        ));
        assert!(store.bytes() <= OUTGOING_MAX_BYTES);
    }

    #[test]
    fn an_announced_share_is_served_to_its_recipients_only() {
        let mut store = OutgoingStore::default();
        store.insert(1, digest(1), Arc::new(vec![7; 10]));
        let (member, outsider) = (PeerId::random(), PeerId::random());
        store.restrict(1, &digest(1), &[member]);
        assert!(matches!(
            store.answer(&member, 1, &digest(1), 0).0,
            Message::Chunk { index: 0, .. }
        ));
        assert!(matches!(
            store.answer(&outsider, 1, &digest(1), 0).0,
            Message::ChunkUnavailable { .. }
        ));
    }
}
