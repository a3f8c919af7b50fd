//! The code's shape, checked: no import circle among the modules of the node, the
//! router or the client (file by file), the node's top-level modules import only
//! from their own layer or the ones below it, and no file of `node/src` or
//! `router/src` outgrows [`MAX_LINES`] lines (comments included) outside its tests.
//!
//! A module's imports are the `crate::…`, `super::…` and `self::…` paths in its code
//! (comments and `#[cfg(test)] mod tests` left out), each resolved to the deepest
//! module file it names. Run with `cargo nextest run -p ringfeed-cluster-tests
//! --test layering`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The node's layers, lowest first: a module may import from its own layer and the
/// ones below, never above (ARCHITECTURE.md explains each).
const NODE_LAYERS: &[&[&str]] = &[
    &["protocol", "budget", "latency", "peers"],
    &["config", "store"],
    &["state"],
    &["node"],
    &["cluster"],
    &["session", "ws", "quic", "http", "internal", "wire"],
    &["run", "admin", "certs", "sim"],
];

/// The router's layers, lowest first.
const ROUTER_LAYERS: &[&[&str]] = &[
    &[
        "key",
        "ring",
        "backoff",
        "api_token",
        "throttle",
        "watch",
        "tls",
        "stats",
    ],
    &["membership"],
    &["forward"],
    &["service", "config", "observe"],
];

/// The most lines a source file may have outside its tests.
const MAX_LINES: usize = 700;

type Module = Vec<String>;

/// Every module file under `src` (not `lib.rs`, `main.rs`, binaries or test files),
/// by module path.
fn modules(src: &Path) -> BTreeMap<Module, PathBuf> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read a source folder") {
            let path = entry.expect("a folder entry").path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "bin") {
                    dirs.push(path);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path
                .strip_prefix(src)
                .expect("under src")
                .with_extension("");
            let mut module: Module = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if module.last().is_some_and(|m| m == "mod") {
                module.pop();
            }
            let top_file = module.len() == 1 && (module[0] == "lib" || module[0] == "main");
            if top_file || module.last().is_some_and(|m| m == "tests") {
                continue;
            }
            out.insert(module, path);
        }
    }
    out
}

/// A file's code without comments and without its `#[cfg(test)] mod tests`.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("read a source file");
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(at) => &text[..at],
        None => &text[..],
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .map(|l| l.split(" // ").next().unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path that starts with `crate`, `super` or `self` in `code`, as segments; a
/// group (`crate::a::{b, c::d}`) gives one path per member.
fn paths(code: &str) -> Vec<Vec<String>> {
    let bytes = code.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut out = Vec::new();
    for start in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(at) = code[from..].find(start).map(|i| i + from) {
            from = at + start.len();
            if at > 0 && (ident(bytes[at - 1]) || bytes[at - 1] == b':') {
                continue;
            }
            let mut segments = vec![start.trim_end_matches(':').to_owned()];
            let mut i = at + start.len();
            loop {
                let s = i;
                while i < bytes.len() && ident(bytes[i]) {
                    i += 1;
                }
                if i > s {
                    segments.push(code[s..i].to_owned());
                }
                if code[i..].starts_with("::{") {
                    let close = code[i..].find('}').map_or(bytes.len(), |c| c + i);
                    for member in code[i + 3..close].split(',') {
                        let mut path = segments.clone();
                        path.extend(
                            member
                                .split("::")
                                .map(|m| m.trim().to_owned())
                                .filter(|m| !m.is_empty()),
                        );
                        out.push(path);
                    }
                    break;
                }
                if code[i..].starts_with("::") && i > s {
                    i += 2;
                    continue;
                }
                out.push(segments);
                break;
            }
        }
    }
    out
}

/// The modules each module imports from (its own children and ancestors left out).
fn imports(src: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let modules = modules(src);
    let mut graph = BTreeMap::new();
    for (module, file) in &modules {
        let mut deps = BTreeSet::new();
        for path in paths(&code(file)) {
            let mut resolved: Module = match path[0].as_str() {
                "crate" => Vec::new(),
                "self" => module.clone(),
                _ => module[..module.len() - 1].to_vec(),
            };
            let mut rest = &path[1..];
            while rest.first().is_some_and(|s| s == "super") {
                resolved.pop();
                rest = &rest[1..];
            }
            resolved.extend(rest.iter().cloned());
            let target = (1..=resolved.len())
                .rev()
                .map(|n| resolved[..n].to_vec())
                .find(|m| modules.contains_key(m));
            if let Some(target) = target {
                let related = module.starts_with(&target) || target.starts_with(module);
                if !related {
                    deps.insert(target);
                }
            }
        }
        graph.insert(module.clone(), deps);
    }
    graph
}

