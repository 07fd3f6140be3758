//! A members-only federation (allow-list) with one malicious listed member.
//! Two honest `fd-node` processes and a coordinator run 3 rounds; the third
//! member (in-process, the real protocol over libp2p) joins honestly, under
//! a name with a comma, quotes and a newline, shares and reports like a
//! member, and every round also sends member 0:
//! - an announcement of the same round without member 1, signed by itself;
//! - an announcement of the next round whose deadline has already passed;
//! - the coordinator's own signed announcement of the round, replayed;
//! - `Done`;
//! - a validly signed share for the next round, before it is open;
//!
//! and sends the coordinator a report in member 0's name with accuracy 0.999.
//!
//! Before the control plane was authenticated, the first made member 0
//! refuse member 1's honest shares for the whole round, the second made it
//! skip distillation and push its share to the attacker only (3 rounds took
//! 3 minutes instead of 2 seconds), and the coordinator recorded the forged
//! report as member 0's. Now each is refused with its own reason and
//! counted, and every round of every honest member aggregates both other
//! members' shares within the deadline.

use std::time::Duration;

use fd_protocol::{Control, Message, RoundMetrics};
use fd_tests::attacker::{Attacker, refusal_code};
use fd_tests::*;

const ROUNDS: u64 = 3;
const ROUND_TIMEOUT_SECS: u64 = 60;
const MALLORY_SEED: u8 = 66;
const MALLORY_NAME: &str = "mallory, \"the member\"\nsecond line";

#[test]
fn a_malicious_member_cannot_steer_others_or_report_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut members = seeded_node_keys(dir, 2);
    let mallory_id = fd_net::peer_id_of(
        &fd_protocol::SigningKey::from_seed([MALLORY_SEED; 32]).public_key(),
    )
    .unwrap()
    .to_string();
    members.push(mallory_id.clone());
    let federation = federation_toml_with("members-only", ROUNDS, &members_line(&members));
    let manifest = manifest_of(&federation);
    let config = coordinator_toml(dir, 3, ROUND_TIMEOUT_SECS, &federation);
    let (mut coordinator, address) = Proc::coordinator("coordinator", &config, dir);
    let configs = node_configs(dir, 2, 0.5, Some(&address), "honest", &federation);
    let mut honest = start_nodes(&configs, dir);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let verdicts = rt.block_on(async {
        let mallory = Attacker::new(MALLORY_SEED, MALLORY_NAME).await;
        let coordinator_peer = mallory.learn(&address).await;
        let welcome = mallory.join(coordinator_peer, &manifest).await;
        assert!(matches!(welcome, Message::Welcome { .. }), "{welcome:?}");
        let member0 = fd_net::membership::member_key(&members[0]).unwrap();
        play_mallory(mallory, coordinator_peer, &manifest, member0).await
    });
    for node in &mut honest {
        node.wait_success(Duration::from_secs(600));
    }
    coordinator.wait_success(Duration::from_secs(60));

    for (what, answer) in &verdicts {
        let expected = match *what {
            "own share" => None,
            "own report" => None,
            "future share" => Some("future_round"),
            "report for member 0" => Some("not_sender"),
            _ => Some("not_coordinator"),
        };
        assert_eq!(refusal_code(answer), expected, "{what}: {answer:?}");
    }
    let count = |what: &str| verdicts.iter().filter(|(w, _)| *w == what).count() as u64;
    assert_eq!(count("same round without member 1"), ROUNDS);
    assert_eq!(count("own share"), 2 * ROUNDS);

    // Every honest member: all rounds, both other shares, well before the deadline.
    let mut honest_accuracy = Vec::new();
    for i in 0..2 {
        let metrics = read_metrics(&dir.join(format!("honest-{i}.jsonl")));
        assert_eq!(metrics.len() as u64, ROUNDS, "node {i}");
        for m in &metrics {
            assert_eq!(m.shares_aggregated, 2, "node {i} round {}", m.round);
            assert!(m.distilled, "node {i} round {}", m.round);
            assert!(
                m.network_seconds < ROUND_TIMEOUT_SECS as f64 / 2.0,
                "node {i} round {} waited {} s",
                m.round,
                m.network_seconds
            );
            honest_accuracy.push((m.round, m.node.to_hex(), m.test_accuracy));
        }
    }
    let last = read_metrics(&dir.join("honest-0.jsonl")).pop().unwrap();
    assert_eq!(
        refusals(&last, "not_coordinator"),
        4 * ROUNDS,
        "{:?}",
        last.rejections
    );
    assert_eq!(
        refusals(&last, "future_round"),
        ROUNDS - 1,
        "{:?}",
        last.rejections
    );

    // The coordinator's table: one row per member and round, the odd name
    // intact, member 0's accuracy its own.
    let text = std::fs::read(dir.join("coordinator-metrics.csv")).unwrap();
    let mut reader = csv::Reader::from_reader(text.as_slice());
    let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
    assert_eq!(rows.len() as u64, 3 * ROUNDS);
    assert_eq!(
        rows.iter().filter(|r| &r[2] == MALLORY_NAME).count() as u64,
        ROUNDS
    );
    for (round, node, accuracy) in honest_accuracy {
        let row = rows
            .iter()
            .find(|r| r[0] == round.to_string() && r[1] == node)
            .expect("a row per honest member and round");
        let recorded: f64 = row[3].parse().unwrap();
        assert!((recorded - accuracy).abs() < 1e-6, "{row:?}");
    }
}

