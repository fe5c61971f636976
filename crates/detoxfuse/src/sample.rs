//! Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus), seeded.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::lm::TokenId;

/// How to pick tokens. `temperature == 0` means greedy (argmax).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(default)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1 = off).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Input(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Input(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// One sequence's sampler. Sample `i` of a request seeds its own generator from `(seed, i)`,
/// so a sample's tokens do not depend on how many others run beside it.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    scratch: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(params: &SamplingParams, index: u64) -> Self {
        let seed = params.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Self {
            params: params.clone(),
            rng: StdRng::seed_from_u64(seed),
            scratch: Vec::new(),
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> TokenId {
        if self.params.temperature == 0.0 || self.params.top_k == 1 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let cands = &mut self.scratch;
        cands.clear();
        // Tokens more than 30 nats below the best have weight < e^-30 each: over even a 262k
        // vocabulary that is < 3e-8 of the total, below f32 resolution of the sums here. Leaving
        // them out spares their exp and shrinks the nucleus search to a few thousand entries.
        const NEGLIGIBLE: f32 = -30.0;
        cands.extend(logits.iter().enumerate().filter_map(|(i, &l)| {
            let z = (l - max) * inv_t;
            (z > NEGLIGIBLE).then(|| (z.exp(), i as u32))
        }));
        let by_prob = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if self.params.top_k > 0 && self.params.top_k < cands.len() {
            let keep = self.params.top_k;
            cands.select_nth_unstable_by(keep - 1, by_prob);
            cands.truncate(keep);
        }
        let kept_total: f32 = cands.iter().map(|c| c.0).sum();
        if self.params.top_p < 1.0 {
            // The nucleus is usually a few hundred tokens: sort a growing head of the
            // candidates instead of the whole vocabulary.
            let target = self.params.top_p * kept_total;
            let mut head = 256.min(cands.len());
            loop {
                if head < cands.len() {
                    cands.select_nth_unstable_by(head - 1, by_prob);
                }
                cands[..head].sort_unstable_by(by_prob);
                let mut acc = 0.0;
                let cut = cands[..head].iter().position(|c| {
                    acc += c.0;
                    acc >= target
                });
                match cut {
                    Some(i) => {
                        cands.truncate(i + 1);
                        break;
                    }
                    None if head == cands.len() => break,
                    None => head = (head * 4).min(cands.len()),
                }
            }
        }
        let sum: f32 = cands.iter().map(|c| c.0).sum();
        let mut r = self.rng.random::<f32>() * sum;
        for c in cands.iter() {
            r -= c.0;
            if r <= 0.0 {
                return c.1;
            }
        }
        cands.last().map_or(0, |c| c.1)
    }
}

/// Samples one token per row, `samplers[i]` drawing from `logits[i]`. Rows are split over the
/// cores: with k samples over a 49k–262k vocabulary the softmax and nucleus selection cost as
/// much as a quarter of a batched decoding step, and the matmul thread pool is idle meanwhile.
pub fn sample_rows(samplers: &mut [&mut Sampler], logits: &[Vec<f32>]) -> Vec<TokenId> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if samplers.len() < 4 || threads == 1 {
        return samplers
            .iter_mut()
            .zip(logits)
            .map(|(s, l)| s.sample(l))
            .collect();
    }
    let chunk = samplers.len().div_ceil(threads);
    let mut out = vec![0; samplers.len()];
    std::thread::scope(|scope| {
        for ((ss, ls), os) in samplers
            .chunks_mut(chunk)
            .zip(logits.chunks(chunk))
            .zip(out.chunks_mut(chunk))
        {
            scope.spawn(move || {
                for ((s, l), o) in ss.iter_mut().zip(ls).zip(os.iter_mut()) {
                    *o = s.sample(l);
                }
            });
        }
    });
    out
}

/// Index of the largest logit; the first one on ties.
pub fn argmax(logits: &[f32]) -> TokenId {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as TokenId
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
        let mut s = Sampler::new(&SamplingParams::greedy(), 0);
        assert_eq!(s.sample(&[0.0, 1.0, 5.0]), 2);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // probabilities ~ [0.665, 0.245, 0.09]: p = 0.6 keeps only token 0
        let logits = [2.0f32, 1.0, 0.0];
        let p = SamplingParams {
            top_p: 0.6,
            seed: 7,
            ..Default::default()
        };
        let mut s = Sampler::new(&p, 0);
        assert!((0..200).all(|_| s.sample(&logits) == 0));
        // p = 0.9 keeps tokens 0 and 1, never 2
        let p = SamplingParams {
            top_p: 0.9,
            seed: 7,
            ..Default::default()
        };
        let mut s = Sampler::new(&p, 0);
        let draws: Vec<_> = (0..400).map(|_| s.sample(&logits)).collect();
        assert!(draws.contains(&0) && draws.contains(&1) && !draws.contains(&2));
    }

    #[test]
    fn top_k_limits_candidates() {
        let logits = [0.0f32, 0.1, 0.2, 0.3];
        let p = SamplingParams {
            top_k: 2,
            seed: 1,
            ..Default::default()
        };
        let mut s = Sampler::new(&p, 0);
        assert!((0..200).map(|_| s.sample(&logits)).all(|t| t >= 2));
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 10.0).collect();
        let p = SamplingParams {
            top_p: 0.9,
            seed: 42,
            ..Default::default()
        };
        let a: Vec<_> = {
            let mut s = Sampler::new(&p, 3);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<_> = {
            let mut s = Sampler::new(&p, 3);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let c: Vec<_> = {
            let mut s = Sampler::new(&p, 4);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
