//! `fd-sim run` with `[dp]`: every member trains with DP-SGD, `metrics.csv`
//! reports the ε each member has spent after every round (growing, and
//! capped by `max_epsilon`), and a selector that reads private data is
//! refused with the field named.

use std::process::Command;

use fd_tests::binary;

const EXPERIMENT: &str = r#"name = "dp"
seed = 3
nodes = 3
rounds = 3
jobs = 1

[data]
kind = "synthetic"
seed = 5
train = 4000
test = 500

[public]
size = 1000
subset_size = 300

[partition]
kind = "iid"

[model]
kind = "mlp"
hidden = [32]

[knowledge]
selector = "all"

[dp]
enabled = true
noise_multiplier = 1.0
max_epsilon = 2.5
"#;

fn fd_sim(experiment: &str, dir: &std::path::Path) -> std::process::Output {
    let path = dir.join("e.toml");
    std::fs::write(&path, experiment).unwrap();
    Command::new(binary("fd-sim"))
        .args(["run", path.to_str().unwrap(), "--quiet", "--out"])
        .arg(dir.join("out"))
        .output()
        .unwrap()
}

#[test]
fn dp_members_report_growing_capped_epsilon() {
    let dir = tempfile::tempdir().unwrap();
    let output = fd_sim(EXPERIMENT, dir.path());
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let csv = std::fs::read_to_string(dir.path().join("out/dp/metrics.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (round, node, eps) = (col("round"), col("node"), col("dp_epsilon"));
    let mut by_node = vec![Vec::new(); 3];
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        let e: f64 = f[eps].parse().expect("every DP member reports ε");
        by_node[f[node].parse::<usize>().unwrap()].push((f[round].parse::<u64>().unwrap(), e));
    }
    for (i, rows) in by_node.iter().enumerate() {
        assert_eq!(rows.len(), 3, "member {i}");
        assert!(rows[0].1 > 0.0, "member {i} spent nothing in round 1");
        assert!(
            rows.windows(2).all(|w| w[1].1 >= w[0].1),
            "member {i}: ε must not shrink: {rows:?}"
        );
        assert!(rows[2].1 <= 2.5, "member {i} passed max_epsilon: {rows:?}");
    }
    // 1,000 samples per member, q = 0.032, σ = 1, 51 steps per round: ε ≈ 2.2
    // after round 1 and 2.7 after round 2 without a cap, so the cap of 2.5
    // stops private training in round 2 and round 3 adds nothing.
    assert!(
        by_node.iter().any(|rows| rows[2].1 == rows[1].1),
        "no member reached its budget: {by_node:?}"
    );
    let summary = std::fs::read_to_string(dir.path().join("out/dp/summary.json")).unwrap();
    assert!(summary.contains("\"final_dp_epsilon\""));

    let refused = fd_sim(
        &EXPERIMENT.replace("selector = \"all\"", "selector = \"density\""),
        dir.path(),
    );
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("knowledge.selector"), "{err}");
}
