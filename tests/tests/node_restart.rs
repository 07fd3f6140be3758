//! A node killed with SIGKILL mid-round comes back from its checkpoint: a
//! coordinator and five `fd-node` processes on 127.0.0.1; node 2 is killed
//! while it runs round k + 1 and restarted with the same config, but
//! listening on another port (as after a move to another host): the other
//! members reach it there within the round it rejoins (every share of every
//! round is delivered), not only from the next announcement on. Every
//! member completes every round; the restarted node resumes at round k + 1
//! with the weights it saved after round k (same SHA-256 of its weights in
//! the "checkpoint saved" line before the kill and in the "resumed from
//! checkpoint" line after the restart), and its metrics file holds each
//! round exactly once. While the victim is down, `fd-node export` takes its
//! best student from what the killed process left on disk: the one its log
//! last said it saved (round and validation accuracy).

use std::time::Duration;

use fd_tests::*;

const NODES: usize = 5;
const ROUNDS: u64 = 4;
const VICTIM: usize = 2;

#[test]
fn a_node_killed_mid_round_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let members: Vec<String> = (0..NODES)
        .map(|i| seeded_key(&dir.join(format!("node-{i}.key")), i as u8 + 1))
        .collect();
    let federation = federation_toml_with(
        "restart",
        ROUNDS,
        &format!("{}quorum = 0.5\n", members_line(&members)),
    );
    let coordinator_config = coordinator_toml(dir, NODES, 30, &federation);
    let (mut coordinator, address) = Proc::coordinator("coordinator", &coordinator_config, dir);
    let configs = node_configs(dir, NODES, 0.5, Some(&address), "node", &federation);
    for (i, config) in configs.iter().enumerate() {
        // A fixed port; the victim's is changed before its restart.
        add_top_level(
            config,
            &format!(
                "listen = \"/ip4/127.0.0.1/tcp/{}\"\ncheckpoint_file = \"node-{i}.checkpoint\"",
                free_port()
            ),
        );
    }
    let start = |i: usize, name: &str| Proc::node(name, &configs[i], dir);
    let mut nodes = start_nodes(&configs, dir);

    // Kill the victim shortly after it finished round 1, i.e. inside round 2.
    let metrics_path = dir.join(format!("node-{VICTIM}.jsonl"));
    wait_for_lines(
        &metrics_path,
        1,
        Duration::from_secs(300),
        &mut nodes[VICTIM],
    );
    std::thread::sleep(Duration::from_millis(300));
    nodes[VICTIM].kill9();
    let saved = log_lines(&nodes[VICTIM], "checkpoint saved");
    let last_saved = saved
        .last()
        .expect("a checkpoint was saved before the kill");
    let saved_round: u64 = log_field(last_saved, "round").unwrap().parse().unwrap();
    let saved_weights = log_field(last_saved, "weights").unwrap();
    let rounds_before = read_metrics(&metrics_path).len() as u64;
    assert_eq!(
        saved_round, rounds_before,
        "the checkpoint is written before the round's metrics line"
    );
    assert!(saved_round < ROUNDS, "killed too late to test a resume");

    // The best-student file survived the kill whole: export takes it.
    let best = log_lines(&nodes[VICTIM], "best student saved");
    let last_best = best.last().expect("a best student was saved before the kill");
    let export_dir = dir.join("victim-export");
    let mut export = Proc::start(
        "export-after-kill",
        "fd-node",
        &[
            "export",
            "--config",
            configs[VICTIM].to_str().unwrap(),
            "--out",
            export_dir.to_str().unwrap(),
        ],
        dir,
    );
    export.wait_success(Duration::from_secs(300));
    let card = fd_node::export::read_card(&export_dir).unwrap();
    assert_eq!(
        card.round.map(|r| r.to_string()),
        log_field(last_best, "round"),
        "{last_best}"
    );
    let logged: f64 = log_field(last_best, "validation_accuracy")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(card.validation_accuracy, Some(logged), "{last_best}");

    // The restarted process listens elsewhere; its peers were told the old
    // address in this round's announcement.
    let text: String = std::fs::read_to_string(&configs[VICTIM])
        .unwrap()
        .lines()
        .map(|l| {
            if l.starts_with("listen = ") {
                format!("listen = \"/ip4/127.0.0.1/tcp/{}\"\n", free_port())
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&configs[VICTIM], text).unwrap();
    let mut restarted = start(VICTIM, &format!("node-{VICTIM}-restarted"));
    restarted.wait_success(Duration::from_secs(600));
    for (i, node) in nodes.iter_mut().enumerate() {
        if i != VICTIM {
            node.wait_success(Duration::from_secs(600));
        }
    }
    coordinator.wait_success(Duration::from_secs(120));

    let resumed = log_lines(&restarted, "resumed from checkpoint");
    assert_eq!(resumed.len(), 1, "log:\n{}", restarted.log_tail());
    assert_eq!(
        log_field(&resumed[0], "round")
            .unwrap()
            .parse::<u64>()
            .unwrap(),
        saved_round
    );
    assert_eq!(
        log_field(&resumed[0], "weights").unwrap(),
        saved_weights,
        "the restored weights differ from the saved ones"
    );
    // Before the kill: rounds 1..=k; the restarted process ran exactly k+1..=R.
    let victim_rounds: Vec<u64> = read_metrics(&metrics_path)
        .iter()
        .map(|m| m.round)
        .collect();
    assert_eq!(victim_rounds, (1..=ROUNDS).collect::<Vec<_>>());
    for i in (0..NODES).filter(|&i| i != VICTIM) {
        let metrics = read_metrics(&dir.join(format!("node-{i}.jsonl")));
        assert_eq!(
            metrics.iter().map(|m| m.round).collect::<Vec<_>>(),
            (1..=ROUNDS).collect::<Vec<_>>(),
            "node {i}"
        );
        // Every push was delivered, in the rejoin round too: to the old
        // process before the kill, or to the new one at its new address.
        for m in &metrics {
            assert_eq!(m.shares_sent as usize, NODES - 1, "node {i}, round {}", m.round);
        }
        // After the victim is back, rounds run with all five members again.
        assert_eq!(
            metrics.last().unwrap().shares_aggregated as usize,
            NODES - 1,
            "node {i}"
        );
    }
}
