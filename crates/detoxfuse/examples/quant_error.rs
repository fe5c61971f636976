//! How far the quantized kernels move logits from exact arithmetic on the same weights:
//! max |logit - float64 reference| over the top-64 logits of the f32 fixtures' prompts.
//! `cargo run --release -p detoxfuse --example quant_error`
use detoxfuse::lm::{self, ids_tensor};

fn main() -> anyhow::Result<()> {
    let cache = detoxfuse::fetch::default_cache_dir();
    for name in ["smollm2", "gemma3"] {
        let spec = detoxfuse::fetch::spec(name)?;
        let m = lm::load(&detoxfuse::fetch::model_path(&cache, &spec))?;
        let p = format!(
            "{}/../../tests/fixtures/logits_f32_{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let fx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p)?)?;
        let mut worst = 0f32;
        let mut mean = 0f32;
        let mut count = 0;
        for c in fx["cases"].as_array().unwrap() {
            let ids: Vec<u32> = c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            let logits: Vec<f32> = m
                .forward_last_logits(&ids_tensor(&[ids])?, &mut m.new_cache())?
                .squeeze(0)?
                .to_vec1()?;
            for (i, w) in c["top_ids"]
                .as_array()
                .unwrap()
                .iter()
                .zip(c["top_logits"].as_array().unwrap())
            {
                let d = (logits[i.as_u64().unwrap() as usize] - w.as_f64().unwrap() as f32).abs();
                worst = worst.max(d);
                mean += d;
                count += 1;
            }
        }
        println!(
            "{name}: quantized kernels vs float64 reference: max {worst:.3}, mean {:.3}",
            mean / count as f32
        );
    }
    Ok(())
}
