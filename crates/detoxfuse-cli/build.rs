//! Records the source revision at build time (`DETOXFUSE_COMMIT`, `git describe --always
//! --dirty`, or "unknown" outside a checkout) so that reports name the code that wrote them
//! without the binary reading the source tree at run time.

fn main() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let commit = std::process::Command::new("git")
        .args(["-C", dir, "describe", "--always", "--dirty"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=DETOXFUSE_COMMIT={commit}");
    // A new commit, a change of the index, or any edit under crates/ (cargo scans a directory
    // for changes) recomputes the stamp, so `--dirty` is right for the code that was built.
    for f in ["../../.git/HEAD", "../../.git/index", ".."] {
        if std::path::Path::new(dir).join(f).exists() {
            println!("cargo:rerun-if-changed={f}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
