//! Shared helpers for the integration tests: the real models from the cache, fixtures.
#![allow(dead_code)]

use std::path::PathBuf;

use detoxfuse::fetch;
use detoxfuse::lm::{ids_tensor, CausalLm, KvCache};

/// Path of a fetched model; panics with the fix when it is missing (a missing model is a
/// failed test, never a skipped one).
pub fn model(name: &str) -> PathBuf {
    let spec = fetch::spec(name).unwrap();
    let p = fetch::model_path(&fetch::default_cache_dir(), &spec);
    assert!(
        p.exists(),
        "{} missing: run `cargo run --release -- fetch` (or scripts/test.sh, which does) first",
        p.display()
    );
    p
}

pub fn fixture(name: &str) -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name);
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&s).unwrap()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Last-position logits of a fresh forward over `ids` (batch 1).
pub fn last_logits(m: &dyn CausalLm, ids: &[u32]) -> Vec<f32> {
    step_logits(m, ids, &mut m.new_cache())
}

/// Runs `ids` (batch 1) after what `cache` holds; last-position logits.
pub fn step_logits(m: &dyn CausalLm, ids: &[u32], cache: &mut KvCache) -> Vec<f32> {
    m.forward_last_logits(&ids_tensor(&[ids.to_vec()]).unwrap(), cache)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap()
}
