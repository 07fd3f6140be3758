//! Helpers for the cross-crate integration tests: locate the built `fd-*`
//! binaries, write configs, start real processes on 127.0.0.1 and clean
//! them up even when a test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fd_protocol::{FederationManifest, RoundMetrics};

pub mod attacker;
pub mod netns;

/// Path of a workspace binary, next to the test executable's `deps` folder.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile> folder");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace`), as the README's test command does",
        path.display()
    );
    path
}

/// A child process killed when dropped, with its stderr in a log file.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// SIGKILL: no chance to clean up, as after a crash or `kill -9`.
    pub fn kill9(&mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }

    /// `fd-node run --config <config>` as `name`.
    pub fn node(name: &str, config: &Path, dir: &Path) -> Proc {
        Proc::start(
            name,
            "fd-node",
            &["run", "--config", config.to_str().expect("UTF-8 path")],
            dir,
        )
    }

    /// `fd-coordinator --config <config>` as `name`, once it has written its
    /// address file; returns the process and the address members dial.
    pub fn coordinator(name: &str, config: &Path, dir: &Path) -> (Proc, String) {
        Proc::coordinator_in(None, name, config, dir)
    }

    /// [`Proc::coordinator`], inside the network namespace `netns` if given.
    pub fn coordinator_in(
        netns: Option<&str>,
        name: &str,
        config: &Path,
        dir: &Path,
    ) -> (Proc, String) {
        let _ = std::fs::remove_file(dir.join("coordinator.addr"));
        let args = ["--config", config.to_str().expect("UTF-8 path")];
        let mut proc = match netns {
            Some(netns) => Proc::start_in(netns, name, "fd-coordinator", &args, dir),
            None => Proc::start(name, "fd-coordinator", &args, dir),
        };
        let address = wait_for_line(
            &dir.join("coordinator.addr"),
            Duration::from_secs(120),
            &mut proc,
        );
        (proc, address)
    }

    pub fn start(name: &str, bin: &str, args: &[&str], dir: &Path) -> Proc {
        Proc::spawn(name, Command::new(binary(bin)), bin, args, dir)
    }

    /// [`Proc::start`] inside the network namespace `netns`
    /// (`ip netns exec <netns> <bin> <args>`, which execs: the child is the binary).
    pub fn start_in(netns: &str, name: &str, bin: &str, args: &[&str], dir: &Path) -> Proc {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", netns]).arg(binary(bin));
        Proc::spawn(name, command, bin, args, dir)
    }

    fn spawn(name: &str, mut command: Command, bin: &str, args: &[&str], dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let stderr = std::fs::File::create(&log).expect("log file");
        let stdout = std::fs::File::create(dir.join(format!("{name}.out"))).expect("out file");
        let child = command
            .args(args)
            .env("RUST_LOG", std::env::var("FD_TEST_LOG").unwrap_or_else(|_| "info,libp2p=warn".into()))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        Proc {
            name: name.into(),
            child,
            log,
        }
    }

    /// Waits for the process to exit; panics with its log on failure or timeout.
    pub fn wait_success(&mut self, timeout: Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(
                    status.success(),
                    "{} exited with {status}; log:\n{}",
                    self.name,
                    self.log_tail()
                );
                return;
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                panic!(
                    "{} did not finish within {timeout:?}; log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `ready` every `every` until it gives a value; panics with `proc`'s
/// log if `proc` exits first or `timeout` passes (`what` names the wait).
fn wait_until<T>(
    proc: &mut Proc,
    timeout: Duration,
    every: Duration,
    what: impl Fn() -> String,
    mut ready: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = ready() {
            return value;
        }
        if let Some(status) = proc.child.try_wait().expect("wait") {
            panic!(
                "{} exited with {status} early; log:\n{}",
                proc.name,
                proc.log_tail()
            );
        }
        assert!(
            start.elapsed() < timeout,
            "{}; log:\n{}",
            what(),
            proc.log_tail()
        );
        std::thread::sleep(every);
    }
}

/// Waits until `proc`'s log has a line containing every one of `needles`;
/// returns that line.
pub fn wait_for_log(proc: &mut Proc, needles: &[&str], timeout: Duration) -> String {
    let log = proc.log.clone();
    wait_until(
        proc,
        timeout,
        Duration::from_millis(200),
        || format!("no log line with {needles:?}"),
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .map(strip_ansi)
                .find(|l| needles.iter().all(|n| l.contains(n)))
        },
    )
}

