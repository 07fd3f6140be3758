//! The simulator's promises, checked on the built-in synthetic set: replay,
//! resumable sweeps, one round engine over both networks, FD beating
//! isolated under strong label skew, robust aggregation under attack, and
//! the leakage audit.

use std::path::Path;

use fd_sim::experiment::{self, Experiment};
use fd_sim::output::metrics_csv;
use fd_sim::runner::{self, NodeRow, Progress, RunResult};
use fd_sim::sweep::{self, RunOptions};

/// A small, strongly non-IID federation on the synthetic set.
fn experiment_text(extra: &str) -> String {
    format!(
        r#"name = "t"
seed = 3
nodes = 4
rounds = 3
jobs = 2
{extra}
[data]
kind = "synthetic"
seed = 5
train = 12000
test = 2000

[public]
size = 3000
subset_size = 1000

[partition]
kind = "dirichlet"
alpha = 0.1

[model]
kind = "mlp"
hidden = [200, 200]

[training]
local_epochs = 1
distill_epochs = 5
"#
    )
}

/// What `density` must gain over `all` in the test below (measured with
/// the default recipe and mean of probabilities: 0.4500 vs 0.4182).
const MARGIN: f64 = 0.02;

fn parse(text: &str) -> Experiment {
    let table: toml::Table = toml::from_str(text).unwrap();
    experiment::parse(table, Path::new("t.toml")).unwrap()
}

fn run(e: &Experiment) -> RunResult {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let shared = runner::prepare_data(e).unwrap();
    rt.block_on(runner::run(e, &shared, &Progress::hidden()))
        .unwrap()
}

fn final_mean(r: &RunResult, honest_only: bool) -> f64 {
    let last = r.rows.iter().map(|x| x.round).max().unwrap();
    let acc: Vec<f64> = r
        .rows
        .iter()
        .filter(|x| x.round == last && !(honest_only && x.byzantine))
        .map(|x| x.test_accuracy)
        .collect();
    acc.iter().sum::<f64>() / acc.len() as f64
}

#[test]
fn same_config_and_seed_give_identical_metrics_csv() {
    let e = parse(&experiment_text(""));
    let a = metrics_csv(&run(&e).rows);
    let b = metrics_csv(&run(&e).rows);
    assert_eq!(a, b);
    assert_eq!(a.lines().count(), 1 + 4 * 3);
    // Another seed changes the numbers (the comparison above could not pass vacuously).
    let c = metrics_csv(&run(&parse(&experiment_text("").replace("seed = 3", "seed = 4"))).rows);
    assert_ne!(a, c);
}

#[test]
fn fd_beats_isolated_under_strong_label_skew() {
    let fd = run(&parse(&experiment_text("algorithm = \"fd\"")));
    let isolated = run(&parse(&experiment_text("algorithm = \"isolated\"")));
    let (f, i) = (final_mean(&fd, false), final_mean(&isolated, false));
    println!("fd {f:.4} isolated {i:.4}");
    assert!(f > i + 0.05, "fd {f:.4} vs isolated {i:.4}");
    // FD moved shares; isolated moved nothing.
    assert!(
        fd.rows
            .iter()
            .all(|r| r.bytes_sent > 0 && r.shares_aggregated == 3)
    );
    assert!(isolated.rows.iter().all(|r| r.bytes_sent == 0));
}

#[test]
fn selective_knowledge_beats_sharing_everything_under_strong_label_skew() {
    // More rounds than the other tests: selection pays once students have
    // distinct knowledge to select.
    let text = |selector: &str| {
        experiment_text(&format!(
            "aggregator = \"mean-probabilities\"\n[knowledge]\nselector = \"{selector}\"\n"
        ))
            .replace("rounds = 3", "rounds = 5")
            .replace("nodes = 4", "nodes = 6")
    };
    let all = run(&parse(&text("all")));
    let density = run(&parse(&text("density")));
    let (a, d) = (final_mean(&all, false), final_mean(&density, false));
    println!("all {a:.4} density {d:.4}");
    assert!(d > a + MARGIN, "density {d:.4} vs all {a:.4}");
    // The weights travel in the shares (one byte per row), and no filter
    // is configured, so every row of every teacher was distilled.
    assert!(density.rows.iter().zip(&all.rows).all(|(d, a)| d.bytes_sent > a.bytes_sent));
    assert!(density.rows.iter().all(|r| r.teacher_rows_kept == 1.0));
    // Same config and seed, same numbers, with the selector too.
    assert_eq!(
        metrics_csv(&density.rows),
        metrics_csv(&run(&parse(&text("density"))).rows)
    );
}

