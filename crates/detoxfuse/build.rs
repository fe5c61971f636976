//! Embeds the project's vendored run-time data (`data/` at the workspace root) in the library:
//! `$OUT_DIR/vendored.rs` lists every file there as `(relative path, include_bytes!)`, so that
//! a built or installed binary needs no file from the source tree.

use std::path::{Path, PathBuf};

fn files(dir: &Path, root: &Path, out: &mut Vec<(String, PathBuf)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files(&p, root, out);
        } else {
            let rel = p.strip_prefix(root).expect("under data/");
            let rel = rel.to_string_lossy().replace('\\', "/");
            if rel != "README.md" {
                out.push((rel, p));
            }
        }
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data");
    let root = root.canonicalize().unwrap_or_else(|e| {
        panic!(
            "the vendored data directory {} is missing ({e})",
            root.display()
        )
    });
    println!("cargo:rerun-if-changed={}", root.display());
    let mut list = Vec::new();
    files(&root, &root, &mut list);
    for (_, p) in &list {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    let mut src = String::from("/// Every vendored file: (path under `data/`, bytes).\npub const FILES: &[(&str, &[u8])] = &[\n");
    for (rel, p) in &list {
        src.push_str(&format!(
            "    ({rel:?}, include_bytes!({:?})),\n",
            p.display().to_string()
        ));
    }
    src.push_str("];\n");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("vendored.rs");
    std::fs::write(&out, src).expect("writing vendored.rs");
}
