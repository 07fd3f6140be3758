//! From a member's saved state to a deployable student, through the
//! `fd-node` binary as an operator runs it: `run --isolated` (two rounds on
//! synthetic data, writing a checkpoint and a best-student file), then
//! `export` → `evaluate` → `compress` → `compare`, each a separate process.
//! Checks what each command promises in its files: the export's card names
//! the best student's round and validation accuracy, `evaluate` measures
//! the test accuracy `export` recorded (f32 is exact), `compress` writes a
//! smaller student and its report, `compare` pairs the two on the same
//! samples; and a command given a folder that holds no model fails, naming
//! the path.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fd_tests::*;

fn fd_node(name: &str, args: &[&str], dir: &Path) {
    let mut proc = Proc::start(name, "fd-node", args, dir);
    proc.wait_success(Duration::from_secs(600));
}

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn a_members_student_is_exported_evaluated_compressed_and_compared() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let path = |p: &str| dir.join(p).to_str().unwrap().to_string();
    let federation = federation_toml("deploy", 2);
    let config = node_toml(dir, 0, 3, 0.5, None, "node-0", &federation);
    let config = config.to_str().unwrap();
    let mut member = Proc::start("member", "fd-node", &["run", "--isolated", "--config", config], dir);
    member.wait_success(Duration::from_secs(600));
    let best = log_lines(&member, "best student saved");
    let last_best = best.last().expect("a best student was saved");

    // export: the best student, with where it came from.
    fd_node("export", &["export", "--config", config, "--out", &path("student")], dir);
    let card = json(&dir.join("student/model.json"));
    assert_eq!(
        card["round"].as_u64().map(|r| r.to_string()),
        log_field(last_best, "round"),
        "{card}"
    );
    let logged: f64 = log_field(last_best, "validation_accuracy").unwrap().parse().unwrap();
    assert_eq!(card["validation_accuracy"].as_f64(), Some(logged), "{card}");
    let exported_accuracy = card["test_accuracy"].as_f64().expect("a test accuracy");
    assert!(exported_accuracy > 0.3, "{card}");

    // evaluate: the same test split (from the card's data source), same accuracy.
    fd_node(
        "evaluate",
        &["evaluate", "--model", &path("student"), "--runs", "20", "--warmup", "2"],
        dir,
    );
    let report = json(&dir.join("student/evaluation-flex.json"));
    assert_eq!(report["accuracy"]["overall"].as_f64(), Some(exported_accuracy), "{report}");
    assert_eq!(report["latency"]["runs"].as_u64(), Some(20), "{report}");
    assert_eq!(report["accuracy"]["samples"].as_u64(), Some(2000), "{report}");

    // compress: a smaller student from the member's best one.
    fd_node(
        "compress",
        &[
            "compress",
            "--config",
            config,
            "--student",
            "mlp-32",
            "--epochs",
            "1",
            "--out",
            &path("small"),
        ],
        dir,
    );
    let compressed = json(&dir.join("small/compress.json"));
    let small_card = json(&dir.join("small/model.json"));
    assert!(
        small_card["params"].as_u64().unwrap() < card["params"].as_u64().unwrap(),
        "{small_card}"
    );
    assert_eq!(
        compressed["teacher_test_accuracy"].as_f64(),
        Some(exported_accuracy),
        "compress took the best student, as export did: {compressed}"
    );

    // compare: both on the same samples, paired.
    fd_node(
        "compare",
        &[
            "compare",
            &path("student"),
            &path("small"),
            "--runs",
            "20",
            "--warmup",
            "2",
            "--resamples",
            "200",
            "--json",
            &path("ab.json"),
        ],
        dir,
    );
    let ab = json(&dir.join("ab.json"));
    assert_eq!(ab["samples"].as_u64(), Some(2000), "{ab}");
    assert_eq!(ab["a"]["accuracy"].as_f64(), Some(exported_accuracy), "{ab}");
    let (a, b) = (
        ab["a"]["accuracy"].as_f64().unwrap(),
        ab["b"]["accuracy"].as_f64().unwrap(),
    );
    let d = ab["difference"]["b_minus_a"].as_f64().unwrap();
    assert!((d - (b - a)).abs() < 1e-9, "{ab}");

    // A folder without a model: a clear error naming it, exit status 1.
    let output = Command::new(binary("fd-node"))
        .args(["evaluate", "--model", &path("nothing-here")])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("nothing-here"), "{stderr}");
}
