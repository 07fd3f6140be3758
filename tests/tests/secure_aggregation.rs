//! Secure aggregation between `fd-node` processes: a coordinator and four
//! members on 127.0.0.1 with `[secure_aggregation] enabled = true`, 3
//! rounds; member 3 is killed with SIGKILL as round 2 is announced.
//!
//! What must hold: no member sends a plain share in any round (only
//! masked knowledge leaves a member); in round 1 every member distils the
//! sum of all four members' knowledge; in rounds 2 and 3 the three
//! survivors still unmask a sum — of the three of them, whether the victim
//! died before advertising its keys or after sharing them (then its pair
//! masks are recovered from the Shamir shares) — and distil it; no
//! survivor refuses any secure-aggregation message or fails a round.

use std::time::Duration;

use fd_tests::*;

const NODES: usize = 4;
const ROUNDS: u64 = 3;
const VICTIM: usize = 3;

#[test]
fn four_members_aggregate_securely_and_three_go_on_after_one_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let members: Vec<String> = (0..NODES)
        .map(|i| seeded_key(&dir.join(format!("node-{i}.key")), i as u8 + 1))
        .collect();
    let federation = federation_toml_with(
        "secagg",
        ROUNDS,
        &format!("{}quorum = 0.5\n", members_line(&members)),
    );
    // Rounds with a dead member last until the deadline (nobody knows it
    // is dead before then) plus the coordinator's grace for its report.
    let coordinator_config = coordinator_toml(dir, NODES, 15, &federation);
    let (mut coordinator, address) = Proc::coordinator("coordinator", &coordinator_config, dir);
    let configs = node_configs(dir, NODES, 0.5, Some(&address), "node", &federation);
    for config in &configs {
        let text = std::fs::read_to_string(config).unwrap();
        std::fs::write(
            config,
            format!("{text}\n[secure_aggregation]\nenabled = true\nphase_timeout_secs = 3\n"),
        )
        .unwrap();
    }
    let mut nodes = start_nodes(&configs, dir);

    wait_for_log(
        &mut coordinator,
        &["announcing round", "round=2"],
        Duration::from_secs(300),
    );
    nodes[VICTIM].kill9();

    for (i, node) in nodes.iter_mut().enumerate().filter(|(i, _)| *i != VICTIM) {
        node.wait_success(Duration::from_secs(400));
        let metrics = read_metrics(&dir.join(format!("node-{i}.jsonl")));
        assert_eq!(metrics.len(), ROUNDS as usize, "node {i}");
        for m in &metrics {
            // What docs/results.md §8 and docs/performance.md quote
            // (`cargo test --workspace --test secure_aggregation -- --nocapture`).
            println!(
                "node {i} round {}: sent {} B, received {} B, network {:.2} s",
                m.round, m.bytes_sent, m.bytes_received, m.network_seconds
            );
            let peers = if m.round == 1 { NODES - 1 } else { NODES - 2 };
            assert_eq!(
                m.shares_sent, 0,
                "node {i}, round {}: a plain share left the member",
                m.round
            );
            assert_eq!(
                m.shares_aggregated as usize, peers,
                "node {i}, round {}: peers in the unmasked sum\n{}",
                m.round,
                node.log_tail()
            );
            assert!(m.distilled, "node {i}, round {}: did not distil", m.round);
            assert!(
                m.bytes_sent > 0 && m.bytes_received > 0,
                "node {i}, round {}: no secure-aggregation traffic counted",
                m.round
            );
            assert!(
                m.rejections.is_empty(),
                "node {i}, round {}: refusals {:?}",
                m.round,
                m.rejections
            );
        }
        for needle in ["secure aggregation failed", "share rejected", "message refused"] {
            let lines = log_lines(node, needle);
            assert!(lines.is_empty(), "node {i}: {lines:?}");
        }
        assert_eq!(
            log_lines(node, "only masked knowledge leaves this member").len(),
            1,
            "node {i}"
        );
    }
}