#[test]
fn a_curious_member_learns_label_distributions_from_plain_shares() {
    // Dirichlet α = 0.1: every member holds a few classes, so its share
    // leaks them; member 0 audits the three others.
    let e = parse(&experiment_text("[audit]\nenabled = true\n"));
    let r = run(&e);
    let audit = r.audit.as_ref().expect("audit summary");
    for round in 1..=3 {
        for row in r.rows.iter().filter(|x| x.round == round) {
            assert_eq!(row.audit_tv.is_some(), row.node != 0, "{row:?}");
        }
    }
    let (tv, uniform, federation) = audit.last().expect("member 0 heard the others");
    println!(
        "audit TV per round {:?}; last round {tv:.4}, uniform guess {uniform:.4}, federation-wide guess {federation:.4}",
        audit.mean_tv_per_round
    );
    println!(
        "per member: last round {:?}, uniform {:?}, federation-wide {:?}",
        audit.final_tv_per_member, audit.uniform_tv_per_member, audit.federation_tv_per_member
    );
    assert!(
        tv < uniform - 0.15,
        "TV {tv:.4} vs uniform guess {uniform:.4}"
    );
    assert!(
        tv < federation - 0.15,
        "TV {tv:.4} vs federation-wide guess {federation:.4}"
    );
    assert_eq!(audit.final_tv_per_member.len(), 4);
    assert!(audit.final_tv_per_member[0].is_none());
    // The column is there, filled for members 1..3 only; two runs replay exactly.
    let csv = metrics_csv(&r.rows);
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let column = header.iter().position(|h| *h == "audit_tv").unwrap();
    for line in csv.lines().skip(1) {
        let fields: Vec<&str> = line.split(',').collect();
        assert_eq!(fields[column].is_empty(), fields[1] == "0", "{line}");
    }
    assert_eq!(csv, metrics_csv(&run(&e).rows));
}

