//! A malicious member against secure aggregation between `fd-node`
//! processes. A members-only federation: a coordinator, two honest members
//! with `[secure_aggregation] enabled = true`, and a third listed member
//! (in-process, the real protocol over libp2p) that joins honestly and then,
//! as soon as each round is announced, sends member 0:
//! - a key advertisement in member 1's name (its own keys, its own
//!   signature);
//! - its own advertisement (also to member 1), then a second, different one;
//! - key shares addressed to member 1;
//! - a masked input for the next round, before it is open;
//!
//! and then stays silent (no key shares, no input).
//!
//! Without the sender check, the advertisement in member 1's name took
//! member 1's place in member 0's round (member 1's own was refused as a
//! second, different advertisement), member 0 left member 1 out of its
//! masks and neither honest member could unmask any round (`aggregated 0`).
//! Now every message is refused with its reason and counted, and in every
//! round both honest members unmask the sum of the two of them: the silent
//! member costs one step's timeout, not the round.

use std::time::Duration;

use fd_protocol::secagg::{
    EncryptedKeyShares, MaskedInput, Participant, RoundContext, SecAggMessage, os_rng,
};
use fd_protocol::{Control, Message, PublicKey, RoundMetrics};
use fd_tests::attacker::{Attacker, refusal_code};
use fd_tests::*;

const ROUNDS: u64 = 3;
const MALLORY_SEED: u8 = 67;

#[test]
fn a_malicious_member_cannot_take_another_members_place_in_secure_aggregation() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut members = seeded_node_keys(dir, 2);
    let mallory_id = fd_net::peer_id_of(
        &fd_protocol::SigningKey::from_seed([MALLORY_SEED; 32]).public_key(),
    )
    .unwrap()
    .to_string();
    members.push(mallory_id);
    let federation = federation_toml_with("secagg-trust", ROUNDS, &members_line(&members));
    let manifest = manifest_of(&federation);
    let config = coordinator_toml(dir, 3, 60, &federation);
    let (mut coordinator, address) = Proc::coordinator("coordinator", &config, dir);
    let configs = node_configs(dir, 2, 0.5, Some(&address), "honest", &federation);
    for config in &configs {
        let text = std::fs::read_to_string(config).unwrap();
        std::fs::write(
            config,
            format!("{text}\n[secure_aggregation]\nenabled = true\nphase_timeout_secs = 2\n"),
        )
        .unwrap();
    }
    let mut honest = start_nodes(&configs, dir);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let verdicts = rt.block_on(async {
        let mallory = Attacker::new(MALLORY_SEED, "mallory").await;
        let coordinator_peer = mallory.learn(&address).await;
        let welcome = mallory.join(coordinator_peer, &manifest).await;
        assert!(matches!(welcome, Message::Welcome { .. }), "{welcome:?}");
        let member0 = fd_net::membership::member_key(&members[0]).unwrap();
        play_mallory(mallory, coordinator_peer, &manifest, member0).await
    });
    for node in &mut honest {
        node.wait_success(Duration::from_secs(600));
    }
    coordinator.wait_success(Duration::from_secs(120));

    for (i, node) in honest.iter().enumerate() {
        let metrics = read_metrics(&dir.join(format!("honest-{i}.jsonl")));
        assert_eq!(metrics.len() as u64, ROUNDS, "node {i}");
        for m in &metrics {
            assert_eq!(
                m.shares_aggregated, 1,
                "node {i} round {}: the other honest member's knowledge is in the sum\n{}",
                m.round,
                node.log_tail()
            );
            assert!(m.distilled, "node {i} round {}", m.round);
            assert_eq!(m.shares_sent, 0, "node {i} round {}", m.round);
        }
    }
    for (what, answer) in &verdicts {
        let expected = match *what {
            "own advertisement" => None,
            "advertisement in member 1's name" => Some("not_sender"),
            "next round's masked input" => Some("future_round"),
            _ => Some("invalid_field"),
        };
        assert_eq!(refusal_code(answer), expected, "{what}: {answer:?}");
    }
    let count = |what: &str| verdicts.iter().filter(|(w, _)| *w == what).count() as u64;
    assert_eq!(count("advertisement in member 1's name"), ROUNDS);
    assert_eq!(count("own advertisement"), 2 * ROUNDS);

    let last = read_metrics(&dir.join("honest-0.jsonl")).pop().unwrap();
    assert_eq!(refusals(&last, "not_sender"), ROUNDS, "{:?}", last.rejections);
    assert_eq!(refusals(&last, "invalid_field"), 2 * ROUNDS, "{:?}", last.rejections);
    assert!(refusals(&last, "future_round") >= ROUNDS - 1, "{:?}", last.rejections);
    let logged = log_lines(&honest[0], "secure aggregation message refused");
    assert!(logged.len() as u64 >= 4 * ROUNDS - 1, "{logged:?}");
    assert!(logged.iter().all(|l| l.contains("peer=") && l.contains("reason=")), "{logged:?}");
}

