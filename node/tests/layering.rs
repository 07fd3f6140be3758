//! The layering the code map in docs/ARCHITECTURE.md promises, checked
//! against the source, so it cannot drift:
//! - no two modules of fd-node, or of fd-learn, import each other, directly
//!   or around a loop (test code excluded: a module's tests may use anything);
//! - the crates below fd-node (fd-protocol, fd-data, fd-net) and the
//!   coordinator never depend on the ML stack or on fd-node;
//! - fd-learn (the learning layer) never depends on the network (fd-net,
//!   libp2p) or on fd-node.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// The `crate::<module>` names a file's non-test code refers to.
fn referenced_modules(source: &str) -> BTreeSet<String> {
    // Inline unit tests sit at the end of a file (`#[cfg(test)] mod tests {`);
    // test files (`tests.rs`) are skipped by the caller.
    let code = source
        .split("#[cfg(test)]\nmod tests {")
        .next()
        .unwrap_or_default();
    let mut found = BTreeSet::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or_default();
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

/// The top-level modules of the crate whose sources are in `src` and the
/// modules each one's code uses.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if name == "lib" || name == "bin" {
            continue;
        }
        let files = if path.is_dir() {
            rust_files(&path)
        } else {
            vec![path.clone()]
        };
        let deps = graph.entry(name.clone()).or_default();
        for file in files {
            if file.file_name().is_some_and(|f| f == "tests.rs") {
                continue;
            }
            deps.extend(referenced_modules(&std::fs::read_to_string(&file).unwrap()));
        }
        deps.remove(&name);
    }
    graph
}

/// A loop in `graph`, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, bool>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_string(), false);
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if !graph.contains_key(next) {
                continue;
            }
            match state.get(next) {
                Some(false) => {
                    let start = path.iter().position(|n| n == next).unwrap();
                    let mut cycle = path[start..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(true) => {}
                None => {
                    if let Some(cycle) = visit(next, graph, state, path) {
                        return Some(cycle);
                    }
                }
            }
        }
        path.pop();
        state.insert(node.to_string(), true);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if !state.contains_key(node)
            && let Some(cycle) = visit(node, graph, &mut state, &mut Vec::new())
        {
            return Some(cycle);
        }
    }
    None
}

#[test]
fn the_cycle_finder_finds_a_loop_and_accepts_a_dag() {
    let graph = |edges: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    assert_eq!(
        find_cycle(&graph(&[("a", "b"), ("b", "c"), ("c", "a")])),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    assert_eq!(
        find_cycle(&graph(&[("a", "b"), ("a", "c"), ("b", "c")])),
        None
    );
    let code = "use crate::model::{Student};\n// crate::runtime in a comment\nfn f() { crate::aggregate::x(); }\n#[cfg(test)]\nmod tests { use crate::member; }";
    assert_eq!(
        referenced_modules(code),
        BTreeSet::from(["aggregate".to_string(), "model".to_string()])
    );
}

#[test]
fn modules_of_fd_node_and_fd_learn_import_each_other_one_way_only() {
    // (crate, sources, a module and one it is known to use: the graph was read)
    for (krate, src, module, uses) in [
        ("fd-node", "src", "round", "member"),
        ("fd-learn", "learn/src", "learner", "model"),
    ] {
        let graph = module_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join(src));
        assert!(
            graph.get(module).is_some_and(|deps| deps.contains(uses)),
            "{krate}: {graph:?}"
        );
        if let Some(cycle) = find_cycle(&graph) {
            panic!("module cycle in {krate}: {}", cycle.join(" → "));
        }
    }
}

/// The `[dependencies]` names of a crate's Cargo.toml.
fn dependencies(manifest: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(manifest).unwrap();
    let table: toml::Table = toml::from_str(&text).unwrap();
    table
        .get("dependencies")
        .and_then(|d| d.as_table())
        .map(|d| d.keys().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn the_layers_below_fd_node_and_the_coordinator_link_no_ml_stack() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let ml = ["burn", "burn-store", "gemm", "fd-node"];
    for (krate, manifest) in [
        ("fd-protocol", "protocol/Cargo.toml"),
        ("fd-data", "node/data/Cargo.toml"),
        ("fd-net", "node/net/Cargo.toml"),
        ("fd-coordinator", "coordinator/Cargo.toml"),
    ] {
        let deps = dependencies(&root.join(manifest));
        assert!(!deps.is_empty(), "{krate}: no dependencies read");
        for banned in ml {
            assert!(!deps.contains(banned), "{krate} depends on {banned}");
        }
    }
    // And the layers depend downward only.
    let data = dependencies(&root.join("node/data/Cargo.toml"));
    assert!(
        !data.contains("fd-net") && !data.contains("libp2p"),
        "{data:?}"
    );
    assert!(!dependencies(&root.join("protocol/Cargo.toml")).contains("fd-data"));
}

#[test]
fn the_learning_layer_links_no_network_and_not_the_member() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let learn = dependencies(&root.join("node/learn/Cargo.toml"));
    assert!(learn.contains("burn"), "{learn:?}");
    for banned in ["fd-net", "libp2p", "fd-node", "fd-coordinator"] {
        assert!(!learn.contains(banned), "fd-learn depends on {banned}");
    }
    // And fd-net knows nothing of learning.
    let net = dependencies(&root.join("node/net/Cargo.toml"));
    assert!(!net.contains("fd-learn"), "{net:?}");
}
