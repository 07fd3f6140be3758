//! `fd-node doctor` against a real coordinator process: while it runs, the
//! doctor reports it reachable over the transport of its address; once it
//! is stopped, unreachable, with the reason and the port to open, and the
//! doctor exits non-zero.

use std::process::{Command, Output};

use fd_tests::*;

fn doctor(config: &std::path::Path, dir: &std::path::Path) -> Output {
    Command::new(binary("fd-node"))
        .args(["doctor", "--timeout-secs", "5", "--config"])
        .arg(config)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .output()
        .expect("fd-node doctor runs")
}

#[test]
fn doctor_reports_a_running_coordinator_reachable_and_a_stopped_one_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let federation = federation_toml("doctor", 1);
    let coordinator_config = coordinator_toml(dir, 3, 300, &federation);
    let (mut coordinator, address) = Proc::coordinator("coordinator", &coordinator_config, dir);
    seeded_key(&dir.join("node-0.key"), 1);
    let config = node_toml(dir, 0, 3, 0.5, Some(&address), "node-0", &federation);

    let up = doctor(&config, dir);
    let stdout = String::from_utf8_lossy(&up.stdout);
    assert!(
        up.status.success(),
        "doctor failed against a running coordinator:\n{stdout}\n{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("coordinator"))
        .unwrap_or_else(|| panic!("no coordinator line:\n{stdout}"));
    assert!(
        line.contains("reachable") && line.contains("tcp") && line.contains("connect"),
        "{line}"
    );
    assert!(line.contains(&address), "the line names the address dialled: {line}");

    coordinator.kill9();
    let port = address.split("/tcp/").nth(1).unwrap().split('/').next().unwrap();
    let down = doctor(&config, dir);
    let stdout = String::from_utf8_lossy(&down.stdout);
    assert!(!down.status.success(), "doctor succeeded against a stopped coordinator:\n{stdout}");
    assert!(
        stdout.contains("UNREACHABLE") && stdout.contains("reason:"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("inbound TCP {port}")),
        "the fix names the port to open:\n{stdout}"
    );
    assert!(
        String::from_utf8_lossy(&down.stderr).contains("1 of 1 peers unreachable"),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
}