/// Plays the member until `Done`; returns what it sent and the answers.
async fn play_mallory(
    mut mallory: Attacker,
    coordinator: libp2p::PeerId,
    manifest: &fd_protocol::FederationManifest,
    member0_key: PublicKey,
) -> Vec<(&'static str, Message)> {
    let mut verdicts = Vec::new();
    let mut rng = os_rng();
    while let Some(request) = mallory.requests.recv().await {
        let Message::Control(signed) = &request.message else {
            // The honest members' advertisements and key shares: taken.
            mallory.client.respond(request.channel, Message::Ack).await.unwrap();
            continue;
        };
        let signed = signed.clone();
        mallory.client.respond(request.channel, Message::Ack).await.unwrap();
        let announcement = match &signed.control {
            Control::Round(a) => a.clone(),
            Control::Done { .. } => break,
        };
        let round = announcement.round;
        let mut honest: Vec<_> = announcement
            .members
            .iter()
            .filter(|m| m.key != mallory.me.key)
            .cloned()
            .collect();
        honest.sort_by_key(|m| m.key != member0_key);
        let member0 = mallory.learn_member(&honest[0]).await;
        let member1 = mallory.learn_member(&honest[1]).await;
        let keys: Vec<PublicKey> = announcement.members.iter().map(|m| m.key).collect();
        let ctx = RoundContext::new(&manifest.federation_id, round, &keys, 2).unwrap();
        let (_, own) = Participant::new(ctx.clone(), &mallory.key, &mut rng).unwrap();
        let (_, second) = Participant::new(ctx, &mallory.key, &mut rng).unwrap();
        let mut impersonation = own.clone();
        impersonation.member = honest[1].key;
        let shares_for_1 = EncryptedKeyShares {
            federation_id: manifest.federation_id.clone(),
            round,
            from: mallory.me.key,
            to: honest[1].key,
            ciphertext: vec![0; 80],
        };
        let mut sends = vec![
            (
                "advertisement in member 1's name",
                SecAggMessage::Advertise(impersonation),
            ),
            ("own advertisement", SecAggMessage::Advertise(own.clone())),
            ("second advertisement", SecAggMessage::Advertise(second)),
            ("key shares for member 1", SecAggMessage::KeyShares(shares_for_1)),
        ];
        if round < manifest.rounds {
            sends.push((
                "next round's masked input",
                SecAggMessage::Input(MaskedInput {
                    federation_id: manifest.federation_id.clone(),
                    round: round + 1,
                    from: mallory.me.key,
                    masked_with: vec![],
                    values: vec![7; 4],
                    signature: own.signature,
                }),
            ));
        }
        for (what, message) in sends {
            let answer = send_when_open(&mallory, member0, message, round).await;
            verdicts.push((what, answer));
        }
        let own = SecAggMessage::Advertise(own);
        let answer = send_when_open(&mallory, member1, own, round).await;
        verdicts.push(("own advertisement", answer));
        // Its own report, so the coordinator does not wait for it.
        let report = RoundMetrics::new(&manifest.federation_id, round, mallory.me.key, "mallory");
        let answer = mallory.send(coordinator, Message::Metrics(report)).await.unwrap();
        assert_eq!(refusal_code(&answer), None, "{answer:?}");
    }
    verdicts
}

/// Sends `message`; while the member has not seen `round`'s announcement
/// yet (it answers `future_round` or `unknown_sender` for a message of that
/// round), tries again.
async fn send_when_open(
    mallory: &Attacker,
    peer: libp2p::PeerId,
    message: SecAggMessage,
    round: u64,
) -> Message {
    loop {
        let answer = mallory.send(peer, Message::SecAgg(message.clone())).await.unwrap();
        let early = matches!(refusal_code(&answer), Some("future_round" | "unknown_sender"))
            && message.round() == round;
        if !early {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
