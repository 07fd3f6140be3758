//! Floods must not stall a member. A coordinator and two `fd-node`
//! processes run an open federation of 3 rounds; a third member joins and
//! shares honestly, but for the whole federation also floods member 0 from
//! many concurrent requests: shares of the open round with a broken
//! signature (each one costs the victim a signature check until the
//! flooder's honest share is in) and forged round announcements, as fast
//! as they are answered. Member 0 must still complete every round with
//! both other shares within the deadline, answer the excess `busy`, count
//! the flood's refusals by reason, and keep its resident memory below
//! [`RSS_BOUND_MIB`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fd_protocol::{Control, Message, RoundMetrics};
use fd_tests::attacker::{Attacker, refusal_code};
use fd_tests::*;

const ROUNDS: u64 = 3;
const ROUND_TIMEOUT_SECS: u64 = 60;
/// Concurrent flooding requests: above the victim's per-peer in-flight limit.
const FLOODERS: usize = 12;
/// Member 0's resident memory must stay below this during the flood.
const RSS_BOUND_MIB: u64 = 256;

#[test]
fn a_flooding_member_does_not_stall_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let federation = federation_toml("flood", ROUNDS);
    let manifest = Arc::new(manifest_of(&federation));
    let config = coordinator_toml(dir, 3, ROUND_TIMEOUT_SECS, &federation);
    let (mut coordinator, address) = Proc::coordinator("coordinator", &config, dir);
    let configs = node_configs(dir, 2, 0.5, Some(&address), "honest", &federation);
    let mut honest = start_nodes(&configs, dir);
    let victim_address = node_address(&mut honest[0]);
    let victim_pid = honest[0].child.id();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (answers, peak_kib) = rt.block_on(async {
        // Resident memory of the victim, sampled every 50 ms until it exits.
        let sampler = tokio::spawn(async move {
            let mut peak = 0;
            while let Some(kib) = resident_kib(victim_pid) {
                peak = peak.max(kib);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peak
        });
        let mut flooder = Attacker::new(55, "flooder").await;
        // Requests to the flooder (announcements, peers' shares) are read here;
        // the flood tasks share the swarm.
        let mut requests =
            std::mem::replace(&mut flooder.requests, tokio::sync::mpsc::channel(1).1);
        let flooder = Arc::new(flooder);
        let coordinator_peer = flooder.learn(&address).await;
        let victim = flooder.learn(&victim_address).await;
        let open_round = Arc::new(std::sync::atomic::AtomicU64::new(1));
        let paused = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let mut floods = tokio::task::JoinSet::new();
        for task in 0..FLOODERS {
            let (flooder, manifest) = (flooder.clone(), manifest.clone());
            let (open_round, paused, stop) = (open_round.clone(), paused.clone(), stop.clone());
            floods.spawn(async move {
                let mut answers: BTreeMap<String, u64> = BTreeMap::new();
                while !stop.load(Ordering::Relaxed) {
                    if paused.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    let round = open_round.load(Ordering::Relaxed);
                    let message = if task % 2 == 0 {
                        let mut share = flooder.share(&manifest, round);
                        share.signature.0[0] ^= 1;
                        Message::Share(share)
                    } else {
                        flooder.forged_round(&manifest, round + 1, u64::MAX, vec![])
                    };
                    let code = match flooder.send(victim, message).await {
                        Ok(answer) => refusal_code(&answer).unwrap_or("accepted").to_string(),
                        Err(_) => "no answer".to_string(),
                    };
                    *answers.entry(code).or_default() += 1;
                }
                answers
            });
        }
        // The member's own part: join, then share and report every round.
        let welcome = flooder.join(coordinator_peer, &manifest).await;
        assert!(matches!(welcome, Message::Welcome { .. }), "{welcome:?}");
        while let Some(request) = requests.recv().await {
            let answer = match &request.message {
                Message::Share(_) => Message::ShareAccepted,
                _ => Message::Ack,
            };
            let control = match &request.message {
                Message::Control(signed) => Some(signed.control.clone()),
                _ => None,
            };
            flooder
                .client
                .respond(request.channel, answer)
                .await
                .unwrap();
            let announcement = match control {
                Some(Control::Round(a)) => a,
                Some(Control::Done { .. }) => break,
                None => continue,
            };
            let round = announcement.round;
            open_round.store(round, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(500)).await;
            // Its honest share gets through its own flood: pause, send, resume.
            paused.store(true, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(300)).await;
            for member in announcement
                .members
                .iter()
                .filter(|m| m.key != flooder.me.key)
            {
                let peer = flooder.learn_member(member).await;
                let share = Message::Share(flooder.share(&manifest, round));
                let answer = fd_net::request_with_retry(&flooder.client, peer, share, 10)
                    .await
                    .unwrap();
                assert_eq!(answer, Message::ShareAccepted, "round {round}");
            }
            paused.store(false, Ordering::Relaxed);
            let report = RoundMetrics::new(&manifest.federation_id, round, flooder.me.key, "f");
            fd_net::request_with_retry(
                &flooder.client,
                coordinator_peer,
                Message::Metrics(report),
                5,
            )
            .await
            .unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let mut answers: BTreeMap<String, u64> = BTreeMap::new();
        while let Some(counts) = floods.join_next().await {
            for (code, n) in counts.unwrap() {
                *answers.entry(code).or_default() += n;
            }
        }
        (answers, sampler.await.unwrap())
    });
    for node in &mut honest {
        node.wait_success(Duration::from_secs(600));
    }
    coordinator.wait_success(Duration::from_secs(60));
    println!(
        "flood answers: {answers:?}; victim peak RSS {} MiB",
        peak_kib / 1024
    );

    // The flood was real and was refused, never accepted.
    let total: u64 = answers.values().sum();
    assert!(
        total >= 1000,
        "only {total} flooding requests were answered: {answers:?}"
    );
    assert!(!answers.contains_key("accepted"), "{answers:?}");
    for code in ["busy", "not_coordinator"] {
        assert!(
            answers.get(code).copied().unwrap_or(0) > 0,
            "no `{code}` in {answers:?}"
        );
    }
    assert!(
        answers.get("bad_signature").copied().unwrap_or(0) > 0,
        "no share was checked: {answers:?}"
    );

    // Every honest member finished every round with both shares, in time.
    for i in 0..2 {
        let metrics = read_metrics(&dir.join(format!("honest-{i}.jsonl")));
        assert_eq!(metrics.len() as u64, ROUNDS, "node {i}");
        for m in &metrics {
            assert_eq!(m.shares_aggregated, 2, "node {i} round {}", m.round);
            assert!(
                m.network_seconds < ROUND_TIMEOUT_SECS as f64,
                "node {i} round {} waited {} s",
                m.round,
                m.network_seconds
            );
        }
    }
    // The victim counted the flood by reason.
    let last = read_metrics(&dir.join("honest-0.jsonl")).pop().unwrap();
    for code in ["busy", "not_coordinator", "bad_signature"] {
        assert!(
            refusals(&last, code) > 0,
            "no `{code}` in {:?}",
            last.rejections
        );
    }
    assert!(
        peak_kib < RSS_BOUND_MIB * 1024,
        "member 0 peaked at {} MiB of resident memory",
        peak_kib / 1024
    );
}
