//! Shared helpers for the integration tests: the real models from the cache, fixtures.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use detoxfuse::calibrate::model::{CalibrationModel, Trainable};
use detoxfuse::lm::export::LAYER_TENSORS;
use detoxfuse::lm::llama::LlamaConfig;
use rand::{Rng, SeedableRng};

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

/// A tiny random llama (numerics only: vocabulary 23, width 8, 2 layers, GQA 4:2).
pub fn tiny_calibration(tied: bool, trainable: Trainable) -> CalibrationModel {
    let config = LlamaConfig {
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        vocab_size: 23,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 64,
        tie_word_embeddings: tied,
        head_dim: Some(4),
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut rand_t = |shape: &[usize], gain: bool| {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| {
                let r: f64 = rng.random_range(-0.5..0.5);
                if gain {
                    1.0 + r
                } else {
                    r
                }
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let mut t = HashMap::new();
    t.insert(
        "model.embed_tokens.weight".to_string(),
        rand_t(&[23, 8], false),
    );
    t.insert("model.norm.weight".to_string(), rand_t(&[8], true));
    if !tied {
        t.insert("lm_head.weight".to_string(), rand_t(&[23, 8], false));
    }
    for i in 0..2 {
        for (_, hf) in LAYER_TENSORS {
            let shape: Vec<usize> = match hf {
                "input_layernorm" | "post_attention_layernorm" => vec![8],
                "self_attn.q_proj" => vec![16, 8],
                "self_attn.k_proj" | "self_attn.v_proj" => vec![8, 8],
                "self_attn.o_proj" => vec![8, 16],
                "mlp.gate_proj" | "mlp.up_proj" => vec![12, 8],
                "mlp.down_proj" => vec![8, 12],
                other => panic!("unexpected {other}"),
            };
            let gain = shape.len() == 1;
            t.insert(
                format!("model.layers.{i}.{hf}.weight"),
                rand_t(&shape, gain),
            );
        }
    }
    CalibrationModel::new(config, &t, trainable, DType::F64).unwrap()
}

/// Central differences on 3 coordinates of every parameter tensor against `grads`, the
/// analytic gradient of `objective`.
/// Returns how many coordinates were checked.
pub fn check_finite_differences(
    vars: &std::collections::BTreeMap<String, candle_core::Var>,
    grads: &candle_core::backprop::GradStore,
    objective: impl Fn() -> f64,
    what: &str,
) -> usize {
    let mut checked = 0;
    for (name, var) in vars {
        let g: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{what}: no gradient for {name}"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let orig = var.as_tensor().copy().unwrap();
        let base: Vec<f64> = orig.flatten_all().unwrap().to_vec1().unwrap();
        let n = base.len();
        for &k in &[0, n / 2, n - 1] {
            let eps = 1e-6;
            let at = |delta: f64| {
                let mut v = base.clone();
                v[k] += delta;
                var.set(&Tensor::from_vec(v, orig.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                objective()
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            var.set(&orig).unwrap();
            let err = (fd - g[k]).abs();
            assert!(
                err <= 1e-6 + 1e-4 * fd.abs(),
                "{what} {name}[{k}]: analytic {} vs finite difference {fd}",
                g[k]
            );
            checked += 1;
        }
    }
    checked
}
