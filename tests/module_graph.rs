//! No import circles in src/: if module a uses module b, b must not (even through
//! others) use a. A module may use its ancestors and its descendants; any other use
//! counts between the two modules just under the deepest ancestor they share (so
//! `policy::reload` using `metrics` is `policy` → `metrics`).
//!
//! Read from the source: `use crate::…` / `use super::…` trees and inline `crate::a::b`
//! paths, resolved to the longest path that is a file under src/.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

type Module = Vec<String>;

/// Every module of the crate, by path (`["policy", "rules"]`), with its source.
fn modules() -> BTreeMap<Module, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<Module, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(root).unwrap().with_extension("");
                let mut module: Module = rel.iter().map(|s| s.to_string_lossy().into()).collect();
                if matches!(
                    module.last().map(String::as_str),
                    Some("mod" | "lib" | "main")
                ) {
                    module.pop();
                }
                let text = std::fs::read_to_string(&path).unwrap();
                out.insert(module, text);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    walk(&root, &root, &mut out);
    out
}

/// The paths a use tree names (`a::{b, c::d}` → `a::b`, `a::c::d`), after `prefix`.
fn use_paths(tree: &str, prefix: &[String], out: &mut Vec<Module>) {
    let tree = tree.trim();
    let (head, group) = match tree.find('{') {
        Some(open) => (
            &tree[..open],
            Some(&tree[open + 1..tree.rfind('}').unwrap_or(tree.len())]),
        ),
        None => (tree, None),
    };
    let mut path = prefix.to_vec();
    path.extend(
        head.split("::")
            .map(|s| s.split(" as ").next().unwrap_or("").trim().to_owned())
            .filter(|s| !s.is_empty()),
    );
    let Some(group) = group else {
        out.push(path);
        return;
    };
    let (mut depth, mut start) = (0, 0);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                use_paths(&group[start..i], &path, out);
                start = i + 1;
            }
            _ => {}
        }
    }
    use_paths(&group[start..], &path, out);
}

/// The modules `module` (with source `text`) uses.
fn uses(module: &Module, text: &str, known: &BTreeMap<Module, String>) -> BTreeSet<Module> {
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let parent: Module = module[..module.len().saturating_sub(1)].to_vec();
    let root_of = |word: &str| {
        if word == "crate" {
            Vec::new()
        } else {
            parent.clone()
        }
    };
    let mut paths = Vec::new();
    for (at, _) in code.match_indices("use ") {
        let rest = &code[at + 4..];
        let Some(end) = rest.find(';') else { continue };
        for word in ["crate", "super"] {
            if let Some(tree) = rest[..end].strip_prefix(&format!("{word}::")) {
                use_paths(tree, &root_of(word), &mut paths);
            }
        }
    }
    for word in ["crate::", "super::"] {
        for (at, _) in code.match_indices(word) {
            let rest = &code[at + word.len()..];
            let segments: Vec<String> = rest
                .split("::")
                .take_while(|s| {
                    !s.is_empty()
                        && s.bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                })
                .map(str::to_owned)
                .collect();
            let mut path = root_of(word.trim_end_matches("::"));
            path.extend(segments);
            paths.push(path);
        }
    }
    paths
        .into_iter()
        .filter_map(|mut path| {
            while !path.is_empty() && !known.contains_key(&path) {
                path.pop();
            }
            (!path.is_empty() && &path != module).then_some(path)
        })
        .collect()
}

/// `a` → `b` as counted: the two modules just under their deepest shared ancestor, or
/// None when one is the other's ancestor.
fn counted(a: &Module, b: &Module) -> Option<(Module, Module)> {
    let shared = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    if shared == a.len().min(b.len()) {
        return None;
    }
    Some((a[..=shared].to_vec(), b[..=shared].to_vec()))
}

#[test]
fn modules_use_each_other_in_one_direction_only() {
    let modules = modules();
    assert!(modules.len() > 40, "{} modules found", modules.len());
    let mut edges: BTreeMap<(Module, Module), Vec<String>> = BTreeMap::new();
    for (module, text) in &modules {
        for used in uses(module, text, &modules) {
            if let Some(edge) = counted(module, &used) {
                edges.entry(edge).or_default().push(format!(
                    "{} uses {}",
                    module.join("::"),
                    used.join("::")
                ));
            }
        }
    }
    // A use that can be followed back to where it started is a circle.
    let reaches = |from: &Module, to: &Module| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(at) = todo.pop() {
            if &at == to {
                return true;
            }
            if seen.insert(at.clone()) {
                todo.extend(
                    edges
                        .keys()
                        .filter(|(a, _)| *a == at)
                        .map(|(_, b)| b.clone()),
                );
            }
        }
        false
    };
    let circles: Vec<&String> = edges
        .iter()
        .filter(|((a, b), _)| reaches(b, a))
        .flat_map(|(_, why)| why)
        .collect();
    assert!(circles.is_empty(), "import circles: {circles:#?}");
}

#[test]
fn the_checker_sees_a_circle() {
    let known: BTreeMap<Module, String> = [
        (vec!["a".to_owned()], String::new()),
        (vec!["b".to_owned()], String::new()),
    ]
    .into_iter()
    .collect();
    let a = vec!["a".to_owned()];
    let b = vec!["b".to_owned()];
    assert!(uses(&a, "use crate::b::{Thing, other::X};", &known).contains(&b));
    assert!(uses(&b, "fn f() { crate::a::f() }", &known).contains(&a));
    assert_eq!(counted(&a, &b), Some((a.clone(), b.clone())));
    let child = vec!["a".to_owned(), "c".to_owned()];
    assert_eq!(counted(&child, &a), None, "a child may use its parent");
}