/// Waits until `path` holds a non-empty line (e.g. the coordinator's address file).
pub fn wait_for_line(path: &Path, timeout: Duration, proc: &mut Proc) -> String {
    wait_until(
        proc,
        timeout,
        Duration::from_millis(100),
        || format!("{} never appeared", path.display()),
        || {
            let text = std::fs::read_to_string(path).ok()?;
            let line = text.lines().next().filter(|l| !l.trim().is_empty())?;
            Some(line.trim().to_string())
        },
    )
}

/// Reads a node's JSON-lines metrics file.
pub fn read_metrics(path: &Path) -> Vec<RoundMetrics> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("bad metrics line in {}: {e}", path.display()))
        })
        .collect()
}

/// The `[federation]`, `[data]` tables shared by the test federations:
/// synthetic data, so the tests need nothing installed.
pub fn federation_toml(id: &str, rounds: u64) -> String {
    federation_toml_with(id, rounds, "")
}

/// [`federation_toml`] with more lines in the `[federation]` table
/// (e.g. [`members_line`], `quorum`, `schedule`).
pub fn federation_toml_with(id: &str, rounds: u64, extra: &str) -> String {
    format!(
        r#"[federation]
id = "{id}"
rounds = {rounds}
public_size = 3000
subset_size = 1000
seed = 11
{extra}

[data]
kind = "synthetic"
seed = 5
train = 12000
test = 2000
"#
    )
}

/// `members = [...]` for a `[federation]` table.
pub fn members_line(peer_ids: &[String]) -> String {
    let quoted: Vec<String> = peer_ids.iter().map(|p| format!("\"{p}\"")).collect();
    format!("members = [{}]\n", quoted.join(", "))
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for processes that
/// must come back on the same address after a restart).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port on 127.0.0.1")
        .port()
}

/// Writes a seeded key file and returns the PeerId it gives.
pub fn seeded_key(path: &Path, seed: u8) -> String {
    let key = fd_protocol::SigningKey::from_seed([seed; 32]);
    fd_net::keyfile::write(path, &key).expect("key file");
    fd_net::peer_id_of(&key.public_key())
        .expect("ed25519 key")
        .to_string()
}

/// Inserts `lines` at the top level of a config file written by the helpers
/// (before its first table), e.g. to set `listen` or `checkpoint_file`.
pub fn add_top_level(path: &Path, lines: &str) {
    let text = std::fs::read_to_string(path).expect("config");
    let at = text.find("\n[").map_or(text.len(), |i| i + 1);
    let (head, tail) = text.split_at(at);
    // A later key wins over an earlier one? Not in TOML: drop the replaced keys.
    let keys: Vec<&str> = lines
        .lines()
        .filter_map(|l| l.split('=').next())
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .collect();
    let head: String = head
        .lines()
        .filter(|l| !keys.contains(&l.split('=').next().unwrap_or("").trim()))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(path, format!("{head}{lines}\n{tail}")).expect("config");
}

