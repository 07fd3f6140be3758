//! Who belongs to a federation, named by PeerId in configs.
//!
//! A member's PeerId and its share-signing key are the same Ed25519 key
//! (see [`crate::libp2p_keypair`]); an Ed25519 PeerId embeds the public
//! key itself (identity multihash), so a config that lists PeerIds gives
//! every member the keys it verifies shares against, with no key exchange.

use fd_protocol::PublicKey;
use libp2p::PeerId;

/// The Ed25519 key inside a PeerId written as text (`12D3KooW…`).
pub fn member_key(peer_id: &str) -> Result<PublicKey, String> {
    let peer: PeerId = peer_id.parse().map_err(|e| format!("not a PeerId: {e}"))?;
    key_of_peer(&peer)
}

/// The Ed25519 key inside `peer`.
pub fn key_of_peer(peer: &PeerId) -> Result<PublicKey, String> {
    let hash = peer.as_ref();
    if hash.code() != 0 {
        return Err("the PeerId is a hash of its key, not the key itself (not Ed25519)".into());
    }
    let key = libp2p::identity::PublicKey::try_decode_protobuf(hash.digest())
        .map_err(|e| format!("no public key inside: {e}"))?
        .try_into_ed25519()
        .map_err(|_| "the key is not Ed25519".to_string())?;
    Ok(PublicKey(key.to_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fd_protocol::SigningKey;

    #[test]
    fn a_peer_id_gives_back_its_signing_key() {
        let key = SigningKey::from_seed([7; 32]);
        let peer = crate::peer_id_of(&key.public_key()).unwrap();
        assert_eq!(member_key(&peer.to_string()).unwrap(), key.public_key());
        assert!(member_key("not-a-peer-id").is_err());
        // An RSA-style (sha256 multihash) PeerId carries no key.
        let hashed =
            PeerId::from_multihash(libp2p::multihash::Multihash::wrap(0x12, &[0u8; 32]).unwrap())
                .unwrap();
        assert!(key_of_peer(&hashed).is_err());
    }
}