#[test]
fn secure_aggregation_keeps_the_teacher_and_hides_each_member() {
    // The same federation with plain shares and with secure aggregation,
    // both with the mean of probabilities (an aggregator that runs on sums)
    // and the curious member 0 auditing.
    let text = |secure: bool| {
        experiment_text(&format!(
            "aggregator = \"mean-probabilities\"\n[audit]\nenabled = true\n[secure_aggregation]\nenabled = {secure}\n"
        ))
    };
    let plain = run(&parse(&text(false)));
    let secure = run(&parse(&text(true)));
    let (p, s) = (final_mean(&plain, false), final_mean(&secure, false));
    println!("accuracy: plain {p:.4}, secure {s:.4}");
    // The teacher differs only by the fixed-point encoding (< 1e-4 per
    // probability), so the students end within a hair of each other.
    assert!((p - s).abs() < 0.01, "plain {p:.4} vs secure {s:.4}");
    // Every member distilled the sum of all four, and its protocol
    // messages were counted.
    for row in &secure.rows {
        assert_eq!(row.shares_aggregated, 3, "{row:?}");
        assert!(row.bytes_sent > 0 && row.bytes_received > 0, "{row:?}");
    }
    // The audit: plain shares tell member 0 each member's classes; under
    // secure aggregation it only has the sum, so its guess is the same for
    // everyone and no better than the federation-wide distribution.
    let (tv_plain, _, _) = plain.audit.as_ref().unwrap().last().unwrap();
    let audit = secure.audit.as_ref().unwrap();
    let (tv_secure, uniform, federation) = audit.last().unwrap();
    println!(
        "audit TV: plain {tv_plain:.4}, secure {tv_secure:.4}, federation-wide guess {federation:.4}, uniform {uniform:.4}"
    );
    assert!(tv_secure > tv_plain + 0.15, "secure {tv_secure:.4} vs plain {tv_plain:.4}");
    assert!(tv_secure > federation - 0.05, "secure {tv_secure:.4} vs federation-wide {federation:.4}");
    // Same config and seed, same numbers.
    assert_eq!(metrics_csv(&secure.rows), metrics_csv(&run(&parse(&text(true))).rows));
    // Members that stop after sharing their keys: the others recover their
    // pair masks and still distil the sum of the survivors; the dropped keep
    // their local students that round.
    let dropping = run(&parse(&text(true).replace(
        "[secure_aggregation]\nenabled = true\n",
        "[secure_aggregation]\nenabled = true\ndropout_after_key_shares = 0.3\n",
    )));
    let dropped = dropping.rows.iter().filter(|r| r.shares_aggregated == 0).count();
    let recovered = dropping
        .rows
        .iter()
        .filter(|r| (1..3).contains(&r.shares_aggregated))
        .count();
    println!("mid-protocol dropouts: {dropped} member-rounds dropped, {recovered} distilled a partial sum");
    assert!(dropped > 0 && recovered > 0, "{dropped} dropped, {recovered} recovered");
    for r in dropping.rows.iter().filter(|r| r.shares_aggregated == 0) {
        assert_eq!(r.test_accuracy, r.local_accuracy, "a dropped member keeps its local student");
    }
    // Median cannot run on sums: refused with the field named.
    let table: toml::Table = toml::from_str(
        &text(true).replace("aggregator = \"mean-probabilities\"", "aggregator = \"median\""),
    )
    .unwrap();
    let e = experiment::parse(table, Path::new("t.toml")).unwrap_err();
    assert!(format!("{e:#}").contains("secure_aggregation.enabled"), "{e:#}");
}

#[test]
fn secure_aggregation_over_libp2p_unmasks_the_hubs_sums() {
    // Over libp2p every member runs the protocol itself on its own swarm
    // (fd-node's `SecureRound`: advertisements, sealed key shares, masked
    // inputs, survivor views, reveals, each member unmasking); in memory
    // the hub plays the same steps. The sums are exact, so the teachers,
    // the accuracies and the curious member's audit (taken from the sums it
    // unmasked minus its own input) must be the same.
    let text = |network: &str| {
        experiment_text(&format!(
            "network = \"{network}\"\naggregator = \"mean-probabilities\"\n[audit]\nenabled = true\n[secure_aggregation]\nenabled = true\n"
        ))
    };
    let hub = run(&parse(&text("memory")));
    let libp2p = run(&parse(&text("libp2p")));
    assert_eq!(hub.rows.len(), libp2p.rows.len());
    for (h, l) in hub.rows.iter().zip(&libp2p.rows) {
        assert_eq!(l.shares_aggregated, 3, "{l:?}");
        assert!(l.bytes_sent > 0 && l.bytes_received > 0, "{l:?}");
        assert_eq!(
            (h.round, h.node, h.test_accuracy, h.local_accuracy, h.audit_tv),
            (l.round, l.node, l.test_accuracy, l.local_accuracy, l.audit_tv)
        );
    }
    let (hub_tv, _, federation) = hub.audit.as_ref().unwrap().last().unwrap();
    let (libp2p_tv, _, _) = libp2p.audit.as_ref().unwrap().last().unwrap();
    println!("audit TV: hub {hub_tv:.4}, libp2p {libp2p_tv:.4}, federation-wide guess {federation:.4}");
    assert_eq!(hub_tv, libp2p_tv);
    assert!(libp2p_tv > federation - 0.05, "libp2p {libp2p_tv:.4} vs federation-wide {federation:.4}");
    // The hub's mid-protocol dropouts do not exist over libp2p: refused.
    let table: toml::Table = toml::from_str(&text("libp2p").replace(
        "[secure_aggregation]\nenabled = true\n",
        "[secure_aggregation]\nenabled = true\ndropout_after_key_shares = 0.3\n",
    ))
    .unwrap();
    let e = experiment::parse(table, Path::new("t.toml")).unwrap_err();
    assert!(format!("{e:#}").contains("dropout_after_key_shares"), "{e:#}");
}

