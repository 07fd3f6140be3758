//! `fd-sim run` killed with SIGKILL in the middle of a two-cell sweep: the
//! re-run skips the finished cell (its files untouched), redoes the
//! interrupted one, and ends with the same metrics as an uninterrupted sweep.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fd_tests::binary;

const SWEEP: &str = r#"name = "resume"
seed = 9
nodes = 3
rounds = 4
jobs = 1

[data]
kind = "synthetic"
seed = 5
train = 6000
test = 1000

[public]
size = 1500
subset_size = 600

[partition]
kind = "dirichlet"
alpha = 0.3

[model]
kind = "mlp"
hidden = [64]

[training]
local_epochs = 2
distill_epochs = 4

[sweep]
algorithm = ["isolated", "fd"]
"#;

fn run_to_end(experiment: &Path, out: &Path) -> String {
    let output = Command::new(binary("fd-sim"))
        .args([
            "run",
            experiment.to_str().unwrap(),
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success(), "fd-sim failed");
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn a_killed_sweep_resumes_without_redoing_or_corrupting_finished_cells() {
    let dir = tempfile::tempdir().unwrap();
    let experiment = dir.path().join("sweep.toml");
    std::fs::write(&experiment, SWEEP).unwrap();

    // Reference: the sweep run without interruption.
    let reference = dir.path().join("reference");
    run_to_end(&experiment, &reference);

    // Kill -9 as soon as the first cell is finished (the second is then running).
    let out = dir.path().join("interrupted");
    let first = out.join("resume/algorithm=isolated");
    let second = out.join("resume/algorithm=fd");
    let mut child = Command::new(binary("fd-sim"))
        .args([
            "run",
            experiment.to_str().unwrap(),
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !first.join("summary.json").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "the first cell never finished"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "fd-sim ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !second.join("summary.json").exists(),
        "the second cell finished before the kill; the test interrupted nothing"
    );
    let first_metrics = std::fs::read(first.join("metrics.csv")).unwrap();
    let first_modified = std::fs::metadata(first.join("summary.json"))
        .unwrap()
        .modified()
        .unwrap();

    let stdout = run_to_end(&experiment, &out);
    assert!(stdout.contains("finished earlier, skipped"), "{stdout}");
    assert_eq!(
        std::fs::metadata(first.join("summary.json"))
            .unwrap()
            .modified()
            .unwrap(),
        first_modified
    );
    assert_eq!(
        std::fs::read(first.join("metrics.csv")).unwrap(),
        first_metrics
    );
    for cell in ["algorithm=isolated", "algorithm=fd"] {
        assert_eq!(
            std::fs::read(out.join("resume").join(cell).join("metrics.csv")).unwrap(),
            std::fs::read(reference.join("resume").join(cell).join("metrics.csv")).unwrap(),
            "{cell}"
        );
    }
    // No temporary files were left behind by the kill.
    for cell in [&first, &second] {
        for entry in std::fs::read_dir(cell).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            assert!(!name.contains(".tmp"), "{name} left in {}", cell.display());
        }
    }
}
