//! What the targets share: a scratch directory, the real tokenizers and the real SmolLM2
//! model (from the project's cache: `detoxfuse fetch` puts them there).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use detoxfuse::text::Tokenizer;

/// A per-process scratch directory (inputs that the library reads from files go here).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("a scratch directory"))
        .path()
}

/// Writes `bytes` to `name` in the scratch directory.
pub fn file(name: &str, bytes: &[u8]) -> PathBuf {
    let p = scratch().join(name);
    std::fs::write(&p, bytes).expect("writing a scratch file");
    p
}

/// A fetched model's file (`smollm2` or `gemma3`), from `$DETOXFUSE_CACHE` or the default
/// cache.
pub fn model_path(name: &str) -> PathBuf {
    let cache = std::env::var_os("DETOXFUSE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(detoxfuse::fetch::default_cache_dir);
    detoxfuse::hub::Hub::new(&cache)
        .model(name, &mut detoxfuse::fetch::Silent)
        .unwrap_or_else(|e| panic!("{name}: {e}; run `detoxfuse fetch` first"))
}

/// SmolLM2's byte-level BPE and Gemma-3's SentencePiece tokenizer, read once.
pub fn tokenizers() -> &'static [Tokenizer; 2] {
    static T: OnceLock<[Tokenizer; 2]> = OnceLock::new();
    T.get_or_init(|| {
        ["smollm2", "gemma3"].map(|m| Tokenizer::for_model(&model_path(m)).expect("tokenizer"))
    })
}