#[test]
fn the_libp2p_network_gives_the_same_numbers_as_the_memory_network() {
    let memory = run(&parse(&experiment_text("network = \"memory\"")));
    let libp2p = run(&parse(&experiment_text("network = \"libp2p\"")));
    for (m, l) in memory.rows.iter().zip(&libp2p.rows) {
        assert_eq!(
            (
                m.round,
                m.node,
                m.test_accuracy,
                m.local_accuracy,
                m.shares_aggregated
            ),
            (
                l.round,
                l.node,
                l.test_accuracy,
                l.local_accuracy,
                l.shares_aggregated
            )
        );
        // Bytes are counted the same way on both: frame plus length prefix.
        assert_eq!(
            (m.bytes_sent, m.bytes_received),
            (l.bytes_sent, l.bytes_received)
        );
    }
    assert_eq!(memory.rows.len(), libp2p.rows.len());
}

#[test]
fn median_resists_byzantine_members_better_than_mean() {
    // One of four members claims class 0 for every sample; mild skew (α = 1),
    // where both aggregators work without an attack. Honest members are compared.
    let text = |aggregator: &str, attack: bool| {
        let scenario = if attack {
            "[scenario]\nbyzantine = 0.25\nattack = { constant-class = { class = 0 } }\n"
        } else {
            ""
        };
        experiment_text(&format!("aggregator = \"{aggregator}\""))
            .replace("alpha = 0.1", "alpha = 1.0")
            .replace("[model]", &format!("{scenario}\n[model]"))
    };
    let accuracy = |aggregator: &str, attack: bool| {
        let r = run(&parse(&text(aggregator, attack)));
        assert_eq!(r.byzantine.len(), usize::from(attack));
        final_mean(&r, true)
    };
    let (mean, mean_attacked) = (accuracy("mean", false), accuracy("mean", true));
    let (median, median_attacked) = (accuracy("median", false), accuracy("median", true));
    println!(
        "mean {mean:.4} → {mean_attacked:.4} under attack; median {median:.4} → {median_attacked:.4}"
    );
    assert!(mean - mean_attacked > 0.1, "the attack must hurt the mean");
    assert!(
        median - median_attacked < mean - mean_attacked,
        "median loses {:.4}, mean loses {:.4}",
        median - median_attacked,
        mean - mean_attacked
    );
    assert!(median_attacked > mean_attacked + 0.1);
}

#[test]
fn scenario_and_topology_shape_the_rounds() {
    let e = parse(&experiment_text(
        "[topology]\nkind = \"ring\"\n[scenario]\nparticipation = 0.75\nlatency = 0.5\nbandwidth = 1e6\ndelay = { kind = \"constant\", seconds = 1.0 }\n",
    ));
    let r = run(&e);
    for round in 1..=3 {
        let rows: Vec<_> = r.rows.iter().filter(|x| x.round == round).collect();
        assert_eq!(rows.iter().filter(|x| x.active).count(), 3, "round {round}");
        // A ring member hears at most its two neighbours.
        assert!(rows.iter().all(|x| x.shares_aggregated <= 2));
        assert!(rows.iter().all(|x| x.active || x.bytes_sent == 0));
    }
    // Simulated time: 1 s delay + 0.5 s latency + serialised shares, every round.
    let clock = r.rows.last().unwrap().sim_seconds;
    assert!(clock > 3.0 * 1.5 && clock < 3.0 * 2.0, "{clock}");

    // A deadline before the first share can arrive: everything is late.
    let late = run(&parse(&experiment_text(
        "[scenario]\ndeadline = 1.0\ndelay = { kind = \"constant\", seconds = 2.0 }\n",
    )));
    assert!(
        late.rows
            .iter()
            .all(|x| x.shares_aggregated == 0 && x.shares_late == 3)
    );
}

