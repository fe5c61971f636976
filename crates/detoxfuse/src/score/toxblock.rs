//! The second judge: a port of PyPI `tox-block==0.1.2` (MIT), a bidirectional LSTM trained on
//! the Jigsaw Toxic Comment Classification data.
//!
//! The default scorer ([`super::ProfanityCheck`]) is lexical: TF-IDF over words and a linear
//! SVM. A fused model that only learned to avoid the words it weighs would look detoxified to
//! it; a judge that reads words in order, through learned embeddings, is a second opinion
//! on the same text. Its pipeline, as the package runs it on Keras:
//!
//! 1. Keras' `Tokenizer`: lowercase, replace each character of `filters` with a space, split
//!    on spaces, keep the words whose index is below 20,000 (`num_words`); unknown words are
//!    dropped.
//! 2. `pad_sequences(maxlen = 100)`: the last 100 ids, zeros in front.
//! 3. Embedding(20000, 50) → Bidirectional(LSTM(50), every step's output; gates
//!    `hard_sigmoid` = clip(0.2·x + 0.5, 0, 1)) → max over time → Dense(50, relu) →
//!    Dense(6, sigmoid).
//!
//! The toxicity is the `toxic` probability (the data set's label for rude, disrespectful or
//! unreasonable comments; Jigsaw, who released it, also runs Perspective). The package refuses an empty text; here it is scored like any text
//! without known words, as all padding, which is what the model computes for it.
//!
//! Weights and vocabulary ship in `assets/tox_block_0.1.2.*`, exported from the package by
//! `scripts/export_toxblock_model.py`; `tests/fixtures/tox_block.json` holds the package's
//! own predictions, which the test below matches.

use std::collections::HashMap;
use std::sync::OnceLock;

use crate::error::{Error, Result};

const WEIGHTS: &[u8] = include_bytes!("../../../../assets/tox_block_0.1.2.safetensors");
const VOCAB: &str = include_str!("../../../../assets/tox_block_0.1.2.vocab.json");

/// LSTM units per direction.
const UNITS: usize = 50;
/// Gate pre-activations per step: input, forget, cell, output (Keras' order).
const GATES: usize = 4 * UNITS;
/// The classes of the output layer, in order.
pub const CLASSES: [&str; 6] = [
    "toxic",
    "severe_toxic",
    "obscene",
    "threat",
    "insult",
    "identity_hate",
];

#[derive(serde::Deserialize)]
struct Vocab {
    filters: String,
    split: String,
    lower: bool,
    num_words: usize,
    max_sequence_length: usize,
    classes: Vec<String>,
    /// Words with ids 1, 2, … in order.
    words: Vec<String>,
}

/// One direction of the LSTM.
struct Direction {
    /// `[word id][gate]`: the word's embedding times the input kernel, plus the bias.
    input: Vec<f32>,
    /// `[unit][gate]`.
    recurrent: Vec<f32>,
}

pub struct ToxBlock {
    index: HashMap<String, usize>,
    filters: Vec<char>,
    split: char,
    lower: bool,
    max_len: usize,
    forward: Direction,
    backward: Direction,
    /// `[2·UNITS][UNITS]`, then `[UNITS]`.
    dense_w: Vec<f32>,
    dense_b: Vec<f32>,
    /// `[UNITS][6]`, then `[6]`.
    out_w: Vec<f32>,
    out_b: Vec<f32>,
}

fn hard_sigmoid(x: f32) -> f32 {
    (0.2 * x + 0.5).clamp(0.0, 1.0)
}

