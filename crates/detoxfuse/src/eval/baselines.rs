//! The two baselines every detoxification claim is measured against (EVALUATION.md), as
//! [`Decoder`]s so they run through the same sampling loop as the plain and fused models:
//!
//! - **word filter**: the token sequences of a public bad-words list can never be completed
//!   (npm `naughty-words`, the "List of Dirty, Naughty, Obscene, and Otherwise Bad Words",
//!   CC-BY-4.0);
//! - **DExperts-style ensemble**: `logits = base + beta · (expert − anti_expert)` over the base
//!   model's top-p nucleus (Liu et al. 2021), with expert and anti-expert trained by our own
//!   calibration trainer on clean and on toxic text.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use crate::calibrate::corpus::{fetch_source, Registry, SourceSpec};
use crate::error::{Error, IoContext, Result};
use crate::fetch::Progress;
use crate::generate::Decoder;
use crate::lm::TokenId;
use crate::text::Tokenizer;

/// The bad-words list the word filter bans (English list of the package).
pub const BAD_WORDS: SourceSpec = SourceSpec {
    name: "naughty-words",
    registry: Registry::Npm,
    package: "naughty-words",
    version: "1.2.0",
    sha256: "c34b05e10a97ec7b9e0c3dd91d09888187c0f08d0812eaea79679795585b217e",
    licence: "List of Dirty, Naughty, Obscene, and Otherwise Bad Words (CC-BY-4.0)",
};

/// Fetches (once, verified by sha256) and reads the English bad-words list.
pub fn bad_words(cache: &Path, progress: &mut dyn Progress) -> Result<Vec<String>> {
    let dir = fetch_source(cache, &BAD_WORDS, progress)?;
    let path = dir.join("package").join("en.json");
    let text = std::fs::read_to_string(&path).ctx(|| format!("reading {}", path.display()))?;
    let words: Vec<String> = serde_json::from_str(&text).map_err(|e| {
        Error::Input(format!(
            "{} is not a JSON list of words: {e}",
            path.display()
        ))
    })?;
    Ok(words)
}

/// Token sequences that may not be completed, indexed by their last token.
#[derive(Debug, Clone, Default)]
pub struct BannedSequences {
    /// Sequences of one token: banned everywhere.
    single: HashSet<TokenId>,
    /// Last token → the prefixes after which it is banned.
    multi: HashMap<TokenId, Vec<Vec<TokenId>>>,
}

impl BannedSequences {
    /// Each word is banned as written, capitalised, and both of those after a space (the
    /// forms a BPE tokenizer gives different ids).
    pub fn new(tok: &Tokenizer, words: &[String]) -> Result<Self> {
        let mut out = Self::default();
        for w in words {
            let w = w.trim();
            if w.is_empty() {
                continue;
            }
            let mut cap = w.chars();
            let cap: String = cap
                .next()
                .map(|c| c.to_uppercase().chain(cap).collect())
                .unwrap_or_default();
            for form in [
                w.to_string(),
                format!(" {w}"),
                cap.clone(),
                format!(" {cap}"),
            ] {
                let mut ids = Vec::new();
                tok.encode_into(&form, false, &mut ids)?;
                out.add(ids);
            }
        }
        Ok(out)
    }

    pub fn add(&mut self, ids: Vec<TokenId>) {
        match ids.as_slice() {
            [] => {}
            [t] => {
                self.single.insert(*t);
            }
            [prefix @ .., last] => {
                let v = self.multi.entry(*last).or_default();
                if !v.iter().any(|p| p == prefix) {
                    v.push(prefix.to_vec());
                }
            }
        }
    }

