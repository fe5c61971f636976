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
    bins: Vec<f32>,
    exps: Exps,
}

/// Scratch of [`weights`]: scaled logits and their exponentials.
#[derive(Default)]
struct Exps {
    z: Vec<f32>,
    w: Vec<f32>,
}

impl Sampler {
    pub fn new(params: &SamplingParams, index: u64) -> Self {
        let seed = params.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Self {
            params: params.clone(),
            rng: StdRng::seed_from_u64(seed),
            scratch: Vec::new(),
            bins: Vec::new(),
            exps: Exps::default(),
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> TokenId {
        if self.params.temperature == 0.0 || self.params.top_k == 1 {
            return argmax(logits);
        }
        let cands = &mut self.scratch;
        weights(logits, 1.0 / self.params.temperature, cands, &mut self.exps);
        let by_prob = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if self.params.top_k > 0 && self.params.top_k < cands.len() {
            let keep = self.params.top_k;
            cands.select_nth_unstable_by(keep - 1, by_prob);
            cands.truncate(keep);
        }
        let kept_total: f32 = cands.iter().map(|c| c.0).sum();
        if self.params.top_p < 1.0 {
            nucleus(cands, self.params.top_p * kept_total, &mut self.bins);
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

/// Token ids of the top-p nucleus of `logits` at temperature 1: the smallest set of most
/// probable tokens (ties: lower id first) whose probability reaches `p`; the set the sampler
/// draws from, in O(vocabulary).
pub fn nucleus_ids(logits: &[f32], p: f32) -> Vec<TokenId> {
    let mut cands = Vec::new();
    weights(logits, 1.0, &mut cands, &mut Exps::default());
    let total: f32 = cands.iter().map(|c| c.0).sum();
    nucleus(&mut cands, p * total, &mut Vec::new());
    cands.into_iter().map(|c| c.1).collect()
}

/// Unnormalised weights `exp((l − max)·inv_t)` with their ids, into `out`. Tokens more than
/// 30 nats below the best have weight < e^-30 each: over even a 262k vocabulary that is < 3e-8
/// of the total, below f32 resolution of the sums here. Leaving them out spares their exp and
/// shrinks the nucleus search to a few thousand entries.
///
/// The exponentials are computed for every token in one vectorized pass ([`crate::expf::expf_into`],
/// glibc's `expf` bit for bit) and those of the negligible tokens are discarded.
fn weights(logits: &[f32], inv_t: f32, out: &mut Vec<(f32, u32)>, e: &mut Exps) {
    const NEGLIGIBLE: f32 = -30.0;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    e.z.clear();
    e.z.extend(logits.iter().map(|&l| (l - max) * inv_t));
    e.w.resize(e.z.len(), 0.0);
    crate::expf::expf_into(&e.z, &mut e.w);
    out.clear();
    out.extend(
        e.z.iter()
            .zip(&e.w)
            .enumerate()
            .filter(|(_, (&z, _))| z > NEGLIGIBLE)
            .map(|(i, (_, &w))| (w, i as u32)),
    );
}

/// Number of probability bins for the nucleus search (see [`nucleus`]).
const BINS: usize = 1 << 14;

/// Bin of a weight in (0, 1]: positive f32 bit patterns order like their values, so
/// `(bits(1.0) - bits(w)) >> 15` is 0 for the largest weights and grows as they shrink, with
/// 256 bins per power of two.
fn bin_of(w: f32) -> usize {
    ((0x3F80_0000u32.saturating_sub(w.to_bits()) >> 15) as usize).min(BINS - 1)
}

/// Keeps the nucleus: the smallest set of most probable candidates (ties: lower id first)
/// whose weight reaches `target`. Bins by probability in one pass, finds the bin where the
/// cumulative weight crosses `target`, and sorts only that bin; the result is the same set a
/// full sort would give, in O(vocabulary).
fn nucleus(cands: &mut Vec<(f32, u32)>, target: f32, mass: &mut Vec<f32>) {
    mass.clear();
    mass.resize(BINS, 0.0);
    for c in cands.iter() {
        mass[bin_of(c.0)] += c.0;
    }
    let mut acc = 0f32;
    let mut cross = BINS - 1;
    for (b, &m) in mass.iter().enumerate() {
        if acc + m >= target {
            cross = b;
            break;
        }
        acc += m;
    }
    let mut edge: Vec<(f32, u32)> = Vec::new();
    cands.retain(|c| {
        let b = bin_of(c.0);
        if b == cross {
            edge.push(*c);
        }
        b < cross
    });
    edge.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    for c in edge {
        cands.push(c);
        acc += c.0;
        if acc >= target {
            break;
        }
    }
}

/// Samples one token per row, `samplers[i]` drawing from `logits[i]`. Rows are spread over
/// candle's worker pool: with k samples over a 49k–262k vocabulary the softmax and nucleus
/// selection cost as much as a sixth of a batched decoding step, and threads of our own would
/// compete for the cores with the pool's workers, which spin a while after each matmul.
pub fn sample_rows(samplers: &mut [&mut Sampler], logits: &[Vec<f32>]) -> Vec<TokenId> {
    assert_eq!(samplers.len(), logits.len(), "one sampler per row");
    let mut out = vec![0; samplers.len()];
    if samplers.len() < 4 {
        for ((s, l), o) in samplers.iter_mut().zip(logits).zip(out.iter_mut()) {
            *o = s.sample(l);
        }
        return out;
    }
    let (s_addr, o_addr) = (samplers.as_mut_ptr() as usize, out.as_mut_ptr() as usize);
    candle_core::utils::barrier_pool().execute_chunked(samplers.len(), |rows| {
        for i in rows {
            // SAFETY: each row index is handed to exactly one worker, which alone touches
            // `samplers[i]` and `out[i]`; both slices outlive this call.
            unsafe {
                let s = &mut *(*(s_addr as *mut &mut Sampler).add(i));
                *(o_addr as *mut TokenId).add(i) = s.sample(&logits[i]);
            }
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

/// FNV-1a: a hash that is the same on every platform and release.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
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
    fn binned_nucleus_equals_the_sorted_prefix() {
        let mut x: u64 = 99;
        for trial in 0..50 {
            let n = 5000;
            let mut cands: Vec<(f32, u32)> = (0..n)
                .map(|i| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let z = -((x >> 40) as f32 / (1u64 << 24) as f32) * 12.0; // weights e^0..e^-12
                                                                              // some exact ties
                    let z = if i % 7 == 0 { -3.0 } else { z };
                    (z.exp(), i as u32)
                })
                .collect();
            let total: f32 = cands.iter().map(|c| c.0).sum();
            let p = 0.05 + 0.9 * (trial as f32 / 50.0);
            let mut sorted = cands.clone();
            sorted.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let mut acc = 0.0;
            let k = sorted
                .iter()
                .position(|c| {
                    acc += c.0;
                    acc >= p * total
                })
                .unwrap()
                + 1;
            let want: std::collections::HashSet<u32> = sorted[..k].iter().map(|c| c.1).collect();
            nucleus(&mut cands, p * total, &mut Vec::new());
            let got: std::collections::HashSet<u32> = cands.iter().map(|c| c.1).collect();
            // f32 summation order may move the cut by the one token that straddles the target
            let differ = got.symmetric_difference(&want).count();
            assert!(
                differ <= 1,
                "p={p}: {differ} tokens differ ({} vs {})",
                got.len(),
                want.len()
            );
        }
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