/// Plays the member until `Done`; returns what it sent and the answers.
async fn play_mallory(
    mut mallory: Attacker,
    coordinator: libp2p::PeerId,
    manifest: &fd_protocol::FederationManifest,
    member0_key: fd_protocol::PublicKey,
) -> Vec<(&'static str, Message)> {
    let mut verdicts = Vec::new();
    while let Some(request) = mallory.requests.recv().await {
        let signed = match &request.message {
            Message::Control(signed) => signed.clone(),
            other => {
                // The honest members' shares: taken, as a member would.
                let answer = match other {
                    Message::Share(_) => Message::ShareAccepted,
                    _ => Message::Ack,
                };
                mallory
                    .client
                    .respond(request.channel, answer)
                    .await
                    .unwrap();
                continue;
            }
        };
        mallory
            .client
            .respond(request.channel, Message::Ack)
            .await
            .unwrap();
        let announcement = match &signed.control {
            Control::Round(a) => a.clone(),
            Control::Done { .. } => break,
        };
        // Let the broadcast reach the honest members first.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let round = announcement.round;
        // Member 0 first, whatever order the coordinator lists members in.
        let mut honest: Vec<_> = announcement
            .members
            .iter()
            .filter(|m| m.key != mallory.me.key)
            .cloned()
            .collect();
        honest.sort_by_key(|m| m.key != member0_key);
        assert_eq!(honest[0].key, member0_key);
        let member0 = mallory.learn_member(&honest[0]).await;
        let member1 = mallory.learn_member(&honest[1]).await;
        let without_1: Vec<_> = announcement
            .members
            .iter()
            .filter(|m| m.key != honest[1].key)
            .cloned()
            .collect();
        let now = fd_data::fsutil::now_unix_ms();
        let mut sends = vec![
            (
                "same round without member 1",
                mallory.forged_round(
                    manifest,
                    round,
                    announcement.deadline_unix_ms + 1,
                    without_1,
                ),
            ),
            (
                "next round, deadline passed",
                mallory.forged_round(
                    manifest,
                    round + 1,
                    now - 1_000,
                    announcement.members.clone(),
                ),
            ),
            ("replayed announcement", Message::Control(signed.clone())),
            ("done", mallory.forged_done(manifest)),
        ];
        if round < manifest.rounds {
            sends.push((
                "future share",
                Message::Share(mallory.share(manifest, round + 1)),
            ));
        }
        for (what, message) in sends {
            let answer = mallory.send(member0, message).await.unwrap();
            verdicts.push((what, answer));
        }
        let forged_report = RoundMetrics {
            test_accuracy: 0.999,
            ..RoundMetrics::new(&manifest.federation_id, round, honest[0].key, "node-0")
        };
        let answer = mallory
            .send(coordinator, Message::Metrics(forged_report))
            .await
            .unwrap();
        verdicts.push(("report for member 0", answer));
        // Then behave: its own share to both, its own report.
        for peer in [member0, member1] {
            let share = Message::Share(mallory.share(manifest, round));
            let answer = fd_net::request_with_retry(&mallory.client, peer, share, 5)
                .await
                .unwrap();
            assert_eq!(answer, Message::ShareAccepted, "round {round}");
            verdicts.push(("own share", answer));
        }
        let report = RoundMetrics::new(&manifest.federation_id, round, mallory.me.key, "any");
        let answer = mallory
            .send(coordinator, Message::Metrics(report))
            .await
            .unwrap();
        verdicts.push(("own report", answer));
    }
    verdicts
}
