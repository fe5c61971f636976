//! Where a batched decode step's time goes: k = 25 rows of SmolLM2 after a 24-token prompt
//! (the evaluation's shape), timing the forward (`Decoder::step`) and the sampling apart.
//! For profiling: `perf record -g cargo run --release -p detoxfuse --example batched_profile`.
use detoxfuse::generate::{Decoder, PlainDecoder};
use detoxfuse::sample::{sample_rows, Sampler, SamplingParams};
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let path = detoxfuse::fetch::default_cache_dir()
        .join("models")
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let steps: usize = std::env::args().nth(1).map_or(Ok(200), |s| s.parse())?;
    let lm = detoxfuse::lm::load(&path)?;
    let mut dec = PlainDecoder::new(lm.as_ref());
    let prompt = detoxfuse::bench::synthetic_prompt(24, 32_000, Some(1));
    let params = SamplingParams {
        top_p: 0.9,
        seed: 1,
        ..Default::default()
    };
    let (mut fwd, mut samp, mut tokens) = (Duration::ZERO, Duration::ZERO, 0);
    let t0 = Instant::now();
    while tokens < steps * 25 {
        let first = dec.prefill(&prompt)?;
        dec.fork(25)?;
        let mut samplers: Vec<Sampler> = (0..25).map(|i| Sampler::new(&params, i)).collect();
        let mut rows = vec![first; 25];
        for _ in 0..20 {
            let t = Instant::now();
            let toks = sample_rows(&mut samplers.iter_mut().collect::<Vec<_>>(), &rows);
            samp += t.elapsed();
            let t = Instant::now();
            rows = dec.step(&toks)?;
            fwd += t.elapsed();
            tokens += 25;
        }
    }
    let n = (tokens / 25) as f64;
    println!(
        "{tokens} tokens in {:.2} s: {:.1} t/s; per step: forward {:.2} ms, sampling {:.2} ms",
        t0.elapsed().as_secs_f64(),
        tokens as f64 / t0.elapsed().as_secs_f64(),
        fwd.as_secs_f64() * 1e3 / n,
        samp.as_secs_f64() * 1e3 / n
    );
    Ok(())
}
