//! Where a calibration training step spends its time (SmolLM2 base, 3 layers, 16 × 256 tokens).
//! `cargo run --release -p detoxfuse --example train_profile`

use std::time::Instant;

use candle_core::DType;
use detoxfuse::calibrate::model::{head_cross_entropy, CalibrationModel, Objective, Trainable};
use detoxfuse::lm::export::hf_llama_from_gguf;

fn main() -> anyhow::Result<()> {
    let path = detoxfuse::fetch::model_path(
        &detoxfuse::fetch::default_cache_dir(),
        &detoxfuse::fetch::SMOLLM2,
    );
    let base = hf_llama_from_gguf(&path, Some(3))?;
    let m = CalibrationModel::from_base(&base, 3, Trainable::default(), DType::F32)?;
    let (rows, len): (usize, usize) = std::env::var("SHAPE")
        .ok()
        .and_then(|s| {
            let (a, b) = s.split_once("x")?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .unwrap_or((16, 256));
    let batch = detoxfuse::calibrate::bench::synthetic_batch(rows, len)?;
    for _ in 0..6 {
        let t = Instant::now();
        let h = m.forward_hidden(&batch.ids)?;
        let t_fwd = t.elapsed().as_secs_f64();
        let hs = h
            .reshape((rows * len, 576))?
            .narrow(0, 0, batch.targets.len())?;
        let t = Instant::now();
        let (_, g) = head_cross_entropy(
            &hs.detach(),
            &m.get("model.embed_tokens.weight")?,
            &batch.targets[..],
            Objective::Likelihood,
            Some((1.0, false)),
        )?;
        let t_head = t.elapsed().as_secs_f64();
        let g = g.unwrap().hidden;
        let t = Instant::now();
        let _grads = (hs * g)?.sum_all()?.backward()?;
        let t_bwd = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let _ = m.loss_and_grads(&batch)?;
        let t_all = t.elapsed().as_secs_f64();
        println!(
            "tokens {}: forward {t_fwd:.2}s head+ce {t_head:.2}s body backward {t_bwd:.2}s | full step {t_all:.2}s = {:.0} tok/s",
            rows * len,
            (rows * len) as f64 / t_all
        );
    }
    Ok(())
}
