//! `cargo xtask lint` (part of `test`): the structure rules rustc and clippy do not check.
//!
//! - **Layers.** The agent's top-level modules are ordered (see [`LAYERS`] and
//!   ARCHITECTURE.md, "Layers"): production code may use only modules of its own layer or of
//!   an earlier one. Sibling modules must not use each other both ways.
//! - **Function length.** No function of the agent or the kernel programs is longer than
//!   [`MAX_FN_LINES`] lines outside tests, unless the line above it says why with a comment
//!   starting `// Long:`.
//!
//! Both are read from the syntax tree (syn), not from text, so a `use crate::{a, b::{c}}`
//! group or a path in an expression counts like any other reference.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use syn::visit::Visit;

/// The agent's top-level modules, earliest layer first. A module may use modules of its own
/// layer and of earlier ones. Items of `lib.rs` itself (e.g. `crate::chain`) belong to none.
pub const LAYERS: &[&[&str]] = &[
    // Foundations: no knowledge of Kubernetes, maps or the data flow.
    &["cgroup", "identity", "logging", "metrics", "mounts"],
    // The kernel side: the embedded object, pins, links, every map's handle.
    &["datapath"],
    // Desired state: Kubernetes objects, their decoding and validation.
    &["store"],
    // Where objects come from: a directory of YAML, the API server.
    &["source"],
    // Pure functions of the store: services, policy, names.
    &["compile"],
    // Desired state into the kernel's maps.
    &["sync"],
    // source → store → compile → sync, run on every change.
    &["pipeline"],
    // Kernel events (ring buffer) and kernel counters, decoded; the mesh (certificates).
    &["events", "stats", "mesh"],
    // Events and names into metrics and flow records (pure).
    &["telemetry"],
    // What the node offers, the admin API and its client.
    &["doctor", "admin"],
    &["cli"],
    // The `weft agent` process: configuration and wiring.
    &["config", "app"],
];

/// The longest function allowed without a reason.
pub const MAX_FN_LINES: usize = 80;

pub fn run(ws: &Path) -> Result<()> {
    let agent = ws.join("agent/src");
    let mut problems = layers(&agent)?;
    for dir in [
        agent.clone(),
        ws.join("ebpf/weft-ebpf/src"),
        ws.join("ebpf/weft-abi/src"),
    ] {
        problems.extend(long_functions(&dir)?);
    }
    if problems.is_empty() {
        return Ok(());
    }
    for p in &problems {
        eprintln!("  {p}");
    }
    bail!(
        "{} structure problem(s) (see ARCHITECTURE.md, \"Layers\")",
        problems.len()
    )
}

/// A source file and the module path it defines (`telemetry/udp.rs` → `[telemetry, udp]`).
struct ModFile {
    path: PathBuf,
    module: Vec<String>,
    ast: syn::File,
}

fn rust_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("read {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn parse(path: &Path) -> Result<syn::File> {
    let text = fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    syn::parse_file(&text).with_context(|| format!("parse {}", path.display()))
}

fn mod_files(src: &Path) -> Result<Vec<ModFile>> {
    let mut out = Vec::new();
    for path in rust_files(src)? {
        let rel = path.strip_prefix(src)?.with_extension("");
        let module: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if matches!(module.as_slice(), [one] if one == "main" || one == "lib" || one == "build") {
            continue;
        }
        let ast = parse(&path)?;
        out.push(ModFile { path, module, ast });
    }
    Ok(out)
}

/// A test file (`tests.rs`, or anything in a `tests/` folder) or a `#[cfg(test)]` item.
fn is_test_path(module: &[String]) -> bool {
    module.iter().any(|m| m == "tests")
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("test")
            || (a.path().is_ident("cfg")
                && matches!(&a.meta, syn::Meta::List(l) if l.tokens.to_string() == "test"))
    })
}

/// Every module path a file's production code refers to, resolved to absolute paths.
#[derive(Default)]
struct Refs {
    /// The module the code being visited is in (inline `mod x {}` blocks push onto it).
    here: Vec<String>,
    found: BTreeSet<Vec<String>>,
}

