//! The coordinator is killed with SIGKILL mid-run and comes back: members
//! pause (they wait for the next announcement and keep the metrics the
//! coordinator may have lost), the restarted coordinator reads its state
//! file, re-announces the round it was in, and the federation finishes.
//! The coordinator's CSV holds every (round, member) row exactly once.
//!
//! Design choice under test: with a coordinator, members pause while it is
//! away and resume when it returns (a federation that must run without one
//! uses `federation.schedule` instead; see tests/tests/no_coordinator.rs).

use std::time::Duration;

use fd_tests::*;

const NODES: usize = 3;
const ROUNDS: u64 = 4;

#[test]
fn members_pause_while_the_coordinator_is_down_and_finish_after_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let federation = federation_toml("coordinator-restart", ROUNDS);
    let coordinator_config = coordinator_toml(dir, NODES, 60, &federation);
    // Same address after the restart: fixed port, same key file.
    add_top_level(
        &coordinator_config,
        &format!(
            "listen = \"/ip4/127.0.0.1/tcp/{}\"\nstate_file = \"coordinator-state.json\"",
            free_port()
        ),
    );
    let (mut coordinator, address) = Proc::coordinator("coordinator", &coordinator_config, dir);
    let configs = node_configs(dir, NODES, 0.5, Some(&address), "node", &federation);
    let mut nodes = start_nodes(&configs, dir);

    // Kill the coordinator once round 1 is done everywhere.
    for (i, node) in nodes.iter_mut().enumerate() {
        wait_for_lines(
            &dir.join(format!("node-{i}.jsonl")),
            1,
            Duration::from_secs(300),
            node,
        );
    }
    coordinator.kill9();
    let before: Vec<usize> = (0..NODES)
        .map(|i| read_metrics(&dir.join(format!("node-{i}.jsonl"))).len())
        .collect();
    // Down for a while: no member gets past the round after the one it was in.
    std::thread::sleep(Duration::from_secs(5));
    for i in 0..NODES {
        let now = read_metrics(&dir.join(format!("node-{i}.jsonl"))).len();
        assert!(
            now <= before[i] + 1,
            "node {i} ran on without a coordinator"
        );
        assert!(
            nodes[i].child.try_wait().unwrap().is_none(),
            "node {i} gave up"
        );
    }

    let (mut coordinator, restarted_address) =
        Proc::coordinator("coordinator-restarted", &coordinator_config, dir);
    assert_eq!(
        restarted_address, address,
        "same key and port, same address"
    );
    for node in &mut nodes {
        node.wait_success(Duration::from_secs(600));
    }
    coordinator.wait_success(Duration::from_secs(120));
    assert!(
        !log_lines(&coordinator, "resum").is_empty(),
        "the restarted coordinator did not say it resumed; log:\n{}",
        coordinator.log_tail()
    );

    for i in 0..NODES {
        let rounds: Vec<u64> = read_metrics(&dir.join(format!("node-{i}.jsonl")))
            .iter()
            .map(|m| m.round)
            .collect();
        assert_eq!(rounds, (1..=ROUNDS).collect::<Vec<_>>(), "node {i}");
    }
    let csv = std::fs::read_to_string(dir.join("coordinator-metrics.csv")).unwrap();
    let mut rows: Vec<(u64, String)> = csv
        .lines()
        .skip(1)
        .map(|l| {
            let mut f = l.split(',');
            (
                f.next().unwrap().parse().unwrap(),
                f.next().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        csv.lines().filter(|l| l.starts_with("round,")).count(),
        1,
        "{csv}"
    );
    rows.sort();
    let before_dedup = rows.len();
    rows.dedup();
    assert_eq!(before_dedup, rows.len(), "duplicated rows:\n{csv}");
    assert_eq!(rows.len(), NODES * ROUNDS as usize, "{csv}");
}
