//! An open federation (no member list) against an outsider that never
//! joined. A coordinator and two `fd-node` processes run 3 rounds twice
//! with the same keys, data and seeds: once alone, once while the outsider
//! (an in-process swarm speaking the real protocol) keeps sending member 0
//! round announcements that list itself, announcements that name the
//! coordinator as their signer, `Done`, and logit shares of every round
//! signed with its own key, all mass on class 0.
//!
//! Before the control plane was authenticated this outsider took member 0
//! over: its announcements were obeyed, its shares aggregated in place of
//! the honest member's, accuracy fell from .53–.64 to .12–.43, and a forged
//! `Done` ended the member. Now every one of its messages is refused with
//! its reason and counted, and member 0 computes exactly what it computes
//! without the attacker.

use std::time::Duration;

use fd_protocol::{Control, RoundAnnouncement};
use fd_tests::attacker::{Attacker, refusal_code};
use fd_tests::*;

const NODES: usize = 2;
const ROUNDS: u64 = 3;

#[test]
fn an_outsider_can_neither_steer_nor_feed_an_open_federation() {
    let federation = federation_toml("open-outsider", ROUNDS);
    let manifest = manifest_of(&federation);

    // The reference: the same federation without the attacker.
    let alone = tempfile::tempdir().unwrap();
    run_federation(alone.path(), &federation, |_, _| {});

    let attacked = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut answers = Vec::new();
    run_federation(attacked.path(), &federation, |coordinator, victim| {
        let victim_address = node_address(victim);
        let pid = victim.child.id();
        answers = rt.block_on(async {
            let outsider = Attacker::new(77, "outsider").await;
            let coordinator_key =
                fd_net::membership::member_key(coordinator.rsplit("/p2p/").next().unwrap())
                    .unwrap();
            let target = outsider.learn(&victim_address).await;
            let mut answers = Vec::new();
            let mut round = 1;
            // Until the victim exits (it finishes all rounds on the real clock).
            while resident_kib(pid).is_some() {
                let deadline = fd_data::fsutil::now_unix_ms() + 30_000;
                let members = vec![outsider.me.clone()];
                let sends = [
                    (
                        "round",
                        outsider.forged_round(&manifest, round, deadline, members.clone()),
                    ),
                    (
                        "impersonated round",
                        outsider.impersonated(
                            Control::Round(RoundAnnouncement {
                                federation_id: manifest.federation_id.clone(),
                                round,
                                deadline_unix_ms: deadline,
                                members,
                            }),
                            &coordinator_key,
                        ),
                    ),
                    ("done", outsider.forged_done(&manifest)),
                    (
                        "share",
                        fd_protocol::Message::Share(outsider.share(&manifest, round)),
                    ),
                ];
                for (what, message) in sends {
                    if let Ok(answer) = outsider.send(target, message).await {
                        answers.push((what, answer));
                    }
                }
                round = round % ROUNDS + 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            answers
        });
    });

    // Every message of the outsider was refused, each kind with its reason.
    for kind in ["round", "impersonated round", "done", "share"] {
        let n = answers.iter().filter(|(what, _)| *what == kind).count();
        assert!(n >= 3, "only {n} `{kind}` messages reached the victim");
    }
    for (what, answer) in &answers {
        let expected = if *what == "share" {
            "unknown_sender"
        } else {
            "not_coordinator"
        };
        assert_eq!(refusal_code(answer), Some(expected), "{what}: {answer:?}");
    }

    // The victim computed exactly what it computes alone.
    for i in 0..NODES {
        let with = read_metrics(&attacked.path().join(format!("fd-{i}.jsonl")));
        let without = read_metrics(&alone.path().join(format!("fd-{i}.jsonl")));
        assert_eq!(with.len() as u64, ROUNDS, "node {i} ran every round");
        for (a, b) in with.iter().zip(&without) {
            assert_eq!(a.round, b.round);
            assert_eq!(a.shares_aggregated, 1, "node {i} round {}", a.round);
            assert_eq!(
                (a.test_accuracy, a.local_accuracy, a.distill_loss),
                (b.test_accuracy, b.local_accuracy, b.distill_loss),
                "node {i} round {} differs from the run without the attacker",
                a.round
            );
        }
    }
    // Member 0 counted the refusals by reason; its log names the outsider.
    let last = read_metrics(&attacked.path().join("fd-0.jsonl"))
        .pop()
        .unwrap();
    assert!(
        refusals(&last, "not_coordinator") >= 3,
        "{:?}",
        last.rejections
    );
    assert!(
        refusals(&last, "unknown_sender") >= 1,
        "{:?}",
        last.rejections
    );
    let outsider_id =
        fd_net::peer_id_of(&fd_protocol::SigningKey::from_seed([77; 32]).public_key())
            .unwrap()
            .to_string();
    let log = std::fs::read_to_string(attacked.path().join("node-0.log")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("control message refused") && l.contains(&outsider_id)),
        "node 0's log does not name the outsider"
    );
}

/// Runs a coordinator and [`NODES`] members in `dir` to the end; `during`
/// gets the coordinator's address and member 0 while they run.
fn run_federation(dir: &std::path::Path, federation: &str, during: impl FnOnce(&str, &mut Proc)) {
    // The same keys in both runs: the aggregation order follows them.
    seeded_node_keys(dir, NODES);
    seeded_key(&dir.join("coordinator.key"), 200);
    let config = coordinator_toml(dir, NODES, 120, federation);
    let (mut coordinator, address) = Proc::coordinator("coordinator", &config, dir);
    let configs = node_configs(dir, NODES, 0.1, Some(&address), "fd", federation);
    let mut nodes = start_nodes(&configs, dir);
    during(&address, &mut nodes[0]);
    for node in &mut nodes {
        node.wait_success(Duration::from_secs(600));
    }
    coordinator.wait_success(Duration::from_secs(60));
}
