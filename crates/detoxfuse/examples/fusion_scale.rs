//! Diagnostic: how large is the target's final hidden state next to the unit-variance
//! `LayerNorm(h_c·A)` the fusion mixes in, how aligned are they, and what does mixing do to
//! the next-token distribution? Reads a calibration run's model and hidden alignment from the
//! cache (default: the default calibration model's run directory).
//!
//! `cargo run --release --example fusion_scale [-- RUN_DIR]`

use detoxfuse::align::{Alignment, ModelId};
use detoxfuse::fuse::{fuse, layer_norm};
use detoxfuse::lm::{self, ids_tensor, CausalLm};
use detoxfuse::text::Tokenizer;

fn last(m: &dyn CausalLm, ids: &[u32]) -> candle_core::Tensor {
    let h = m
        .forward_hidden(&ids_tensor(&[ids.to_vec()]).unwrap(), &mut m.new_cache())
        .unwrap();
    let t = h.dim(1).unwrap();
    h.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap()
}

fn rms(x: &candle_core::Tensor) -> f32 {
    x.sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn entropy(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits
        .iter()
        .map(|&l| {
            let p = (l as f64 - max).exp() / z;
            if p > 0.0 {
                -p * p.ln()
            } else {
                0.0
            }
        })
        .sum()
}

fn main() {
    let cache = detoxfuse::fetch::default_cache_dir();
    let target_path =
        detoxfuse::fetch::model_path(&cache, &detoxfuse::fetch::spec("smollm2").unwrap());
    // A calibration run directory (default: the default model's) holding model/ and align/.
    let run = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| cache.join("calibration/smollm2-L3-lens-ul"));
    let cal_dir = run.join("model");
    let a_path = run.join("align/SmolLM2-135M-Instruct.Q4_1.hidden.safetensors");
    let target = lm::load(&target_path).unwrap();
    let cal = lm::load(&cal_dir).unwrap();
    let tok = Tokenizer::for_model(&target_path).unwrap();
    let al = Alignment::load(
        &a_path,
        &ModelId::of(&cal_dir, 576).unwrap(),
        &ModelId::of(&target_path, 576).unwrap(),
    )
    .unwrap();
    println!("prompt | rms(h_t) | rms(h_c) | cos(h_t, LN(h_c A)) | entropy at alpha 0 / 0.1 / 0.2 / 0.3 | same, fused state rescaled to rms(h_t) | top token at alpha 0 / 0.3");
    for prompt in [
        "The weather today is",
        "People think that we are just a bunch of idiots who",
        "She opened the door and",
        "The committee will meet next week to discuss the",
    ] {
        let ids = tok.encode(prompt, false).unwrap();
        let ht = last(target.as_ref(), &ids);
        let hc = last(cal.as_ref(), &ids);
        let mapped = layer_norm(&hc.matmul(&al.a).unwrap()).unwrap();
        let dot: f32 = (&ht * &mapped)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        let cos = dot / (rms(&ht) * rms(&mapped) * 576.0);
        let mut ents = Vec::new();
        let mut rescaled = Vec::new();
        let mut tops = Vec::new();
        let logits_of = |h: &candle_core::Tensor| -> Vec<f32> {
            target
                .lm_head(h)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        for alpha in [0.0, 0.1, 0.2, 0.3] {
            let h = fuse(&ht, &hc, &al.a, alpha).unwrap();
            let logits = logits_of(&h);
            ents.push(format!("{:.2}", entropy(&logits)));
            // the same direction at the target's own scale: what is left is the direction change
            let h_scaled = (&h * (rms(&ht) / rms(&h)) as f64).unwrap();
            rescaled.push(format!("{:.2}", entropy(&logits_of(&h_scaled))));
            let top = logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0 as u32;
            if alpha == 0.0 || alpha == 0.3 {
                tops.push(tok.piece(top).unwrap_or("?").to_string());
            }
        }
        println!(
            "{prompt:?} | {:.3} | {:.3} | {cos:.3} | {} | {} | {:?}",
            rms(&ht),
            rms(&hc),
            ents.join(" / "),
            rescaled.join(" / "),
            tops
        );
    }
}
