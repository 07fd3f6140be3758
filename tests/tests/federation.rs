//! A coordinator and three `fd-node` processes on 127.0.0.1 run a
//! federation on a strongly non-IID split; the same nodes also run the
//! isolated baseline with the same seeds. Checks: every node gains from
//! collaboration, and what went on the wire is logits, not weights.

use std::time::Duration;

use fd_tests::*;

const NODES: usize = 3;
const ROUNDS: u64 = 3;

#[test]
fn three_node_processes_beat_isolated_training_and_send_only_logits() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let federation = federation_toml("three-nodes", ROUNDS);

    let coordinator_config = coordinator_toml(dir, NODES, 300, &federation);
    let (mut coordinator, address) = Proc::coordinator("coordinator", &coordinator_config, dir);

    let configs = node_configs(dir, NODES, 0.1, Some(&address), "fd", &federation);
    let mut nodes = start_nodes(&configs, dir);
    for node in &mut nodes {
        node.wait_success(Duration::from_secs(900));
    }
    coordinator.wait_success(Duration::from_secs(60));

    // The baseline: the same nodes, same data, seeds and local steps, no peers.
    let mut isolated: Vec<Proc> = node_configs(dir, NODES, 0.1, None, "isolated", &federation)
        .into_iter()
        .enumerate()
        .map(|(i, config)| {
            Proc::start(
                &format!("isolated-{i}"),
                "fd-node",
                &["run", "--isolated", "--config", config.to_str().unwrap()],
                dir,
            )
        })
        .collect();
    for node in &mut isolated {
        node.wait_success(Duration::from_secs(600));
    }

    // 784-200-200-10 MLP: what FedAvg would send per round, per peer.
    let weight_bytes = ((784 * 200 + 200) + (200 * 200 + 200) + (200 * 10 + 10)) * 4;
    // 1,000 rows × 10 f32 logits, and one knowledge weight per row (the
    // default `density` selector).
    let logit_payload = 1000 * 10 * 4 + 1000;
    for i in 0..NODES {
        let fd = read_metrics(&dir.join(format!("fd-{i}.jsonl")));
        let alone = read_metrics(&dir.join(format!("isolated-{i}.jsonl")));
        assert_eq!(fd.len() as u64, ROUNDS, "node {i} completed every round");
        assert_eq!(alone.len() as u64, ROUNDS);
        let (fd_final, alone_final) = (
            fd.last().unwrap().test_accuracy,
            alone.last().unwrap().test_accuracy,
        );
        println!("node {i}: federated {fd_final:.4}, isolated {alone_final:.4}");
        assert!(
            fd_final > alone_final,
            "node {i}: federated accuracy {fd_final:.4} is not above isolated {alone_final:.4}"
        );
        for m in &fd {
            assert_eq!(
                m.shares_sent as usize,
                NODES - 1,
                "node {i} round {}: one share per peer",
                m.round
            );
            assert_eq!(
                m.shares_aggregated as usize,
                NODES - 1,
                "node {i} round {}: every peer's share aggregated",
                m.round
            );
            assert_eq!(
                m.bytes_sent,
                m.shares_sent as u64 * m.share_bytes,
                "node {i} round {}: bytes are share frames",
                m.round
            );
            assert!(
                m.share_bytes >= logit_payload as u64 && m.share_bytes < logit_payload as u64 + 512,
                "node {i} round {}: a share is the logits plus a small header, got {} bytes",
                m.round,
                m.share_bytes
            );
            assert!(
                m.share_bytes * 4 < weight_bytes as u64,
                "a share is far smaller than the weights"
            );
        }
    }

    let csv = std::fs::read_to_string(dir.join("coordinator-metrics.csv")).unwrap();
    assert_eq!(
        csv.lines().count() as u64,
        1 + ROUNDS * NODES as u64,
        "coordinator recorded every member's rounds:\n{csv}"
    );
}