impl Refs {
    fn resolve(&mut self, segments: &[String]) {
        let mut abs = match segments.first().map(String::as_str) {
            Some("crate") => Vec::new(),
            Some("self") => self.here.clone(),
            Some("super") => self.here.clone(),
            _ => return,
        };
        let mut rest = &segments[1..];
        if segments[0] == "super" {
            abs.pop();
            while rest.first().is_some_and(|s| s == "super") {
                abs.pop();
                rest = &rest[1..];
            }
        }
        abs.extend(rest.iter().cloned());
        self.found.insert(abs);
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                prefix.push(n.ident.to_string());
                self.resolve(&prefix.clone());
                prefix.pop();
            }
            syn::UseTree::Rename(r) => {
                prefix.push(r.ident.to_string());
                self.resolve(&prefix.clone());
                prefix.pop();
            }
            syn::UseTree::Glob(_) => self.resolve(&prefix.clone()),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }
}

impl<'ast> Visit<'ast> for Refs {
    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        if !is_cfg_test(&u.attrs) {
            self.use_tree(&mut Vec::new(), &u.tree);
        }
    }

    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if is_cfg_test(&m.attrs) || m.ident == "tests" {
            return;
        }
        self.here.push(m.ident.to_string());
        syn::visit::visit_item_mod(self, m);
        self.here.pop();
    }

    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        if !is_cfg_test(&f.attrs) {
            syn::visit::visit_item_fn(self, f);
        }
    }

    fn visit_item_impl(&mut self, i: &'ast syn::ItemImpl) {
        if !is_cfg_test(&i.attrs) {
            syn::visit::visit_item_impl(self, i);
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segments: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        if segments.len() > 1 {
            self.resolve(&segments);
        }
        syn::visit::visit_path(self, p);
    }
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The longest prefix of `path` that is a module with a file of its own.
fn module_of(path: &[String], modules: &BTreeSet<Vec<String>>) -> Option<Vec<String>> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| modules.contains(p))
}

fn layers(src: &Path) -> Result<Vec<String>> {
    let files = mod_files(src)?;
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| f.module.clone()).collect();
    let mut problems = Vec::new();
    for top in modules.iter().filter(|m| m.len() == 1 && !is_test_path(m)) {
        if layer_of(&top[0]).is_none() {
            problems.push(format!(
                "agent module `{}` has no layer: add it to LAYERS in xtask/src/lint.rs and to ARCHITECTURE.md",
                top[0]
            ));
        }
    }
    // (from module, to module) between siblings, for the cycle check.
    let mut sibling_edges: BTreeMap<(Vec<String>, Vec<String>), PathBuf> = BTreeMap::new();
    for f in files.iter().filter(|f| !is_test_path(&f.module)) {
        let mut refs = Refs {
            here: f.module.clone(),
            ..Refs::default()
        };
        refs.visit_file(&f.ast);
        let from_layer = layer_of(&f.module[0]);
        for target in &refs.found {
            let Some(to) = module_of(target, &modules) else {
                continue;
            };
            if let (Some(a), Some(b)) = (from_layer, layer_of(&to[0]))
                && b > a
            {
                problems.push(format!(
                    "{}: `{}` (layer {a}) uses `{}` (layer {b}), a later layer",
                    f.path.display(),
                    f.module.join("::"),
                    to.join("::"),
                ));
            }
            let (from, to) = (&f.module, &to);
            if from.len() == to.len()
                && from.len() > 1
                && from[..from.len() - 1] == to[..to.len() - 1]
                && from != to
            {
                sibling_edges.insert((from.clone(), to.clone()), f.path.clone());
            }
        }
    }
    for ((a, b), path) in &sibling_edges {
        if a < b && sibling_edges.contains_key(&(b.clone(), a.clone())) {
            problems.push(format!(
                "{}: `{}` and `{}` use each other; one of them should own what both need",
                path.display(),
                a.join("::"),
                b.join("::")
            ));
        }
    }
    Ok(problems)
}