/// A circle of imports in `graph`, if there is one.
fn circle(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        at: &Module,
        graph: &BTreeMap<Module, BTreeSet<Module>>,
        marks: &mut BTreeMap<Module, Mark>,
        stack: &mut Vec<Module>,
    ) -> Option<Vec<Module>> {
        match marks.get(at) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let from = stack.iter().position(|m| m == at).expect("on the stack");
                let mut found = stack[from..].to_vec();
                found.push(at.clone());
                return Some(found);
            }
            None => {}
        }
        marks.insert(at.clone(), Mark::Open);
        stack.push(at.clone());
        for next in graph.get(at).into_iter().flatten() {
            if let Some(found) = visit(next, graph, marks, stack) {
                return Some(found);
            }
        }
        stack.pop();
        marks.insert(at.clone(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    graph
        .keys()
        .find_map(|m| visit(m, graph, &mut marks, &mut Vec::new()))
}

fn src(krate: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(krate)
        .join("src")
}

fn show(path: &[Module]) -> String {
    path.iter()
        .map(|m| m.join("::"))
        .collect::<Vec<_>>()
        .join(" → ")
}

/// The edges of `graph` that go up `layers`, and top-level modules no layer names.
fn layer_breaches(graph: &BTreeMap<Module, BTreeSet<Module>>, layers: &[&[&str]]) -> Vec<String> {
    let layer_of = |m: &Module| layers.iter().position(|l| l.contains(&m[0].as_str()));
    let mut breaches = Vec::new();
    for (module, deps) in graph {
        let Some(own) = layer_of(module) else {
            breaches.push(format!("{} is in no layer", module.join("::")));
            continue;
        };
        for dep in deps {
            if layer_of(dep).is_some_and(|l| l > own) {
                breaches.push(format!(
                    "{} imports {} from a higher layer",
                    module.join("::"),
                    dep.join("::")
                ));
            }
        }
    }
    breaches
}

#[test]
fn no_module_imports_in_a_circle() {
    for krate in ["node", "router", "client"] {
        let graph = imports(&src(krate));
        assert!(
            graph.len() > 1 || krate == "client",
            "{krate}: modules found"
        );
        if let Some(found) = circle(&graph) {
            panic!("{krate}: import circle {}", show(&found));
        }
    }
}

#[test]
fn the_node_and_the_router_import_only_downward() {
    for (krate, layers) in [("node", NODE_LAYERS), ("router", ROUTER_LAYERS)] {
        let breaches = layer_breaches(&imports(&src(krate)), layers);
        assert!(breaches.is_empty(), "{krate}: {breaches:#?}");
    }
}

#[test]
fn no_source_file_outgrows_the_limit() {
    let mut long = Vec::new();
    for krate in ["node", "router"] {
        for file in modules(&src(krate)).values() {
            let text = std::fs::read_to_string(file).expect("read a source file");
            let lines = text
                .find("#[cfg(test)]\nmod tests {")
                .map_or(&text[..], |at| &text[..at])
                .lines()
                .count();
            if lines > MAX_LINES {
                long.push(format!("{}: {lines} lines", file.display()));
            }
        }
    }
    assert!(long.is_empty(), "over {MAX_LINES} lines of code: {long:#?}");
}

#[test]
fn the_checker_sees_a_circle_and_an_upward_import() {
    let module = |s: &str| s.split("::").map(str::to_owned).collect::<Module>();
    let code = "use crate::a::{b::C, d};\nfn f() { super::e::g(); crate::h::I::new() }";
    let found: Vec<String> = paths(code).iter().map(|p| p.join("::")).collect();
    assert_eq!(
        found,
        [
            "crate::a::b::C",
            "crate::a::d",
            "crate::h::I::new",
            "super::e::g"
        ]
    );
    let graph = BTreeMap::from([
        (module("a"), BTreeSet::from([module("b")])),
        (module("b"), BTreeSet::from([module("c")])),
        (module("c"), BTreeSet::from([module("a")])),
    ]);
    let found = circle(&graph).expect("a circle");
    assert_eq!(found.first(), found.last());
    let layered = BTreeMap::from([(module("a"), BTreeSet::from([module("b")]))]);
    assert_eq!(layer_breaches(&layered, &[&["a"], &["b"]]).len(), 1);
    assert!(layer_breaches(&layered, &[&["b"], &["a"]]).is_empty());
}