/// Lines of a process log (stderr) that contain `needle`.
pub fn log_lines(proc: &Proc, needle: &str) -> Vec<String> {
    std::fs::read_to_string(&proc.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// The value of `field=` in a tracing log line (ANSI colours stripped).
pub fn log_field(line: &str, field: &str) -> Option<String> {
    let plain: String = strip_ansi(line);
    plain
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{field}=")))
        .map(|v| v.trim_matches('"').to_string())
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Waits until `path` (a metrics file) has at least `lines` lines.
pub fn wait_for_lines(path: &Path, lines: usize, timeout: Duration, proc: &mut Proc) {
    wait_until(
        proc,
        timeout,
        Duration::from_millis(50),
        || format!("{} did not reach {lines} lines", path.display()),
        || {
            let n = std::fs::read_to_string(path)
                .map(|t| t.lines().filter(|l| !l.trim().is_empty()).count())
                .unwrap_or(0);
            (n >= lines).then_some(())
        },
    )
}

/// A coordinator config in `dir`.
pub fn coordinator_toml(
    dir: &Path,
    min_members: usize,
    round_timeout_secs: u64,
    federation: &str,
) -> PathBuf {
    let path = dir.join("coordinator.toml");
    let text = format!(
        r#"listen = "/ip4/127.0.0.1/tcp/0"
key_file = "coordinator.key"
min_members = {min_members}
round_timeout_secs = {round_timeout_secs}
metrics_file = "coordinator-metrics.csv"
address_file = "coordinator.addr"

{federation}"#
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A node config in `dir`; `coordinator` None for the isolated baseline.
pub fn node_toml(
    dir: &Path,
    index: usize,
    nodes: usize,
    alpha: f64,
    coordinator: Option<&str>,
    metrics: &str,
    federation: &str,
) -> PathBuf {
    let path = dir.join(format!("{metrics}.toml"));
    let coordinator = coordinator
        .map(|c| format!("coordinator = \"{c}\"\n"))
        .unwrap_or_default();
    let text = format!(
        r#"name = "node-{index}"
listen = "/ip4/127.0.0.1/tcp/0"
key_file = "node-{index}.key"
{coordinator}metrics_file = "{metrics}.jsonl"

{federation}
[partition]
nodes = {nodes}
index = {index}
scheme = {{ kind = "dirichlet", alpha = {alpha} }}

[model]
kind = "mlp"
hidden = [200, 200]

[training]
local_epochs = 1
distill_epochs = 5
seed = {index}
# One thread each: the tests run several members on a 2-core machine.
threads = 1
"#
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// [`node_toml`] for members `0..nodes`, metrics files `<prefix>-<i>.jsonl`.
pub fn node_configs(
    dir: &Path,
    nodes: usize,
    alpha: f64,
    coordinator: Option<&str>,
    prefix: &str,
    federation: &str,
) -> Vec<PathBuf> {
    (0..nodes)
        .map(|i| {
            let metrics = format!("{prefix}-{i}");
            node_toml(dir, i, nodes, alpha, coordinator, &metrics, federation)
        })
        .collect()
}

/// `fd-node run` on each config, as processes named `node-<i>`.
pub fn start_nodes(configs: &[PathBuf], dir: &Path) -> Vec<Proc> {
    configs
        .iter()
        .enumerate()
        .map(|(i, config)| Proc::node(&format!("node-{i}"), config, dir))
        .collect()
}

/// The federation manifest a `[federation]` + `[data]` TOML text gives (as
/// [`federation_toml`] writes it): what an in-process member must agree on.
pub fn manifest_of(federation_and_data: &str) -> FederationManifest {
    #[derive(serde::Deserialize)]
    struct Tables {
        federation: fd_node::config::FederationConfig,
        data: fd_data::DataSource,
    }
    let tables: Tables = toml::from_str(federation_and_data).expect("federation and data tables");
    let data = tables.data.load().expect("the test data loads");
    tables.federation.manifest(&data).expect("a manifest")
}

/// A node's full address (`/ip4/…/tcp/…/p2p/<id>`), from its "listening" log line.
pub fn node_address(proc: &mut Proc) -> String {
    let log = proc.log.clone();
    wait_until(
        proc,
        Duration::from_secs(120),
        Duration::from_millis(50),
        || format!("{} never logged its listen address", log.display()),
        || {
            let text = std::fs::read_to_string(&log).ok()?;
            let line = text.lines().find(|l| l.contains("listening"))?;
            Some(format!(
                "{}/p2p/{}",
                log_field(line, "listen")?,
                log_field(line, "peer")?
            ))
        },
    )
}

/// Resident memory of process `pid` in KiB (`VmRSS`), None once it has exited.
pub fn resident_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Whether the process has exited (without reaping it).
pub fn has_exited(proc: &mut Proc) -> bool {
    proc.child.try_wait().expect("wait").is_some()
}

/// Seeded key files `node-<i>.key` for members `0..nodes` (seeds 1..=nodes,
/// so two runs of a test have the same members); returns their PeerIds.
pub fn seeded_node_keys(dir: &Path, nodes: usize) -> Vec<String> {
    (0..nodes)
        .map(|i| seeded_key(&dir.join(format!("node-{i}.key")), i as u8 + 1))
        .collect()
}

/// How many refusals with reason `code` a member's metrics count (0 if none).
pub fn refusals(metrics: &RoundMetrics, code: &str) -> u64 {
    metrics
        .rejections
        .iter()
        .find(|(c, _)| c == code)
        .map_or(0, |(_, n)| *n)
}
