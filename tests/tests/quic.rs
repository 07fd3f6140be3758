//! A federation over QUIC only: the coordinator and three `fd-node`
//! processes listen on `/udp/0/quic-v1` and nowhere else, so every
//! connection of the run (joins, round announcements, shares, metrics) is a
//! QUIC connection. Each member must send and aggregate every other
//! member's share in every round.

use std::time::Duration;

use fd_tests::*;

const NODES: usize = 3;
const ROUNDS: u64 = 2;
const QUIC_LISTEN: &str = "listen = \"/ip4/127.0.0.1/udp/0/quic-v1\"";

#[test]
fn a_federation_listening_on_quic_only_completes_its_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let federation = federation_toml("quic-only", ROUNDS);

    let coordinator_config = coordinator_toml(dir, NODES, 300, &federation);
    add_top_level(&coordinator_config, QUIC_LISTEN);
    let (mut coordinator, address) = Proc::coordinator("coordinator", &coordinator_config, dir);
    assert!(
        address.contains("/udp/") && address.contains("/quic-v1/"),
        "the coordinator listens on QUIC: {address}"
    );

    let configs = node_configs(dir, NODES, 0.5, Some(&address), "quic", &federation);
    for config in &configs {
        add_top_level(config, QUIC_LISTEN);
        let text = std::fs::read_to_string(config)
            .unwrap()
            .replace("distill_epochs = 5", "distill_epochs = 1");
        std::fs::write(config, text).unwrap();
    }
    let mut nodes = start_nodes(&configs, dir);
    for node in &mut nodes {
        node.wait_success(Duration::from_secs(600));
    }
    coordinator.wait_success(Duration::from_secs(60));

    for (i, node) in nodes.iter().enumerate() {
        let listening: Vec<String> = log_lines(node, "listening")
            .iter()
            .filter_map(|line| log_field(line, "listen"))
            .collect();
        assert_eq!(listening.len(), 1, "node {i}: one listen address {listening:?}");
        assert!(listening[0].contains("/quic-v1"), "node {i} listens on {listening:?}");
        let metrics = read_metrics(&dir.join(format!("quic-{i}.jsonl")));
        assert_eq!(metrics.len() as u64, ROUNDS, "node {i} completed every round");
        for m in &metrics {
            assert_eq!(m.shares_sent as usize, NODES - 1, "node {i} round {}", m.round);
            assert_eq!(
                m.shares_aggregated as usize,
                NODES - 1,
                "node {i} round {}: every peer's share arrived over QUIC",
                m.round
            );
        }
    }
    let csv = std::fs::read_to_string(dir.join("coordinator-metrics.csv")).unwrap();
    assert_eq!(
        csv.lines().count() as u64,
        1 + ROUNDS * NODES as u64,
        "the coordinator received every member's metrics over QUIC:\n{csv}"
    );
}