impl ToxBlock {
    /// The shipped model (loaded once per process).
    pub fn shared() -> &'static ToxBlock {
        static MODEL: OnceLock<ToxBlock> = OnceLock::new();
        MODEL.get_or_init(|| Self::load(WEIGHTS, VOCAB).expect("the shipped tox-block model loads"))
    }

    /// Reads the exported weights (safetensors, f32) and vocabulary (JSON).
    pub fn load(weights: &[u8], vocab: &str) -> Result<Self> {
        let v: Vocab = serde_json::from_str(vocab)
            .map_err(|e| Error::Input(format!("tox-block vocabulary: {e}")))?;
        let split = single_char(&v.split)?;
        if v.words.len() + 1 != v.num_words || v.classes != CLASSES {
            return Err(Error::Input(format!(
                "tox-block vocabulary: {} words for num_words {}, classes {:?}",
                v.words.len(),
                v.num_words,
                v.classes
            )));
        }
        let tensors = candle_core::safetensors::load_buffer(weights, &candle_core::Device::Cpu)?;
        let get = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let t = tensors
                .get(name)
                .ok_or_else(|| Error::Input(format!("tox-block weights: no tensor {name}")))?;
            if t.dims() != shape {
                return Err(Error::Input(format!(
                    "tox-block weights: {name} is {:?}, expected {shape:?}",
                    t.dims()
                )));
            }
            Ok(t.flatten_all()?.to_vec1::<f32>()?)
        };
        let embedding = get("embedding", &[v.num_words, UNITS])?;
        let direction = |d: &str| -> Result<Direction> {
            let kernel = get(&format!("{d}.kernel"), &[UNITS, GATES])?;
            let bias = get(&format!("{d}.bias"), &[GATES])?;
            let mut input = Vec::with_capacity(v.num_words * GATES);
            for e in embedding.chunks_exact(UNITS) {
                let mut z = bias.clone();
                for (x, row) in e.iter().zip(kernel.chunks_exact(GATES)) {
                    for (z, w) in z.iter_mut().zip(row) {
                        *z += x * w;
                    }
                }
                input.extend_from_slice(&z);
            }
            Ok(Direction {
                input,
                recurrent: get(&format!("{d}.recurrent_kernel"), &[UNITS, GATES])?,
            })
        };
        Ok(Self {
            index: v
                .words
                .iter()
                .enumerate()
                .map(|(i, w)| (w.clone(), i + 1))
                .collect(),
            filters: v.filters.chars().collect(),
            split,
            lower: v.lower,
            max_len: v.max_sequence_length,
            forward: direction("forward")?,
            backward: direction("backward")?,
            dense_w: get("dense.kernel", &[2 * UNITS, UNITS])?,
            dense_b: get("dense.bias", &[UNITS])?,
            out_w: get("out.kernel", &[UNITS, CLASSES.len()])?,
            out_b: get("out.bias", &[CLASSES.len()])?,
        })
    }

    /// The model's input: Keras' `texts_to_sequences` then `pad_sequences` (pre).
    pub fn ids(&self, text: &str) -> Vec<usize> {
        let lowered;
        let text = if self.lower {
            lowered = text.to_lowercase();
            &lowered
        } else {
            text
        };
        let mapped: String = text
            .chars()
            .map(|c| {
                if self.filters.contains(&c) {
                    self.split
                } else {
                    c
                }
            })
            .collect();
        let words: Vec<usize> = mapped
            .split(self.split)
            .filter(|w| !w.is_empty())
            .filter_map(|w| self.index.get(w).copied())
            .collect();
        let kept = &words[words.len().saturating_sub(self.max_len)..];
        let mut ids = vec![0; self.max_len - kept.len()];
        ids.extend_from_slice(kept);
        ids
    }

    /// The six class probabilities of `text`, in [`CLASSES`] order.
    pub fn probabilities(&self, text: &str) -> [f64; 6] {
        let ids = self.ids(text);
        let mut pooled = [f32::NEG_INFINITY; 2 * UNITS];
        let (fw, bw) = pooled.split_at_mut(UNITS);
        run(&self.forward, ids.iter().copied(), fw);
        run(&self.backward, ids.iter().rev().copied(), bw);
        let mut hidden = self.dense_b.clone();
        for (x, row) in pooled.iter().zip(self.dense_w.chunks_exact(UNITS)) {
            for (h, w) in hidden.iter_mut().zip(row) {
                *h += x * w;
            }
        }
        let mut out = [0f64; 6];
        for (c, o) in out.iter_mut().enumerate() {
            let z = self.out_b[c]
                + hidden
                    .iter()
                    .enumerate()
                    .map(|(u, h)| h.max(0.0) * self.out_w[u * CLASSES.len() + c])
                    .sum::<f32>();
            *o = 1.0 / (1.0 + (-z as f64).exp());
        }
        out
    }
}

/// One LSTM direction over `ids`, folding each step's output into `pooled` (max over time).
fn run(d: &Direction, ids: impl Iterator<Item = usize>, pooled: &mut [f32]) {
    let (mut h, mut c) = ([0f32; UNITS], [0f32; UNITS]);
    let mut z = [0f32; GATES];
    for id in ids {
        z.copy_from_slice(&d.input[id * GATES..(id + 1) * GATES]);
        for (x, row) in h.iter().zip(d.recurrent.chunks_exact(GATES)) {
            for (z, w) in z.iter_mut().zip(row) {
                *z += x * w;
            }
        }
        for u in 0..UNITS {
            let i = hard_sigmoid(z[u]);
            let f = hard_sigmoid(z[UNITS + u]);
            let g = z[2 * UNITS + u].tanh();
            let o = hard_sigmoid(z[3 * UNITS + u]);
            c[u] = f * c[u] + i * g;
            h[u] = o * c[u].tanh();
            pooled[u] = pooled[u].max(h[u]);
        }
    }
}

fn single_char(s: &str) -> Result<char> {
    let mut it = s.chars();
    match (it.next(), it.next()) {
        (Some(c), None) => Ok(c),
        _ => Err(Error::Input(format!(
            "tox-block vocabulary: split {s:?} is not one character"
        ))),
    }
}

impl super::ToxicityScorer for ToxBlock {
    fn name(&self) -> &str {
        "tox-block-0.1.2"
    }

    fn score(&self, texts: &[&str]) -> Vec<f64> {
        texts.iter().map(|t| self.probabilities(t)[0]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keras_tokenizer_rules() {
        let m = ToxBlock::shared();
        let the = m.index["the"];
        let ids = m.ids("The, THE!\tthe zzzqqqxx");
        assert_eq!(ids.len(), 100);
        assert_eq!(
            &ids[97..],
            &[the, the, the],
            "filters split words, case folds, unknown dropped"
        );
        assert!(ids[..97].iter().all(|&i| i == 0), "zeros in front");
        let long = "the ".repeat(150) + "you";
        assert_eq!(
            *m.ids(&long).last().unwrap(),
            m.index["you"],
            "keeps the last 100"
        );
    }

    /// Any text, however odd, gets six probabilities in [0, 1] (no panic): control
    /// characters, combining marks, letters that grow when lowercased ("İ"), long texts.
    #[test]
    fn any_text_scores_within_bounds() {
        let m = ToxBlock::shared();
        let alphabet: Vec<char> = "aZ İıßΣς\u{301}\u{0}\t\n!?🙂 你好 idiot fuck"
            .chars()
            .collect();
        let mut x: u64 = 7;
        for len in [0usize, 1, 2, 5, 30, 400, 5000] {
            for _ in 0..20 {
                let text: String = (0..len)
                    .map(|_| {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        alphabet[(x >> 33) as usize % alphabet.len()]
                    })
                    .collect();
                let p = m.probabilities(&text);
                assert!(p.iter().all(|v| (0.0..=1.0).contains(v)), "{text:?}: {p:?}");
            }
        }
    }
}
