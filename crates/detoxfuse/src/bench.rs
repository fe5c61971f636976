//! Speed measurements: prompt processing and decoding, batch 1 and batched sampling.
//! Times are medians over runs; callers compare ratios measured in the same process.

use std::time::Instant;

use crate::error::Result;
use crate::generate::Decoder;
use crate::lm::TokenId;
use crate::sample::{sample_rows, Sampler, SamplingParams};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Speed {
    /// Prompt tokens per second (one forward over the whole prompt, batch 1).
    pub prompt_tps: f64,
    /// Generated tokens per second at batch 1.
    pub decode_tps: f64,
    /// Generated tokens per second over all rows when `batch` samples decode together.
    pub batched_tps: f64,
    pub batch: usize,
}

/// The middle value (upper middle for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Deterministic prompt of `n` tokens cycling through ordinary ids.
pub fn synthetic_prompt(n: usize, vocab: usize, first: Option<TokenId>) -> Vec<TokenId> {
    let mut p: Vec<TokenId> = first.into_iter().collect();
    let mut x: u64 = 12345;
    while p.len() < n {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        // stay in the lower part of the vocabulary, away from special tokens at the end
        p.push(1000 + ((x >> 33) as usize % (vocab / 2).max(1)) as TokenId);
    }
    p
}

/// Measures one decoder; `runs` repetitions of each phase, medians reported.
pub fn measure(
    dec: &mut dyn Decoder,
    prompt: &[TokenId],
    decode_tokens: usize,
    batch: usize,
    runs: usize,
) -> Result<Speed> {
    let mut prompt_t = Vec::new();
    let mut decode_t = Vec::new();
    let mut batched_t = Vec::new();
    let params = SamplingParams {
        top_p: 0.9,
        seed: 1,
        ..Default::default()
    };
    for _ in 0..runs.max(1) {
        let t0 = Instant::now();
        let mut logits = dec.prefill(prompt)?;
        prompt_t.push(prompt.len() as f64 / t0.elapsed().as_secs_f64());

        let mut s = Sampler::new(&SamplingParams::greedy(), 0);
        let t0 = Instant::now();
        for _ in 0..decode_tokens {
            let t = s.sample(&logits);
            logits = dec.step(&[t])?.remove(0);
        }
        decode_t.push(decode_tokens as f64 / t0.elapsed().as_secs_f64());

        let first = dec.prefill(prompt)?;
        let mut samplers: Vec<Sampler> = (0..batch)
            .map(|i| Sampler::new(&params, i as u64))
            .collect();
        let t0 = Instant::now();
        dec.fork(batch)?;
        let mut rows = vec![first; batch];
        for _ in 0..decode_tokens {
            let toks = sample_rows(&mut samplers.iter_mut().collect::<Vec<_>>(), &rows);
            rows = dec.step(&toks)?;
        }
        batched_t.push((batch * decode_tokens) as f64 / t0.elapsed().as_secs_f64());
    }
    Ok(Speed {
        prompt_tps: median(prompt_t),
        decode_tps: median(decode_t),
        batched_tps: median(batched_t),
        batch,
    })
}