#[test]
fn a_member_short_of_its_quorum_keeps_its_local_student() {
    // Dropouts leave members short of the three shares they expect. With
    // quorum 0 (the simulator's default) they distil what arrived; with
    // quorum 1 (the same draws, seeded) a member that is short aggregates
    // nothing and distils nothing: the round plan fd-node uses.
    let lenient = run(&parse(&experiment_text("[scenario]\ndropout = 0.4\n")));
    let strict = run(&parse(&experiment_text(
        "[scenario]\ndropout = 0.4\nquorum = 1.0\n",
    )));
    let short = |x: &&NodeRow| x.active && x.shares_aggregated > 0 && x.shares_aggregated < 3;
    let partial: Vec<_> = lenient.rows.iter().filter(short).collect();
    assert!(!partial.is_empty(), "no member was short of shares: raise the dropout");
    assert_eq!(strict.rows.iter().filter(short).count(), 0);
    for row in partial {
        let same = strict
            .rows
            .iter()
            .find(|x| x.round == row.round && x.node == row.node)
            .unwrap();
        assert!(same.active);
        assert_eq!(same.shares_aggregated, 0, "round {} node {}", row.round, row.node);
        assert_eq!(same.distill_loss, 0.0, "round {} node {}", row.round, row.node);
        assert_eq!(same.test_accuracy, same.local_accuracy);
    }
}

#[test]
fn baselines_share_the_partition_and_count_their_bytes() {
    let fedavg = run(&parse(&experiment_text("algorithm = \"fedavg\"")));
    let central = run(&parse(&experiment_text("algorithm = \"centralized\"")));
    // MLP 784-200-200-10: 199,210 parameters, one upload and one download per round.
    let frame = runner::fedavg_frame_bytes(784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10);
    assert!(
        fedavg
            .rows
            .iter()
            .all(|r| r.bytes_sent == frame && r.bytes_received == frame)
    );
    // After averaging, every member holds the same global model.
    let last: Vec<f64> = fedavg
        .rows
        .iter()
        .filter(|r| r.round == 3)
        .map(|r| r.test_accuracy)
        .collect();
    assert!(last.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(central.rows.len(), 3);
    assert_eq!(fedavg.private_sizes, central.private_sizes);
    assert_eq!(fedavg.private_sizes.iter().sum::<usize>(), 12000 - 3000);
    let c = final_mean(&central, false);
    assert!(
        c > final_mean(&fedavg, false) - 0.05 && c > 0.5,
        "centralized {c}"
    );
}

#[test]
fn a_sweep_resumes_after_an_interruption_and_skips_finished_cells() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sweep.toml");
    let text = experiment_text("") + "\n[sweep]\nalgorithm = [\"isolated\", \"fd\"]\n";
    std::fs::write(&path, &text).unwrap();
    let options = RunOptions {
        out: dir.path().join("results"),
        quiet: true,
        ..RunOptions::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let first = rt.block_on(sweep::run_file(&path, &options)).unwrap();
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|c| !c.skipped));
    let cell1 = first[0].dir.clone();
    let cell2 = first[1].dir.clone();
    assert!(cell1.ends_with("algorithm=isolated") && cell2.ends_with("algorithm=fd"));
    let metrics1 = std::fs::read(cell1.join("metrics.csv")).unwrap();
    let metrics2 = std::fs::read(cell2.join("metrics.csv")).unwrap();
    let mtime1 = std::fs::metadata(cell1.join("metrics.csv"))
        .unwrap()
        .modified()
        .unwrap();

    // An interruption during the second cell: it has files but no summary.json.
    std::fs::remove_file(cell2.join("summary.json")).unwrap();
    std::fs::write(cell2.join("metrics.csv"), "half a file").unwrap();
    let second = rt.block_on(sweep::run_file(&path, &options)).unwrap();
    assert!(second[0].skipped && !second[1].skipped);
    // The finished cell was not touched; the unfinished one was redone to the same numbers.
    assert_eq!(
        std::fs::metadata(cell1.join("metrics.csv"))
            .unwrap()
            .modified()
            .unwrap(),
        mtime1
    );
    assert_eq!(std::fs::read(cell1.join("metrics.csv")).unwrap(), metrics1);
    assert_eq!(std::fs::read(cell2.join("metrics.csv")).unwrap(), metrics2);
    let table = std::fs::read_to_string(dir.path().join("results/t/sweep.md")).unwrap();
    assert!(
        table.contains("algorithm=isolated") && table.contains("algorithm=fd"),
        "{table}"
    );
    for file in [
        "timings.csv",
        "summary.json",
        "accuracy_vs_round.svg",
        "accuracy_vs_round.png",
        "accuracy_vs_bytes.svg",
        "labels.png",
    ] {
        assert!(cell2.join(file).exists(), "{file}");
    }
}

