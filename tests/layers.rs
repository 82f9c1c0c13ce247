//! The import graph of `src/`, drawn from the code's own `crate::`, `super::` and `self::`
//! paths: no cycle between modules, and every edge between top-level modules points down the
//! layers of docs/architecture.md. A test, so a new upward import fails CI instead of waiting
//! for a reviewer.
//!
//! Edges from a module to one of its ancestors (`super::Result` in a child) are a module using
//! what its parent declares and are not counted as cycles; test modules are ignored.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules from the bottom up. A module may import its own layer's top-level module
/// only where the layer says so (`shares`); otherwise only lower layers.
const LAYERS: &[(&[&str], bool)] = &[
    // Pure core: no I/O, imports nothing above it.
    (
        &[
            "limits",
            "wallclock",
            "vclock",
            "quorum",
            "ring",
            "mux",
            "net",
            "metrics",
            "shutdown",
            "priority",
        ],
        true,
    ),
    // The wire: generated gRPC code, conversions, error details.
    (&["rpc"], false),
    // Stores: the engine and the coordinators' backends.
    (&["engine", "meta", "idempotency"], false),
    // Typed settings of every role (uses the engine's option types).
    (&["config"], false),
    // The three roles' libraries: they talk to each other only over rpc.
    (&["storage", "coordinator", "gateway"], false),
    // Command-line arguments; logging and span export of the server process.
    (&["cli", "telemetry"], false),
    // What the binary runs: the roles' processes and the tools.
    (&["roles", "tools"], false),
    (&["lib", "main"], false),
];

fn layer_of(top: &str) -> Option<(usize, bool)> {
    LAYERS
        .iter()
        .enumerate()
        .find(|(_, (mods, _))| mods.contains(&top))
        .map(|(i, (_, shares))| (i, *shares))
}

/// Module path (`coordinator::batcher`) -> file.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(src, &mut files);
    files
        .into_iter()
        .map(|file| {
            let rel = file
                .strip_prefix(src)
                .expect("under src")
                .with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            (parts.join("::"), file)
        })
        .collect()
}

/// Every `crate::`/`super::`/`self::` path in `code`, with `{a, b::c}` groups expanded one
/// level (enough for the imports this crate writes).
fn paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    for start in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(at) = code[from..].find(start) {
            let i = from + at;
            from = i + start.len();
            if i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_') {
                continue;
            }
            let mut end = i;
            while end < bytes.len()
                && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_' || bytes[end] == b':')
            {
                end += 1;
            }
            let head = code[i..end].trim_end_matches(':').to_owned();
            if code[end..].starts_with('{') && code[..end].ends_with("::") {
                let close = code[end..].find('}').map_or(code.len(), |c| end + c);
                for item in code[end + 1..close].split(',') {
                    let item = item.split(" as ").next().unwrap_or("").trim();
                    let item = item.trim_start_matches('{').trim();
                    if !item.is_empty() && item != "self" {
                        out.push(format!("{head}::{item}"));
                    }
                }
            }
            out.push(head);
        }
    }
    out
}

/// The module a path names: the longest known module prefix of its absolute form.
fn resolve(
    current: &str,
    path: &str,
    known: &BTreeMap<String, PathBuf>,
    root: &str,
) -> Option<String> {
    let mut segments: Vec<&str> = path.split("::").collect();
    let mut base: Vec<&str> = if current == root {
        Vec::new()
    } else {
        current.split("::").collect()
    };
    match segments.first().copied() {
        Some("crate") => {
            base.clear();
            segments.remove(0);
        }
        Some("self") => {
            segments.remove(0);
        }
        Some("super") => {
            while segments.first() == Some(&"super") {
                segments.remove(0);
                base.pop();
            }
        }
        _ => return None,
    }
    let full: Vec<&str> = base.into_iter().chain(segments).collect();
    (1..=full.len())
        .rev()
        .map(|n| full[..n].join("::"))
        .find(|candidate| known.contains_key(candidate))
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let known = modules(&src);
    let mut edges = BTreeMap::new();
    for (module, file) in &known {
        let code = std::fs::read_to_string(file).expect("read module");
        let code = code.split("#[cfg(test)]").next().unwrap_or("");
        let code: String = code
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let root = if module == "main" { "main" } else { "lib" };
        let targets: BTreeSet<String> = paths(&code)
            .iter()
            .filter_map(|p| resolve(module, p, &known, root))
            .filter(|t| t != module)
            .collect();
        edges.insert(module.clone(), targets);
    }
    edges
}

fn top(module: &str) -> &str {
    module.split("::").next().unwrap_or(module)
}

fn is_ancestor(ancestor: &str, module: &str) -> bool {
    module
        .strip_prefix(ancestor)
        .is_some_and(|rest| rest.starts_with("::"))
}

#[test]
fn the_import_graph_has_no_cycle() {
    let edges = graph();
    // Depth-first search for a back edge, ignoring edges to ancestors.
    fn visit<'a>(
        node: &'a str,
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<&'a str, u8>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        state.insert(node, 1);
        stack.push(node);
        for next in edges.get(node).into_iter().flatten() {
            if is_ancestor(next, node) {
                continue;
            }
            match state.get(next.as_str()) {
                Some(1) => {
                    let from = stack.iter().position(|m| m == next).unwrap_or(0);
                    let mut cycle: Vec<String> =
                        stack[from..].iter().map(|m| m.to_string()).collect();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(cycle) = visit(next, edges, state, stack) {
                        return Some(cycle);
                    }
                }
            }
        }
        stack.pop();
        state.insert(node, 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in edges.keys() {
        if !state.contains_key(node.as_str()) {
            let cycle = visit(node, &edges, &mut state, &mut Vec::new());
            assert!(
                cycle.is_none(),
                "import cycle: {}",
                cycle.unwrap_or_default().join(" -> ")
            );
        }
    }
}

#[test]
fn imports_point_down_the_layers() {
    let edges = graph();
    let mut upward = Vec::new();
    for (from, targets) in &edges {
        let Some((from_layer, shares)) = layer_of(top(from)) else {
            panic!(
                "top-level module {} is in no layer of tests/layers.rs",
                top(from)
            );
        };
        for to in targets {
            if top(to) == top(from) {
                continue;
            }
            let (to_layer, _) = layer_of(top(to)).expect("every module has a layer");
            let allowed = to_layer < from_layer || (to_layer == from_layer && shares);
            if !allowed {
                upward.push(format!("{from} -> {to}"));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports against the layers:\n{}",
        upward.join("\n")
    );
}

#[test]
fn the_graph_sees_imports() {
    // The checker must see the edges it is meant to judge (a parser that finds nothing would
    // pass every check).
    let edges = graph();
    let has = |from: &str, to: &str| edges.get(from).is_some_and(|t| t.contains(to));
    assert!(
        has("coordinator::replicas", "coordinator::batcher"),
        "super:: import"
    );
    assert!(has("engine::types", "limits"), "crate:: group import");
    assert!(has("roles::storage", "engine"));
    assert!(edges.len() > 60, "{} modules", edges.len());
}