/// Functions longer than [`MAX_FN_LINES`] outside tests, without a `// Long:` reason above.
fn long_functions(src: &Path) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    for path in rust_files(src)? {
        let rel = path.strip_prefix(src)?.with_extension("");
        let module: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if is_test_path(&module) {
            continue;
        }
        let text = fs::read_to_string(&path)?;
        let lines: Vec<&str> = text.lines().collect();
        let ast = parse(&path)?;
        let mut visitor = FnLengths::default();
        visitor.visit_file(&ast);
        for (name, start, end) in visitor.found {
            let n = end - start + 1;
            if n <= MAX_FN_LINES {
                continue;
            }
            // The reason is the comment line right above the function's first line (its
            // attributes and doc comments included).
            let reasoned = (1..start)
                .rev()
                .map(|l| lines[l - 1].trim())
                .find(|l| !l.starts_with("#[") && !l.starts_with("///"))
                .is_some_and(|l| l.starts_with("// Long:"));
            if !reasoned {
                problems.push(format!(
                    "{}:{start}: fn {name} is {n} lines (more than {MAX_FN_LINES}); split it, or say why above it with `// Long: ...`",
                    path.display()
                ));
            }
        }
    }
    Ok(problems)
}

/// (name, first line, last line) of every non-test function, methods included.
#[derive(Default)]
struct FnLengths {
    found: Vec<(String, usize, usize)>,
}

impl FnLengths {
    /// Records a function with a body, unless it is test code.
    fn record(&mut self, attrs: &[syn::Attribute], sig: &syn::Signature, body: &syn::Block) {
        if !is_cfg_test(attrs) {
            let (start, end) = (
                sig.fn_token.span.start(),
                body.brace_token.span.close().end(),
            );
            self.found
                .push((sig.ident.to_string(), start.line, end.line));
        }
    }
}

impl<'ast> Visit<'ast> for FnLengths {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if !is_cfg_test(&m.attrs) && m.ident != "tests" {
            syn::visit::visit_item_mod(self, m);
        }
    }

    // Functions nested in a test function are test code too: not visited.
    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        self.record(&f.attrs, &f.sig, &f.block);
        if !is_cfg_test(&f.attrs) {
            syn::visit::visit_item_fn(self, f);
        }
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        self.record(&f.attrs, &f.sig, &f.block);
        if !is_cfg_test(&f.attrs) {
            syn::visit::visit_impl_item_fn(self, f);
        }
    }

    fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
        if let Some(block) = &f.default {
            self.record(&f.attrs, &f.sig, block);
        }
        syn::visit::visit_trait_item_fn(self, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(module: &[&str], code: &str) -> BTreeSet<Vec<String>> {
        let mut r = Refs {
            here: module.iter().map(|s| (*s).to_owned()).collect(),
            ..Refs::default()
        };
        r.visit_file(&syn::parse_file(code).expect("parses"));
        r.found
    }

    fn paths(list: &[&[&str]]) -> BTreeSet<Vec<String>> {
        list.iter()
            .map(|p| p.iter().map(|s| (*s).to_owned()).collect())
            .collect()
    }

    #[test]
    fn use_groups_super_and_expression_paths_are_all_references() {
        let found = refs(
            &["telemetry", "udp"],
            "use crate::{a::{b, c as d}, e::*};\nuse super::metrics::Labels;\n\
             fn f() { crate::x::y(); let _ = super::super::z::W; }",
        );
        assert_eq!(
            found,
            paths(&[
                &["a", "b"],
                &["a", "c"],
                &["e"],
                &["telemetry", "metrics", "Labels"],
                &["x", "y"],
                &["z", "W"],
            ])
        );
    }

    #[test]
    fn test_code_is_not_a_reference() {
        let found = refs(
            &["sync"],
            "#[cfg(test)]\nmod tests { use crate::app::X; }\n#[cfg(test)]\nuse crate::cli::Y;\n\
             #[test]\nfn t() { crate::admin::z(); }\nfn real() { crate::store::s(); }",
        );
        assert_eq!(found, paths(&[&["store", "s"]]));
    }

    #[test]
    fn every_layer_name_is_unique() {
        let all: Vec<&str> = LAYERS.iter().flat_map(|l| l.iter().copied()).collect();
        let unique: BTreeSet<&str> = all.iter().copied().collect();
        assert_eq!(all.len(), unique.len());
    }
}