/// The SIMD level the matrix kernels dispatch to at run time (gemm picks
/// its kernels by CPU feature): float sums are bit-identical only between
/// machines at the same level.
fn simd_level() -> String {
    let mut level = std::env::consts::ARCH.to_string();
    #[cfg(target_arch = "x86_64")]
    for (name, on) in [
        ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
        ("avx2", std::arch::is_x86_feature_detected!("avx2")),
        ("fma", std::arch::is_x86_feature_detected!("fma")),
    ] {
        if on {
            level.push(' ');
            level.push_str(name);
        }
    }
    level
}

/// The committed metrics.csv of a fixed small experiment (density-selected
/// knowledge, the leakage audit, a validation split with rollback). A
/// refactor must leave it byte-identical; a change that is meant to move the
/// numbers re-blesses it on purpose (`FD_BLESS_GOLDEN=1 cargo test …`) and
/// says why in its commit.
///
/// Byte identity holds on a CPU with the SIMD level the file was blessed on
/// (`golden/simd-level`). Elsewhere the matrix kernels round differently, so
/// every integer and text field (bytes, share counts, rollbacks, models) must
/// still match exactly and every float within 0.03: a refactor that changes
/// the protocol or the recipe still fails, last-bit rounding does not.
#[test]
fn a_fixed_experiment_reproduces_the_committed_metrics_csv() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let (golden, level_file) = (dir.join("metrics.csv"), dir.join("simd-level"));
    let e = parse(&experiment_text(
        "[knowledge]\nselector = \"density\"\n[audit]\nenabled = true\n[rollback]\nvalidation_fraction = 0.1\nrollback_tolerance = 0.05\n",
    ));
    let csv = metrics_csv(&run(&e).rows);
    if std::env::var_os("FD_BLESS_GOLDEN").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&golden, &csv).unwrap();
        std::fs::write(&level_file, simd_level() + "\n").unwrap();
    }
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .unwrap_or_else(|e| panic!("{} ({e}): bless it with FD_BLESS_GOLDEN=1", p.display()))
    };
    let (expected, blessed_level) = (read(&golden), read(&level_file));
    assert_eq!(csv.lines().count(), 1 + 4 * 3);
    assert_eq!(csv.lines().count(), expected.lines().count());
    let exact = blessed_level.trim() == simd_level();
    for (line, (got, want)) in csv.lines().zip(expected.lines()).enumerate() {
        if exact {
            assert_eq!(got, want, "metrics.csv line {} differs from {}", line + 1, golden.display());
            continue;
        }
        let (got, want): (Vec<&str>, Vec<&str>) = (got.split(',').collect(), want.split(',').collect());
        assert_eq!(got.len(), want.len(), "metrics.csv line {}: field count", line + 1);
        for (field, (g, w)) in got.iter().zip(&want).enumerate() {
            let is_float = w.contains('.') && w.parse::<f64>().is_ok();
            if is_float {
                let (g, w) = (g.parse::<f64>().unwrap(), w.parse::<f64>().unwrap());
                assert!(
                    (g - w).abs() <= 0.03,
                    "metrics.csv line {} field {}: {g} vs golden {w}",
                    line + 1,
                    field + 1
                );
            } else {
                assert_eq!(g, w, "metrics.csv line {} field {}", line + 1, field + 1);
            }
        }
    }
    if exact {
        assert_eq!(csv, expected);
    }
}
