//! `fd-node run --isolated` with `[dp]`: the member logs the ε it has spent
//! after every round, its metrics file carries `dp_epsilon` (growing), and
//! `fd-node status` shows it; with the default `density` selector the same
//! config is refused, naming the field.

use std::process::Command;
use std::time::Duration;

use fd_tests::{Proc, binary, federation_toml, log_field, log_lines, node_toml};

const DP: &str = "\n[knowledge]\nselector = \"all\"\n\n[dp]\nenabled = true\nnoise_multiplier = 1.0\ndelta = 1e-5\n";

#[test]
fn a_dp_member_logs_and_records_its_epsilon() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let config = node_toml(dir, 0, 3, 0.5, None, "dp", &federation_toml("dp", 2));
    let plain = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{plain}{DP}")).unwrap();

    let mut node = Proc::start(
        "dp-node",
        "fd-node",
        &["run", "--isolated", "--config", config.to_str().unwrap()],
        dir,
    );
    node.wait_success(Duration::from_secs(600));

    let logged: Vec<f64> = log_lines(&node, "differential privacy spent so far")
        .iter()
        .map(|l| log_field(l, "epsilon").unwrap().parse().unwrap())
        .collect();
    assert_eq!(logged.len(), 2, "one line per round: {}", node.log_tail());
    assert!(logged[0] > 0.0 && logged[1] > logged[0], "{logged:?}");

    let text = std::fs::read_to_string(dir.join("dp.jsonl")).unwrap();
    let recorded: Vec<f64> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["dp_epsilon"].as_f64().expect("dp_epsilon in every line")
        })
        .collect();
    assert_eq!(recorded.len(), 2);
    for (r, l) in recorded.iter().zip(&logged) {
        assert!((r - l).abs() < 1e-9, "metrics {r} vs log {l}");
    }

    let status = Command::new(binary("fd-node"))
        .args(["status", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains(&format!("ε {:.3}", recorded[1])),
        "{status}"
    );

    // The same member with the default selector (density reads private data).
    std::fs::write(&config, format!("{plain}\n[dp]\nenabled = true\n")).unwrap();
    let refused = Command::new(binary("fd-node"))
        .args(["run", "--isolated", "--config", config.to_str().unwrap()])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("knowledge.selector"), "{err}");
}