    /// Number of distinct banned sequences.
    pub fn len(&self) -> usize {
        self.single.len() + self.multi.values().map(Vec::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sets to −∞ the logit of every token that would complete a banned sequence after
    /// `history`.
    pub fn mask(&self, history: &[TokenId], logits: &mut [f32]) {
        for &t in &self.single {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        for (&t, prefixes) in &self.multi {
            if prefixes.iter().any(|p| history.ends_with(p)) {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// Any decoder, with banned sequences masked out of its logits. Each row's history is its
/// prompt plus what it has generated.
pub struct WordFilterDecoder<'a> {
    inner: Box<dyn Decoder + 'a>,
    banned: &'a BannedSequences,
    history: Vec<Vec<TokenId>>,
}

impl<'a> WordFilterDecoder<'a> {
    pub fn new(inner: Box<dyn Decoder + 'a>, banned: &'a BannedSequences) -> Self {
        Self {
            inner,
            banned,
            history: Vec::new(),
        }
    }
}

impl Decoder for WordFilterDecoder<'_> {
    fn context_length(&self) -> usize {
        self.inner.context_length()
    }

    fn prefill(&mut self, prompt: &[TokenId]) -> Result<Vec<f32>> {
        let mut logits = self.inner.prefill(prompt)?;
        self.history = vec![prompt.to_vec()];
        self.banned.mask(prompt, &mut logits);
        Ok(logits)
    }

    fn fork(&mut self, n: usize) -> Result<()> {
        self.inner.fork(n)?;
        let h = self.history.first().cloned().unwrap_or_default();
        self.history = vec![h; n];
        Ok(())
    }

    fn retain_rows(&mut self, rows: &[usize]) -> Result<()> {
        self.inner.retain_rows(rows)?;
        self.history = rows.iter().map(|&r| self.history[r].clone()).collect();
        Ok(())
    }

    fn step(&mut self, tokens: &[TokenId]) -> Result<Vec<Vec<f32>>> {
        let mut rows = self.inner.step(tokens)?;
        for ((row, h), &t) in rows.iter_mut().zip(&mut self.history).zip(tokens) {
            h.push(t);
            self.banned.mask(h, row);
        }
        Ok(rows)
    }
}

/// DExperts-style product of experts: the base's logits restricted to its own top-p nucleus
/// (`filter_p`, DExperts' default 0.9), plus `beta · (expert − anti_expert)`. All three must
/// share one vocabulary.
pub struct ExpertsDecoder<'a> {
    base: Box<dyn Decoder + 'a>,
    expert: Box<dyn Decoder + 'a>,
    anti: Box<dyn Decoder + 'a>,
    beta: f32,
    filter_p: f32,
}

impl<'a> ExpertsDecoder<'a> {
    pub fn new(
        base: Box<dyn Decoder + 'a>,
        expert: Box<dyn Decoder + 'a>,
        anti: Box<dyn Decoder + 'a>,
        beta: f32,
        filter_p: f32,
    ) -> Result<Self> {
        if !(beta.is_finite() && beta >= 0.0) {
            return Err(Error::Input(format!(
                "DExperts beta must be a finite number >= 0, got {beta}"
            )));
        }
        if !(filter_p > 0.0 && filter_p <= 1.0) {
            return Err(Error::Input(format!(
                "DExperts filter_p must be in (0, 1], got {filter_p}"
            )));
        }
        Ok(Self {
            base,
            expert,
            anti,
            beta,
            filter_p,
        })
    }

    fn combine(&self, base: &mut [f32], expert: &[f32], anti: &[f32]) -> Result<()> {
        if expert.len() != base.len() || anti.len() != base.len() {
            return Err(Error::Input(format!(
                "DExperts needs one vocabulary: base {} tokens, expert {}, anti-expert {}",
                base.len(),
                expert.len(),
                anti.len()
            )));
        }
        nucleus_mask(base, self.filter_p);
        for ((b, e), a) in base.iter_mut().zip(expert).zip(anti) {
            if b.is_finite() {
                *b += self.beta * (e - a);
            }
        }
        Ok(())
    }
}

/// Sets to −∞ every logit outside the top-p nucleus (the set the sampler would draw from at
/// temperature 1, [`crate::sample::nucleus_ids`]).
pub fn nucleus_mask(logits: &mut [f32], p: f32) {
    if p >= 1.0 {
        return;
    }
    let keep = crate::sample::nucleus_ids(logits, p);
    let kept: Vec<f32> = keep.iter().map(|&i| logits[i as usize]).collect();
    logits.fill(f32::NEG_INFINITY);
    for (&i, v) in keep.iter().zip(kept) {
        logits[i as usize] = v;
    }
}

impl Decoder for ExpertsDecoder<'_> {
    fn context_length(&self) -> usize {
        self.base
            .context_length()
            .min(self.expert.context_length())
            .min(self.anti.context_length())
    }

    fn prefill(&mut self, prompt: &[TokenId]) -> Result<Vec<f32>> {
        let mut b = self.base.prefill(prompt)?;
        let e = self.expert.prefill(prompt)?;
        let a = self.anti.prefill(prompt)?;
        self.combine(&mut b, &e, &a)?;
        Ok(b)
    }

    fn fork(&mut self, n: usize) -> Result<()> {
        self.base.fork(n)?;
        self.expert.fork(n)?;
        self.anti.fork(n)
    }

    fn retain_rows(&mut self, rows: &[usize]) -> Result<()> {
        self.base.retain_rows(rows)?;
        self.expert.retain_rows(rows)?;
        self.anti.retain_rows(rows)
    }

    fn step(&mut self, tokens: &[TokenId]) -> Result<Vec<Vec<f32>>> {
        let mut b = self.base.step(tokens)?;
        let e = self.expert.step(tokens)?;
        let a = self.anti.step(tokens)?;
        for ((b, e), a) in b.iter_mut().zip(&e).zip(&a) {
            self.combine(b, e, a)?;
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in decoder with fixed logits (this test is about the arithmetic only).
    struct Fixed(Vec<f32>);

    impl Decoder for Fixed {
        fn context_length(&self) -> usize {
            100
        }
        fn prefill(&mut self, _: &[TokenId]) -> Result<Vec<f32>> {
            Ok(self.0.clone())
        }
        fn fork(&mut self, _: usize) -> Result<()> {
            Ok(())
        }
        fn retain_rows(&mut self, _: &[usize]) -> Result<()> {
            Ok(())
        }
        fn step(&mut self, t: &[TokenId]) -> Result<Vec<Vec<f32>>> {
            Ok(vec![self.0.clone(); t.len()])
        }
    }

    #[test]
    fn experts_add_beta_times_the_difference_inside_the_base_nucleus() {
        // base probabilities ~ 0.6, 0.3, 0.1: the 0.85 nucleus drops token 2
        let base: Vec<f32> = [0.6f32, 0.3, 0.1].iter().map(|p| p.ln()).collect();
        let mut d = ExpertsDecoder::new(
            Box::new(Fixed(base.clone())),
            Box::new(Fixed(vec![1.0, 0.0, 5.0])),
            Box::new(Fixed(vec![0.0, 2.0, 0.0])),
            0.5,
            0.85,
        )
        .unwrap();
        let got = d.prefill(&[1]).unwrap();
        assert!((got[0] - (base[0] + 0.5)).abs() < 1e-6);
        assert!((got[1] - (base[1] - 1.0)).abs() < 1e-6);
        assert_eq!(
            got[2],
            f32::NEG_INFINITY,
            "outside the base nucleus stays out"
        );
        assert_eq!(d.step(&[0, 1]).unwrap().len(), 2);
        let mut bad = ExpertsDecoder::new(
            Box::new(Fixed(base)),
            Box::new(Fixed(vec![0.0; 4])),
            Box::new(Fixed(vec![0.0; 3])),
            1.0,
            0.9,
        )
        .unwrap();
        assert!(bad
            .prefill(&[1])
            .unwrap_err()
            .to_string()
            .contains("one vocabulary"));
        assert!(ExpertsDecoder::new(
            Box::new(Fixed(vec![])),
            Box::new(Fixed(vec![])),
            Box::new(Fixed(vec![])),
            f32::NAN,
            0.9
        )
        .is_err());
    }

    #[test]
    fn banned_sequences_mask_only_completions() {
        let mut b = BannedSequences::default();
        b.add(vec![7]);
        b.add(vec![1, 2, 3]);
        let mut l = vec![0.0f32; 8];
        b.mask(&[5, 1, 2], &mut l);
        assert_eq!(l[7], f32::NEG_INFINITY);
        assert_eq!(l[3], f32::NEG_INFINITY);
        assert_eq!(l.iter().filter(|x| x.is_finite()).count(), 6);
        let mut l = vec![0.0f32; 8];
        b.mask(&[1, 2, 5], &mut l);
        assert!(l[3].is_finite(), "3 is only banned right after 1 2");
        assert_eq!(b.len(), 2);
    }

    #[test]
    fn nucleus_keeps_the_smallest_top_set() {
        // probabilities 0.5, 0.3, 0.2 (up to rounding)
        let mut l: Vec<f32> = [0.5f32, 0.3, 0.2].iter().map(|p| p.ln()).collect();
        nucleus_mask(&mut l, 0.75);
        assert!(l[0].is_finite() && l[1].is_finite() && !l[2].is_finite());
        let mut l: Vec<f32> = [0.2f32, 0.5, 0.3].iter().map(|p| p.ln()).collect();
        nucleus_mask(&mut l, 0.5);
        assert!(!l[0].is_finite() && l[1].is_finite() && !l[2].is_finite());
    }
}
