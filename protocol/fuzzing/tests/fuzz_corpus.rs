//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) through the
//! same checks as the cargo-fuzz targets, on stable Rust, so every input the
//! fuzzer found interesting (and every fixed crash, kept there as a
//! regression input) keeps being exercised by `cargo test`.
//!
//! The checks are `fd_protocol_fuzzing::{check_decode, check_share_mutation}`;
//! a panic or a broken invariant in any input fails the test and names the
//! file. A missing corpus folder is a failure, not a skip.
//!
//! `cargo test --workspace --test fuzz_corpus -- --ignored write_seed_corpus`
//! (re)writes the named seed inputs (`fuzzing::seed_inputs`) into the corpus
//! folders, as a starting point for a fresh corpus.

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use fd_protocol_fuzzing::{check_decode, check_share_mutation, seed_inputs};

/// A target's check: panics on a broken invariant.
type Check = fn(&[u8]);

/// The fuzz targets and the check each one runs.
const TARGETS: [(&str, Check); 2] = [
    ("decode_message", check_decode),
    ("share_verify", check_share_mutation),
];

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

/// Runs `check` on `bytes`, turning a panic into its message.
fn run(check: Check, bytes: &[u8]) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| check(bytes))).map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "non-string panic".into())
    })
}

#[test]
fn every_corpus_input_passes_its_target_checks() {
    let root = corpus_root();
    assert!(
        root.is_dir(),
        "fuzz corpus folder {} is missing",
        root.display()
    );
    let mut failures = Vec::new();
    for (target, check) in TARGETS {
        let dir = root.join(target);
        let entries = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus folder {} is missing: {e}", dir.display()));
        let mut replayed = 0;
        for entry in entries {
            let path = entry.expect("a readable corpus folder").path();
            if !path.is_file() {
                continue;
            }
            let bytes =
                fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            if let Err(message) = run(check, &bytes) {
                failures.push(format!("{target}: {}: {message}", path.display()));
            }
            replayed += 1;
        }
        assert!(replayed > 0, "corpus folder {} is empty", dir.display());
        eprintln!("{target}: replayed {replayed} inputs");
    }
    // Every folder is a target's: a new target needs a row in TARGETS.
    for entry in fs::read_dir(&root).unwrap() {
        let name = entry.unwrap().file_name();
        let name = name.to_string_lossy();
        assert!(
            TARGETS.iter().any(|(target, _)| *target == name),
            "fuzz/corpus/{name} belongs to no known target"
        );
    }
    assert!(
        failures.is_empty(),
        "{} corpus inputs fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn seed_inputs_pass_their_target_checks() {
    let mut failures = Vec::new();
    for (target, name, bytes) in seed_inputs() {
        let (_, check) = TARGETS
            .iter()
            .find(|(t, _)| *t == target)
            .unwrap_or_else(|| panic!("seed {name} is for unknown target {target}"));
        if let Err(message) = run(*check, &bytes) {
            failures.push(format!("{target}: {name}: {message}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Writes the named seeds into `fuzz/corpus/<target>/`; not part of a normal
/// test run.
#[test]
#[ignore = "writes files; run explicitly to (re)create the seed corpus"]
fn write_seed_corpus() {
    for (target, name, bytes) in seed_inputs() {
        let dir = corpus_root().join(target);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(name), bytes).unwrap();
    }
}
