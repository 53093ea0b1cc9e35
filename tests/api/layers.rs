//! The house's layers point one way: no module of `src/` depends, through
//! any chain of `crate::` paths, on itself.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each top-level module of `src/` (a file or a folder) and the others it names with `crate::`.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
            let path = entry.path();
            if path.is_dir() {
                files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    files(&src, &mut paths);
    let top = |path: &Path| {
        let rel = path.strip_prefix(&src).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
        first.trim_end_matches(".rs").to_owned()
    };
    let modules: BTreeSet<String> = paths.iter().map(|p| top(p)).filter(|m| m != "lib" && m != "main").collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in &paths {
        let module = top(path);
        if !modules.contains(&module) {
            continue;
        }
        let code: String = std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|line| line.split("//").next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n");
        let deps = graph.entry(module.clone()).or_default();
        for (at, _) in code.match_indices("crate::") {
            let rest = &code[at + "crate::".len()..];
            // `crate::name` and `crate::{a, b::c}`.
            let names: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => group
                    .split('}')
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|part| part.trim().split("::").next().unwrap_or_default())
                    .collect(),
                None => vec![rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).next().unwrap_or_default()],
            };
            deps.extend(names.into_iter().filter(|n| modules.contains(*n) && **n != module).map(str::to_owned));
        }
    }
    graph
}

#[test]
fn no_module_depends_on_itself_through_others() {
    let graph = module_graph();
    assert!(graph.len() > 10, "the modules of src/ were found: {:?}", graph.keys());
    // Depth-first search for a path from each module back to itself.
    for start in graph.keys() {
        let mut stack: Vec<Vec<&String>> = vec![vec![start]];
        let mut seen = BTreeSet::new();
        while let Some(path) = stack.pop() {
            let last = *path.last().unwrap();
            for next in &graph[last] {
                let mut longer = path.clone();
                longer.push(next);
                assert!(
                    next != start,
                    "an import cycle: {}",
                    longer.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(" -> ")
                );
                if seen.insert(next) {
                    stack.push(longer);
                }
            }
        }
    }
}
