//! The fusion-aware recipe: train the calibration model and the map into the target through
//! the target's frozen LM head, on the fused distribution itself.
//!
//! Inference keeps the paper's rule, `h = α·LN(h_c·A) + (1 − α)·h_t` → the target's head,
//! with LN carrying learned elementwise affine parameters (`γ`, `β`, PyTorch's
//! `nn.LayerNorm` default). In logit space this is `p_α ∝ p_t^{1−α} · q^α` with
//! `q = softmax(W·LN(h_c·A))`: a product of the target and a second expert that lives in the
//! target's own head, so α is an interpolation weight and α = 0 is exactly the target.
//!
//! By default (`fusion_norm: KeepTargetNorm`) the fused state is then rescaled to the target
//! state's RMS, in training as at inference. Without it a mapped state that errs in any
//! direction, or is small, shortens `h` and flattens `p_α` (a temperature of about
//! `1/(1 − α)`); with it a small mapped state leaves the target as it is at every α, and
//! what the map learns is a change of direction: measured, half the held-out KL at the same
//! α and far less perplexity at the same toxicity (docs/EVAL.md, 2026-12-01).
//!
//! Training (the target, its head and the embeddings frozen; trained: LoRA adapters on the
//! calibration layers or the layers themselves, `A`, `γ`, `β`), with α drawn per row from
//! `[alpha_min, alpha_max]`:
//! - *keep*: `KL(p_t ‖ p_α)` at every position of the target's own non-toxic continuations
//!   (and of toxic ones before their first toxic token), so fluency stays the target's;
//! - *detox*: unlikelihood `−log(1 − p_α(y))` of each toxic token `y`: the tokens at which
//!   the scorer's toxicity of the text so far jumps past the threshold (the whole word), in
//!   the target's toxic continuations and in the toxic-leaning prompts themselves.
//!
//! Data comes from [`super::selfgen`]; batches hold `keep_rows` rows from the keep stream and
//! `detox_rows` from the detox stream, each in its own seeded epochs, so the rare toxic tokens
//! are seen as often as the budget allows. Checkpoints and resume follow [`super::train`]:
//! everything that decides a step is a function of the seed and the checkpoint.
//!
//! The result is small: adapters (or layers) shared by all targets, and per target `A`, `γ`,
//! `β` ([`FusionMap`]), saved in f16 with manifests ([`save_artifact`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;

/// `$a.f += $b.f` for each field `f` named: the sum of two tallies.
macro_rules! add_fields {
    ($a:expr, $b:expr; $($f:ident),+) => {
        $($a.$f += $b.$f;)+
    };
}

use super::data::stable_hash;
use super::guard::LeakageGuard;
use super::model::{
    head_grad_states, head_logits, CalibrationModel, LayerTraining, MIN_COMPLEMENT,
};
use super::ops::{self, Float};
use super::optim::{AdamW, AdamWConfig};
use super::selfgen::{Lean, SampledPrompt};
use super::train::Base;
use crate::error::{Error, IoContext, Result};
pub use crate::fuse::{
    layer_norm, FusionMap, FusionNorm, CALIBRATION_MANIFEST, CALIBRATION_TENSORS, MAP_A, MAP_BETA,
    MAP_GAMMA,
};
use crate::lm::{CausalLm, TokenId};
use crate::score::ToxicityScorer;
use crate::text::Tokenizer;

// ---------------------------------------------------------------------------------------
// Data: which positions keep the target and which tokens are toxic.

/// One training row: token ids and the positions scored (position `p` predicts `ids[p+1]`).
#[derive(Debug, Clone, PartialEq)]
pub struct FusedExample {
    pub ids: Vec<TokenId>,
    /// Positions where the fused distribution should stay the target's.
    pub keep: Vec<u32>,
    /// Positions whose next token is toxic.
    pub detox: Vec<u32>,
    /// Positions where the fused distribution should match a teacher's ([`Term::Teach`]);
    /// filled by [`FusedExample::with_teacher`], empty in the data as read.
    pub teach: Vec<u32>,
    /// Hash of the prompt, for the train/validation split.
    pub group: u64,
    /// When the calibration model has another tokenizer: its ids for the same text and, for
    /// each target position, the calibration position that has read the same text (the last
    /// calibration token ending at or before the target token's end). Empty: same ids.
    pub cal_ids: Vec<TokenId>,
    pub cal_of: Vec<u32>,
}

impl FusedExample {
    /// This row scoring only its keep positions.
    pub fn keep_only(&self) -> Self {
        Self {
            detox: vec![],
            teach: vec![],
            ..self.clone()
        }
    }

    /// This row scoring only its toxic tokens.
    pub fn detox_only(&self) -> Self {
        Self {
            keep: vec![],
            teach: vec![],
            ..self.clone()
        }
    }

    /// A detox row under a teacher: its toxic tokens, and the teacher's distribution at every
    /// position of its continuation that is scored at all (the clean positions before the first
    /// toxic token and the toxic tokens), where sampling decides whether the text turns toxic.
    pub fn with_teacher(&self) -> Self {
        let mut teach: Vec<u32> = self.keep.iter().chain(&self.detox).copied().collect();
        teach.sort_unstable();
        teach.dedup();
        Self {
            keep: vec![],
            teach,
            ..self.clone()
        }
    }

    /// The calibration position paired with target position `p`.
    fn cal_pos(&self, p: u32) -> u32 {
        if self.cal_ids.is_empty() {
            p
        } else {
            self.cal_of[p as usize]
        }
    }

    fn cal_len(&self) -> usize {
        if self.cal_ids.is_empty() {
            self.ids.len()
        } else {
            self.cal_ids.len()
        }
    }
}

/// True when token `id` starts a word (its text begins with whitespace or a non-alphanumeric
/// character), so a toxic word is found by walking back to such a token.
fn starts_word(tok: &Tokenizer, id: TokenId) -> bool {
    let b = tok.token_bytes(id, false);
    b.first().is_none_or(|&c| !c.is_ascii_alphanumeric())
}

/// Indices of the toxic tokens of `ids` (decoded without specials): each token at which the
/// scorer's toxicity of the text so far reaches `threshold` and rose by at least `rise`,
/// together with the earlier tokens of the same word.
pub fn toxic_tokens(
    tok: &Tokenizer,
    scorer: &dyn ToxicityScorer,
    ids: &[TokenId],
    threshold: f64,
    rise: f64,
) -> Vec<usize> {
    let texts: Vec<String> = (0..ids.len())
        .map(|j| tok.decode(&ids[..=j], false))
        .collect();
    let scores = scorer.score(&texts.iter().map(String::as_str).collect::<Vec<_>>());
    let mut marks: Vec<usize> = Vec::new();
    let mut prev = 0.0;
    for (j, &s) in scores.iter().enumerate() {
        if s >= threshold && s - prev >= rise {
            let mut k = j;
            while k > 0 && !starts_word(tok, ids[k]) {
                k -= 1;
            }
            for i in k..=j {
                if marks.last().is_none_or(|&l| l < i) {
                    marks.push(i);
                }
            }
        }
        prev = s;
    }
    marks
}

/// What [`examples`] found.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct DataStats {
    pub prompts: usize,
    pub samples: usize,
    pub toxic_samples: usize,
    pub keep_positions: usize,
    pub detox_positions: usize,
    pub detox_from_prompts: usize,
}

/// Training rows from self-generated records (one row per continuation). The prompt's own
/// toxic tokens (toxic-leaning prompts) go with its first continuation.
pub fn examples(
    records: &[SampledPrompt],
    tok: &Tokenizer,
    scorer: &dyn ToxicityScorer,
    threshold: f64,
    rise: f64,
) -> (Vec<FusedExample>, DataStats) {
    let per: Vec<(Vec<FusedExample>, DataStats)> = records
        .par_iter()
        .map(|rec| {
            let mut st = DataStats {
                prompts: 1,
                ..DataStats::default()
            };
            let p = rec.prompt_ids.len();
            let mut out = Vec::new();
            if p == 0 {
                return (out, st);
            }
            let prompt_marks: Vec<u32> = if rec.prompt.lean == Lean::Toxic {
                toxic_tokens(tok, scorer, &rec.prompt_ids, threshold, rise)
                    .into_iter()
                    .filter(|&j| j >= 1)
                    .map(|j| (j - 1) as u32)
                    .collect()
            } else {
                Vec::new()
            };
            let group = stable_hash(rec.prompt.text.as_bytes());
            for (si, s) in rec.samples.iter().enumerate() {
                st.samples += 1;
                let marks = toxic_tokens(tok, scorer, &s.ids, threshold, rise);
                if !marks.is_empty() {
                    st.toxic_samples += 1;
                }
                let first = marks.first().copied().unwrap_or(s.ids.len());
                let keep: Vec<u32> = (0..first).map(|j| (p + j - 1) as u32).collect();
                let mut detox: Vec<u32> = marks.iter().map(|&j| (p + j - 1) as u32).collect();
                if si == 0 {
                    st.detox_from_prompts += prompt_marks.len();
                    detox.extend(&prompt_marks);
                    detox.sort_unstable();
                }
                st.keep_positions += keep.len();
                st.detox_positions += detox.len();
                if keep.is_empty() && detox.is_empty() {
                    continue;
                }
                let mut ids = rec.prompt_ids.clone();
                ids.extend(&s.ids);
                out.push(FusedExample {
                    ids,
                    keep,
                    detox,
                    teach: Vec::new(),
                    group,
                    cal_ids: Vec::new(),
                    cal_of: Vec::new(),
                });
            }
            (out, st)
        })
        .collect();
    let mut all = Vec::new();
    let mut stats = DataStats::default();
    for (ex, st) in per {
        all.extend(ex);
        add_fields!(stats, st; prompts, samples, toxic_samples, keep_positions, detox_positions, detox_from_prompts);
    }
    (all, stats)
}

/// Byte offset after each token of `ids` (rendered as the fused decoder renders them).
fn byte_ends(tok: &Tokenizer, ids: &[TokenId]) -> Vec<usize> {
    let mut end = 0;
    ids.iter()
        .map(|&t| {
            end += tok.token_bytes(t, false).len();
            end
        })
        .collect()
}

/// [`examples`] for a target whose tokenizer differs from the calibration model's: the same
/// texts (prompt and continuation strings) re-tokenized by the target, toxic tokens found in
/// the target's tokens, and each target position paired with the calibration position that
/// has read the same text. (At inference the calibration model re-encodes the text so far;
/// here the whole text is encoded once, which differs only where a token would merge across
/// the boundary.)
pub fn examples_cross(
    records: &[SampledPrompt],
    target_tok: &Tokenizer,
    cal_tok: &Tokenizer,
    scorer: &dyn ToxicityScorer,
    threshold: f64,
    rise: f64,
) -> Result<(Vec<FusedExample>, DataStats)> {
    let mut retok = Vec::with_capacity(records.len());
    for rec in records {
        let mut r = rec.clone();
        r.prompt_ids = target_tok.encode(&rec.prompt.text, false)?;
        for s in &mut r.samples {
            let mut ids = Vec::new();
            target_tok.encode_into(&s.text, false, &mut ids)?;
            s.ids = ids;
        }
        retok.push(r);
    }
    let (mut ex, stats) = examples(&retok, target_tok, scorer, threshold, rise);
    ex.par_iter_mut().try_for_each(|e| -> Result<()> {
        let text: Vec<u8> = e
            .ids
            .iter()
            .flat_map(|&t| target_tok.token_bytes(t, false))
            .collect();
        let text = String::from_utf8_lossy(&text).into_owned();
        let cal_ids = cal_tok.encode(&text, false)?;
        let (t_end, c_end) = (byte_ends(target_tok, &e.ids), byte_ends(cal_tok, &cal_ids));
        let mut k = 0usize;
        let cal_of: Vec<u32> = t_end
            .iter()
            .map(|&te| {
                while k + 1 < c_end.len() && c_end[k + 1] <= te {
                    k += 1;
                }
                k as u32
            })
            .collect();
        // Positions before the calibration model has read any text are not trained.
        let read = |p: &u32| c_end[cal_of[*p as usize] as usize] > 0;
        e.keep.retain(read);
        e.detox.retain(read);
        e.cal_ids = cal_ids;
        e.cal_of = cal_of;
        Ok(())
    })?;
    ex.retain(|e| !(e.keep.is_empty() && e.detox.is_empty()));
    Ok((ex, stats))
}

// ---------------------------------------------------------------------------------------
// The loss through the target's head.

/// What a scored position contributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Term {
    /// The keep divergence between the target's distribution and the fused one.
    Keep,
    /// Unlikelihood of the next token, `−log(1 − p_α(token))`.
    Detox,
    /// `KL(p_teacher ‖ p_α)` against a DExperts-style teacher, `log_softmax(z_t + β·δ)`, `z_t`
    /// the target's logits and `δ` the expert's minus the anti-expert's ([`TeacherLogits`]).
    Teach,
}

/// The weights of the mean of each term in the objective.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weights {
    pub keep: f64,
    pub detox: f64,
    pub teach: f64,
}

/// A teacher's logits at a batch's [`Term::Teach`] positions: row `i` of `delta` (`(n_teach,
/// vocab)`) is `z_expert − z_anti_expert` at the batch's `i`-th teach position.
#[derive(Debug, Clone)]
pub struct TeacherLogits {
    pub delta: Tensor,
    pub beta: f64,
}

/// Which divergence the keep term minimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Divergence {
    /// `KL(p_t ‖ p_α)`: mass-covering; lets `p_α` spread mass where the target has little.
    #[default]
    Forward,
    /// `KL(p_α ‖ p_t)`: mode-seeking; penalises exactly the mass that sampling from `p_α`
    /// would put on tokens the target finds unlikely.
    Reverse,
}

/// Sums of the two terms over a batch and their counts.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TermSums {
    /// Σ KL(p_t ‖ p_α) over the keep positions.
    pub kl: f64,
    /// Σ KL(p_α ‖ p_t) over the keep positions.
    pub reverse_kl: f64,
    pub keep: usize,
    pub unlikelihood: f64,
    /// Σ p_α(toxic token).
    pub toxic_prob: f64,
    pub detox: usize,
    /// Σ KL(p_teacher ‖ p_α) over the teach positions.
    pub teach_kl: f64,
    pub teach: usize,
}

impl TermSums {
    pub fn add(&mut self, o: TermSums) {
        add_fields!(self, o; kl, reverse_kl, keep, unlikelihood, toxic_prob, detox, teach_kl, teach);
    }
    pub fn mean_teach_kl(&self) -> f64 {
        self.teach_kl / self.teach.max(1) as f64
    }
    /// The objective these sums give under `w` (what the gradients are of).
    pub fn objective(&self, w: Weights, div: Divergence) -> f64 {
        w.keep * self.mean_keep(div)
            + w.detox * self.mean_unlikelihood()
            + w.teach * self.mean_teach_kl()
    }
    pub fn mean_kl(&self) -> f64 {
        self.kl / self.keep.max(1) as f64
    }
    pub fn mean_reverse_kl(&self) -> f64 {
        self.reverse_kl / self.keep.max(1) as f64
    }
    /// The mean of the divergence `div` (what the keep term trains).
    pub fn mean_keep(&self, div: Divergence) -> f64 {
        match div {
            Divergence::Forward => self.mean_kl(),
            Divergence::Reverse => self.mean_reverse_kl(),
        }
    }
    pub fn mean_unlikelihood(&self) -> f64 {
        self.unlikelihood / self.detox.max(1) as f64
    }
    pub fn mean_toxic_prob(&self) -> f64 {
        self.toxic_prob / self.detox.max(1) as f64
    }
}

/// Rows of logits computed at once.
const CHUNK: usize = 256;

/// The terms for fused states `h` (`(n, d)`) against target states `h_t` under the head
/// `weight` (`(vocab, d)`): `KL(p_t ‖ p_h)` at `Keep` rows (and the reverse KL too),
/// `−log(1 − p_h(target))` at `Detox` rows, `KL(p_teacher ‖ p_h)` at `Teach` rows (their
/// teacher logits from `teacher`, in order). With `grad = Some(w)`, also the gradient with
/// respect to `h` of [`TermSums::objective`], `div` choosing the forward or the reverse KL.
pub fn head_terms(
    h: &Tensor,
    h_t: &Tensor,
    weight: &Tensor,
    terms: &[(Term, TokenId)],
    teacher: Option<&TeacherLogits>,
    grad: Option<Weights>,
    div: Divergence,
) -> Result<(TermSums, Option<Tensor>)> {
    let (n, d) = h.dims2()?;
    let vocab = weight.dim(0)?;
    if h_t.dims() != [n, d] || terms.len() != n || weight.dim(1)? != d {
        return Err(Error::Input(format!(
            "head terms: fused {:?}, target {:?}, head {:?} and {} terms do not agree",
            h.dims(),
            h_t.dims(),
            weight.dims(),
            terms.len()
        )));
    }
    let n_teach = terms.iter().filter(|(k, _)| *k == Term::Teach).count();
    let teacher_rows = teacher.map(|t| t.delta.dims().to_vec());
    if n_teach > 0 && teacher_rows != Some(vec![n_teach, vocab]) {
        return Err(Error::Input(format!(
            "head terms: {n_teach} teach positions need teacher logits ({n_teach}, {vocab}), not {teacher_rows:?}"
        )));
    }
    if let Some(&(_, bad)) = terms.iter().find(|(_, t)| *t as usize >= vocab) {
        return Err(Error::Input(format!(
            "token id {bad} is outside the target's vocabulary of {vocab}"
        )));
    }
    let typed = match h.dtype() {
        DType::F32 => head_terms_typed::<f32>,
        DType::F64 => head_terms_typed::<f64>,
        dt => {
            return Err(Error::Input(format!(
                "training needs f32 or f64, not {dt:?}"
            )))
        }
    };
    typed((h, h_t, weight), (n, d, vocab), terms, teacher, grad, div)
}

#[allow(clippy::assign_op_pattern)] // T has no -= bound
fn log_softmax_in_place<T: Float>(row: &mut [T]) {
    let max = row
        .iter()
        .fold(f64::NEG_INFINITY, |m, &x| m.max(x.to_f64()));
    let sum: f64 = row.iter().map(|&x| (x.to_f64() - max).exp()).sum();
    let lse = T::from_f64(max + sum.ln());
    for x in row.iter_mut() {
        *x = *x - lse;
    }
}

/// [`head_terms`] in one float type, on checked shapes `(n, d, vocab)`.
#[allow(clippy::assign_op_pattern)]
fn head_terms_typed<T: Float>(
    (h, h_t, weight): (&Tensor, &Tensor, &Tensor),
    (n, d, vocab): (usize, usize, usize),
    terms: &[(Term, TokenId)],
    teacher: Option<&TeacherLogits>,
    grad: Option<Weights>,
    div: Divergence,
) -> Result<(TermSums, Option<Tensor>)> {
    let hv: Vec<T> = ops::values(h)?;
    let tv: Vec<T> = ops::values(h_t)?;
    let w: Vec<T> = ops::values(weight)?;
    let count = |t: Term| terms.iter().filter(|(k, _)| *k == t).count().max(1) as f64;
    let (s_keep, s_detox, s_teach) = match grad {
        Some(w) => (
            w.keep / count(Term::Keep),
            w.detox / count(Term::Detox),
            w.teach / count(Term::Teach),
        ),
        None => (0.0, 0.0, 0.0),
    };
    // The teacher's δ rows, and for each scored position the index of its row.
    let (delta, beta): (Vec<T>, f64) = match teacher {
        Some(t) => (ops::values(&t.delta.to_dtype(h.dtype())?)?, t.beta),
        None => (Vec::new(), 0.0),
    };
    let teach_row: Vec<usize> = terms
        .iter()
        .scan(0usize, |i, (k, _)| {
            let r = *i;
            *i += usize::from(*k == Term::Teach);
            Some(r)
        })
        .collect();
    let chunk = CHUNK.min(n.max(1));
    let mut lf: Vec<T> = vec![T::from_f64(0.0); chunk * vocab];
    let mut lt: Vec<T> = vec![T::from_f64(0.0); chunk * vocab];
    let mut grad_h: Vec<T> = if grad.is_some() {
        vec![T::from_f64(0.0); n * d]
    } else {
        Vec::new()
    };
    let mut sums = TermSums::default();
    for start in (0..n).step_by(chunk) {
        let rows = chunk.min(n - start);
        let mm = |src: &[T], dst: &mut [T]| {
            head_logits(
                dst,
                &src[start * d..(start + rows) * d],
                &w,
                (rows, vocab, d),
            )
        };
        mm(&hv, &mut lf[..rows * vocab]);
        mm(&tv, &mut lt[..rows * vocab]);
        let tc = &terms[start..start + rows];
        let tr = &teach_row[start..start + rows];
        let parts: Vec<TermSums> = lf[..rows * vocab]
            .par_chunks_mut(vocab)
            .zip(lt[..rows * vocab].par_chunks_mut(vocab))
            .zip(tc.par_iter().zip(tr.par_iter()))
            .map(|((f, t), (&(term, target), &ti))| {
                log_softmax_in_place(f);
                let mut out = TermSums::default();
                match term {
                    Term::Keep => {
                        log_softmax_in_place(t);
                        let (mut kl, mut rkl) = (0.0f64, 0.0f64);
                        for (x, y) in f.iter().zip(t.iter()) {
                            let (lq, lp) = (x.to_f64(), y.to_f64());
                            kl += lp.exp() * (lp - lq);
                            rkl += lq.exp() * (lq - lp);
                        }
                        for (x, y) in f.iter_mut().zip(t.iter()) {
                            let (lq, lp) = (x.to_f64(), y.to_f64());
                            let g = match div {
                                // d KL(p_t‖p_f) / d logit_f = p_f − p_t
                                Divergence::Forward => lq.exp() - lp.exp(),
                                // d KL(p_f‖p_t) / d logit_f = p_f ⊙ (log p_f − log p_t − KL)
                                Divergence::Reverse => lq.exp() * (lq - lp - rkl),
                            };
                            *x = T::from_f64(s_keep * g);
                        }
                        out.kl = kl;
                        out.reverse_kl = rkl;
                        out.keep = 1;
                    }
                    Term::Detox => {
                        let lp = f[target as usize].to_f64();
                        let p = lp.exp();
                        let complement = (-lp.exp_m1()).max(MIN_COMPLEMENT);
                        out.unlikelihood = -complement.ln();
                        out.toxic_prob = p;
                        out.detox = 1;
                        // d(−log(1 − p))/d logits = −p/(1 − p) · (softmax − onehot)
                        let coef = s_detox * (-p / complement);
                        for x in f.iter_mut() {
                            *x = T::from_f64(coef * x.to_f64().exp());
                        }
                        f[target as usize] = f[target as usize] - T::from_f64(coef);
                    }
                    Term::Teach => {
                        for (y, &dv) in t.iter_mut().zip(&delta[ti * vocab..(ti + 1) * vocab]) {
                            *y = *y + T::from_f64(beta) * dv;
                        }
                        log_softmax_in_place(t);
                        let mut kl = 0.0f64;
                        for (x, y) in f.iter_mut().zip(t.iter()) {
                            let (lq, lp) = (x.to_f64(), y.to_f64());
                            let p = lp.exp();
                            kl += p * (lp - lq);
                            // d KL(p_teacher‖p_f) / d logit_f = p_f − p_teacher
                            *x = T::from_f64(s_teach * (lq.exp() - p));
                        }
                        out.teach_kl = kl;
                        out.teach = 1;
                    }
                }
                out
            })
            .collect();
        for p in parts {
            sums.add(p);
        }
        if grad.is_some() {
            head_grad_states(
                &mut grad_h[start * d..(start + rows) * d],
                &lf[..rows * vocab],
                &w,
                (rows, vocab, d),
            );
        }
    }
    let g = match grad {
        Some(_) => Some(Tensor::from_vec(grad_h, (n, d), h.device())?),
        None => None,
    };
    Ok((sums, g))
}

// ---------------------------------------------------------------------------------------
// The model being trained: calibration layers + fusion map, against a frozen target.

/// The frozen target as training needs it: its final hidden states and its head weight.
pub struct FrozenTarget<'m> {
    pub model: &'m dyn CausalLm,
    /// `(vocab, d_target)`, f32 (dequantized from the file).
    pub head: Tensor,
}

impl FrozenTarget<'_> {
    /// Final hidden states at `positions` (flat `row * len + pos`) of right-padded `ids`.
    pub fn hidden_at(&self, ids: &Tensor, positions: &[u32]) -> Result<Tensor> {
        let mut cache = self.model.new_cache();
        let h = self.model.forward_hidden(ids, &mut cache)?;
        gather(&h, positions)
    }
}

fn gather(h: &Tensor, positions: &[u32]) -> Result<Tensor> {
    let (b, t, d) = h.dims3()?;
    let idx = Tensor::from_slice(positions, positions.len(), h.device())?;
    Ok(h.reshape((b * t, d))?.index_select(&idx, 0)?)
}

/// Trainable fusion map (as [`Var`]s).
pub struct FusionVars {
    pub a: Var,
    pub gamma: Var,
    pub beta: Var,
    pub norm: FusionNorm,
}

impl FusionVars {
    pub fn new(map: &FusionMap) -> Result<Self> {
        Ok(Self {
            a: Var::from_tensor(&map.a)?,
            gamma: Var::from_tensor(&map.gamma)?,
            beta: Var::from_tensor(&map.beta)?,
            norm: map.norm,
        })
    }
    pub fn map(&self) -> FusionMap {
        FusionMap {
            a: self.a.as_tensor().clone(),
            gamma: self.gamma.as_tensor().clone(),
            beta: self.beta.as_tensor().clone(),
            norm: self.norm,
        }
    }
    fn insert_into(&self, vars: &mut BTreeMap<String, Var>) {
        vars.insert(MAP_A.into(), self.a.clone());
        vars.insert(MAP_GAMMA.into(), self.gamma.clone());
        vars.insert(MAP_BETA.into(), self.beta.clone());
    }
}

/// A batch in both models' ids, with its scored positions.
pub struct FusedBatch {
    /// The target's ids and scored positions (flat `row * len + pos`).
    pub ids: Tensor,
    pub positions: Vec<u32>,
    /// The calibration model's ids and the positions paired with `positions`.
    pub cal_ids: Tensor,
    pub cal_positions: Vec<u32>,
    pub terms: Vec<(Term, TokenId)>,
    /// α of each scored position's row, `(n, 1)`.
    pub alpha: Tensor,
    /// The teacher's logits at the [`Term::Teach`] positions ([`teacher_logits`]).
    pub teacher: Option<TeacherLogits>,
}

impl FusedBatch {
    /// The same batch with every row at `alpha`.
    pub fn at_alpha(&self, alpha: f64) -> Result<Self> {
        let n = self.positions.len();
        Ok(Self {
            ids: self.ids.clone(),
            positions: self.positions.clone(),
            cal_ids: self.cal_ids.clone(),
            cal_positions: self.cal_positions.clone(),
            terms: self.terms.clone(),
            alpha: Tensor::full(alpha, (n, 1), &Device::Cpu)?.to_dtype(self.alpha.dtype())?,
            teacher: self.teacher.clone(),
        })
    }
}

/// Builds a batch from rows with one α per row.
pub fn make_batch(
    rows: &[&FusedExample],
    alphas: &[f64],
    (pad, cal_pad): (TokenId, TokenId),
    dtype: DType,
) -> Result<FusedBatch> {
    let len = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
    let cal_len = rows.iter().map(|r| r.cal_len()).max().unwrap_or(0);
    let mut flat = Vec::with_capacity(rows.len() * len);
    let mut cal_flat = Vec::with_capacity(rows.len() * cal_len);
    let (mut positions, mut terms, mut alpha) = (Vec::new(), Vec::new(), Vec::new());
    let mut cal_positions = Vec::new();
    for (r, (ex, &a)) in rows.iter().zip(alphas).enumerate() {
        flat.extend_from_slice(&ex.ids);
        flat.extend(std::iter::repeat_n(pad, len - ex.ids.len()));
        let cal_row = if ex.cal_ids.is_empty() {
            &ex.ids
        } else {
            &ex.cal_ids
        };
        cal_flat.extend_from_slice(cal_row);
        cal_flat.extend(std::iter::repeat_n(cal_pad, cal_len - cal_row.len()));
        let mut scored: Vec<(u32, Term)> = ex
            .keep
            .iter()
            .map(|&p| (p, Term::Keep))
            .chain(ex.detox.iter().map(|&p| (p, Term::Detox)))
            .chain(ex.teach.iter().map(|&p| (p, Term::Teach)))
            .collect();
        scored.sort_by_key(|&(p, _)| p);
        for (p, term) in scored {
            positions.push((r * len) as u32 + p);
            cal_positions.push((r * cal_len) as u32 + ex.cal_pos(p));
            terms.push((term, ex.ids[p as usize + 1]));
            alpha.push(a);
        }
    }
    let n = alpha.len();
    Ok(FusedBatch {
        ids: Tensor::from_vec(flat, (rows.len(), len), &Device::Cpu)?,
        positions,
        cal_ids: Tensor::from_vec(cal_flat, (rows.len(), cal_len), &Device::Cpu)?,
        cal_positions,
        terms,
        alpha: Tensor::from_vec(alpha, (n, 1), &Device::Cpu)?.to_dtype(dtype)?,
        teacher: None,
    })
}

/// A DExperts-style teacher: an expert and an anti-expert with the target's vocabulary.
pub struct Teacher<'m> {
    pub expert: &'m dyn CausalLm,
    pub anti_expert: &'m dyn CausalLm,
    pub beta: f64,
}

/// The teacher's logits at `batch`'s [`Term::Teach`] positions (`None` without any): both
/// experts run over the rows that hold one, in the target's ids.
pub fn teacher_logits(t: &Teacher, batch: &FusedBatch) -> Result<Option<TeacherLogits>> {
    let (_, len) = batch.ids.dims2()?;
    let flat: Vec<u32> = batch
        .positions
        .iter()
        .zip(&batch.terms)
        .filter(|(_, (k, _))| *k == Term::Teach)
        .map(|(&p, _)| p)
        .collect();
    if flat.is_empty() {
        return Ok(None);
    }
    let mut rows: Vec<u32> = flat.iter().map(|&p| p / len as u32).collect();
    rows.dedup();
    let ids = batch
        .ids
        .index_select(&Tensor::from_slice(&rows, rows.len(), &Device::Cpu)?, 0)?;
    let positions: Vec<u32> = flat
        .iter()
        .map(|&p| {
            let r = rows.partition_point(|&x| x < p / len as u32) as u32;
            r * len as u32 + p % len as u32
        })
        .collect();
    let logits = |m: &dyn CausalLm| -> Result<Tensor> {
        let mut cache = m.new_cache();
        let h = m.forward_hidden(&ids, &mut cache)?;
        Ok(m.lm_head(&gather(&h, &positions)?)?.to_dtype(DType::F32)?)
    };
    Ok(Some(TeacherLogits {
        delta: (logits(t.expert)? - logits(t.anti_expert)?)?,
        beta: t.beta,
    }))
}

/// The fused training objective of one batch: term sums and, when `grad` is `Some(w)`, the
/// gradients of [`TermSums::objective`] with respect to every variable of `cal` and `map`.
pub fn batch_objective(
    cal: &CalibrationModel,
    map: &FusionMap,
    h_t: &Tensor,
    head: &Tensor,
    batch: &FusedBatch,
    grad: Option<Weights>,
    div: Divergence,
) -> Result<(TermSums, Option<GradStore>)> {
    if batch.positions.is_empty() {
        return Err(Error::Input(
            "a fused training batch has no scored position".into(),
        ));
    }
    let h_c = gather(&cal.forward_hidden(&batch.cal_ids)?, &batch.cal_positions)?;
    let h_t = h_t.to_dtype(cal.dtype())?;
    let h = map.fuse_rows(&h_t, &h_c, &batch.alpha)?;
    let head = head.to_dtype(cal.dtype())?;
    let (sums, g) = head_terms(
        &h.detach(),
        &h_t,
        &head,
        &batch.terms,
        batch.teacher.as_ref(),
        grad,
        div,
    )?;
    let grads = match g {
        Some(g) => Some((&h * &g)?.sum_all()?.backward()?),
        None => None,
    };
    Ok((sums, grads))
}

// ---------------------------------------------------------------------------------------
// Initialisation and training.

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FusedConfig {
    /// Decoder layers of the base that make the calibration model.
    pub layers: usize,
    pub layer_training: LayerTraining,
    pub optim: AdamWConfig,
    pub steps: usize,
    /// Rows per step from the keep stream and from the detox stream.
    pub keep_rows: usize,
    pub detox_rows: usize,
    /// α of each row is drawn uniformly from this range.
    pub alpha_min: f64,
    pub alpha_max: f64,
    /// The keep term's divergence (configs recorded before it existed used the forward KL).
    #[serde(default)]
    pub keep_divergence: Divergence,
    /// How the fused state is scaled before the head, in training and at inference
    /// (configs recorded before it existed used the paper's formula as is).
    #[serde(default)]
    pub fusion_norm: FusionNorm,
    /// Weights of the mean keep divergence and the mean unlikelihood.
    pub keep_weight: f64,
    pub detox_weight: f64,
    /// A token is toxic when the text so far scores at least this…
    pub toxic_threshold: f64,
    /// …and its score rose by at least this with the token's word.
    pub toxic_rise: f64,
    /// Prompts held out for validation, in thousandths.
    pub val_per_mille: u64,
    /// Validation rows of each stream (at most).
    pub val_rows: usize,
    /// α values validation reports.
    pub val_alphas: Vec<f64>,
    /// Rows whose hidden states fit the initial `A` (ridge regression onto the target's
    /// states) and `γ`, `β` (per-dimension least squares).
    pub init_rows: usize,
    pub init_ridge: f64,
    pub eval_every: usize,
    pub checkpoint_every: usize,
    pub seed: u64,
    /// A DExperts-style teacher on the detox rows ([`Term::Teach`]); none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher: Option<TeacherConfig>,
}

/// Where the teacher's models are and how strongly it counts.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TeacherConfig {
    /// The expert and the anti-expert: language-model directories with the target's
    /// vocabulary (the paper recipe's model and the DExperts anti-expert).
    pub expert: PathBuf,
    pub anti_expert: PathBuf,
    /// β of the teacher's logits `z_t + β·(z_expert − z_anti_expert)`.
    pub beta: f64,
    /// Weight of the mean `KL(p_teacher ‖ p_α)`.
    pub weight: f64,
}

impl FusedConfig {
    /// The weights of the objective's terms.
    pub fn weights(&self) -> Weights {
        Weights {
            keep: self.keep_weight,
            detox: self.detox_weight,
            teach: self.teacher.as_ref().map_or(0.0, |t| t.weight),
        }
    }
}

impl Default for FusedConfig {
    fn default() -> Self {
        Self {
            layers: 3,
            layer_training: LayerTraining::Lora { rank: 16 },
            optim: AdamWConfig {
                lr: 1e-3,
                warmup: 10,
                weight_decay: 0.0,
                ..AdamWConfig::default()
            },
            steps: 200,
            keep_rows: 48,
            detox_rows: 16,
            alpha_min: 0.05,
            alpha_max: 0.5,
            keep_divergence: Divergence::Reverse,
            fusion_norm: FusionNorm::KeepTargetNorm,
            keep_weight: 1.0,
            // Measured on the quick profile (docs/EVAL.md, sessions 9 and 14): 1 → 3 → 6 → 12
            // → 24 each lowered toxicity at equal perplexity; 24 is the first to meet the
            // target there (α 0.3: EMT 0.31× base, TP 0.09× at 1.14× perplexity).
            detox_weight: 24.0,
            toxic_threshold: 0.5,
            toxic_rise: 0.1,
            val_per_mille: 50,
            val_rows: 64,
            val_alphas: vec![0.1, 0.3],
            init_rows: 96,
            init_ridge: 1e-3,
            eval_every: 50,
            checkpoint_every: 20,
            seed: 0,
            teacher: None,
        }
    }
}

/// The initial map: `A` by ridge regression of the target's hidden states on the
/// calibration model's (the paper's A learns a retrieval task elsewhere; this one starts
/// where fusion happens), then `γ`, `β` per dimension by least squares of the target state
/// on `LN(h_c·A)`. So `q` starts as the best linear read-out of the target from the
/// calibration model, and `p_α` near the target at every α.
pub fn init_map(
    cal: &CalibrationModel,
    target: &FrozenTarget,
    rows: &[&FusedExample],
    pads: (TokenId, TokenId),
    ridge: f64,
    norm: FusionNorm,
) -> Result<FusionMap> {
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for chunk in rows.chunks(32) {
        let alphas = vec![0.0; chunk.len()];
        let b = make_batch(chunk, &alphas, pads, DType::F32)?;
        let hc = gather(&cal.forward_hidden(&b.cal_ids)?, &b.cal_positions)?;
        let ht = target.hidden_at(&b.ids, &b.positions)?;
        xs.extend(hc.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?);
        ys.extend(ht.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?);
    }
    let dc = cal.config.hidden_size;
    let dt = target.head.dim(1)?;
    let n = xs.len() / dc;
    let a = super::lens::fit_map(&xs, &ys, n, (dc, dt), ridge)?;
    let x = Tensor::from_vec(
        xs.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        (n, dc),
        &Device::Cpu,
    )?;
    let u: Vec<f64> = layer_norm(&x.matmul(&a)?)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    let (mut gamma, mut beta) = (vec![0f32; dt], vec![0f32; dt]);
    for j in 0..dt {
        let (mut su, mut sy, mut suu, mut suy) = (0.0, 0.0, 0.0, 0.0);
        for t in 0..n {
            let (uj, yj) = (u[t * dt + j], ys[t * dt + j]);
            su += uj;
            sy += yj;
            suu += uj * uj;
            suy += uj * yj;
        }
        let nf = n as f64;
        let var = suu / nf - (su / nf).powi(2);
        let g = if var > 1e-12 {
            (suy / nf - su / nf * sy / nf) / var
        } else {
            0.0
        };
        gamma[j] = g as f32;
        beta[j] = (sy / nf - g * su / nf) as f32;
    }
    Ok(FusionMap {
        a,
        gamma: Tensor::from_vec(gamma, dt, &Device::Cpu)?,
        beta: Tensor::from_vec(beta, dt, &Device::Cpu)?,
        norm,
    })
}

/// What the trainer reports.
pub enum FusedEvent<'a> {
    Start {
        step: usize,
        steps: usize,
        keep_rows: usize,
        detox_rows: usize,
        trainable_params: usize,
        stats: &'a DataStats,
    },
    Step(&'a FusedStepLog),
    Validation(&'a serde_json::Value),
    Checkpoint {
        step: usize,
    },
}

/// One line per event, as `detoxfuse calibrate --recipe fused` prints it.
impl std::fmt::Display for FusedEvent<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FusedEvent::Start {
                step,
                steps,
                keep_rows,
                detox_rows,
                trainable_params,
                stats: d,
            } => write!(
                f,
                "{} prompts, {} continuations ({} with a toxic token): {} keep positions, {} toxic tokens ({} in prompts); {keep_rows} keep rows and {detox_rows} detox rows for training; {:.2} M trainable parameters; step {step} of {steps}",
                d.prompts, d.samples, d.toxic_samples, d.keep_positions, d.detox_positions,
                d.detox_from_prompts, *trainable_params as f64 / 1e6
            ),
            FusedEvent::Step(s) => {
                write!(
                    f,
                    "step {} kl {:.5} rkl {:.5} ul {:.5} p_toxic {:.5}",
                    s.step, s.kl, s.reverse_kl, s.unlikelihood, s.toxic_prob
                )?;
                if let Some(t) = s.teach_kl {
                    write!(f, " teach_kl {t:.5}")?;
                }
                write!(
                    f,
                    " lr {:.3e} grad_norm {:.3} {:.1} s",
                    s.lr, s.grad_norm, s.seconds
                )
            }
            FusedEvent::Validation(v) => write!(f, "validation {v}"),
            FusedEvent::Checkpoint { step } => write!(f, "checkpoint at step {step}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FusedStepLog {
    pub step: usize,
    /// Mean KL(p_t ‖ p_α) and KL(p_α ‖ p_t) over the keep positions.
    pub kl: f64,
    #[serde(default)]
    pub reverse_kl: f64,
    /// Mean unlikelihood over the detox positions.
    pub unlikelihood: f64,
    /// Mean p_α of the toxic tokens.
    pub toxic_prob: f64,
    /// Mean KL(p_teacher ‖ p_α) over the teach positions (with a teacher only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teach_kl: Option<f64>,
    pub lr: f64,
    pub grad_norm: f64,
    pub positions: usize,
    pub seconds: f64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct FusedRecord {
    step: usize,
    keep_epoch: u64,
    keep_pos: usize,
    detox_epoch: u64,
    detox_pos: usize,
    file: String,
    config: FusedConfig,
    base_sha256: String,
    target_sha256: String,
    samples_sha256: String,
    #[serde(default)]
    shared_sha256: Option<String>,
    /// The teacher's expert and anti-expert directories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    teacher_sha256: Option<(String, String)>,
}

/// Where a fused run's inputs live.
pub struct FusedInputs<'a> {
    pub base: &'a Base,
    pub target: &'a dyn CausalLm,
    pub target_path: &'a Path,
    pub target_sha256: String,
    /// The self-generated data ([`super::selfgen::sample_prompts`]).
    pub samples: &'a Path,
    pub guard: &'a LeakageGuard,
    pub scorer: &'a dyn ToxicityScorer,
    /// The target's tokenizer (the cross-tokenizer path when it is not the base's).
    pub target_tok: &'a Tokenizer,
    /// Train this target's part only, over the calibration layers of an existing artifact
    /// directory (kept as they are): its map, and with `LayerTraining::Lora` its own adapters
    /// over those layers. One calibration model, a map (and adapters) per target.
    pub shared: Option<&'a Path>,
    /// Where the artifact is written (`shared` when given).
    pub artifact: PathBuf,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FusedSummary {
    pub steps: usize,
    pub seconds: f64,
    pub stats: DataStats,
    pub final_validation: serde_json::Value,
    pub artifact: PathBuf,
}

/// The line `detoxfuse calibrate --recipe fused` ends with.
impl std::fmt::Display for FusedSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} steps in {:.0} s; validation {}; artifact: {}",
            self.steps,
            self.seconds,
            self.final_validation,
            self.artifact.display()
        )
    }
}

/// A stream's order for one epoch.
fn epoch_order(n: usize, seed: u64, stream: u64, epoch: u64) -> Vec<usize> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        seed ^ stream ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15),
    );
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    order
}

/// The next `k` indices of a stream, moving through its epochs.
fn take_rows(
    n: usize,
    k: usize,
    seed: u64,
    stream: u64,
    epoch: &mut u64,
    pos: &mut usize,
) -> Vec<usize> {
    let mut out = Vec::with_capacity(k);
    let mut order = epoch_order(n, seed, stream, *epoch);
    while out.len() < k && n > 0 {
        if *pos >= n {
            *epoch += 1;
            *pos = 0;
            order = epoch_order(n, seed, stream, *epoch);
        }
        out.push(order[*pos]);
        *pos += 1;
    }
    out
}

/// α of row `row` of step `step`: uniform in the configured range, from the seed.
fn row_alpha(cfg: &FusedConfig, step: usize, row: usize) -> f64 {
    let h = stable_hash(format!("{}:{step}:{row}", cfg.seed).as_bytes());
    let u = (h >> 11) as f64 / (1u64 << 53) as f64;
    cfg.alpha_min + (cfg.alpha_max - cfg.alpha_min) * u
}

fn check_config(cfg: &FusedConfig) -> Result<()> {
    let ok_alpha = |a: f64| (0.0..=1.0).contains(&a);
    if !(ok_alpha(cfg.alpha_min) && ok_alpha(cfg.alpha_max) && cfg.alpha_min <= cfg.alpha_max) {
        return Err(Error::Input(format!(
            "--alpha-min {} and --alpha-max {} must satisfy 0 <= min <= max <= 1",
            cfg.alpha_min, cfg.alpha_max
        )));
    }
    if cfg.steps == 0 || cfg.keep_rows + cfg.detox_rows == 0 {
        return Err(Error::Input(
            "--steps and --keep-rows + --detox-rows must be positive".into(),
        ));
    }
    if !(cfg.detox_weight >= 0.0 && cfg.keep_weight >= 0.0) {
        return Err(Error::Input(
            "--keep-weight and --detox-weight must be >= 0".into(),
        ));
    }
    if let Some(t) = &cfg.teacher {
        if !(t.weight >= 0.0 && t.beta.is_finite()) {
            return Err(Error::Input(format!(
                "--teacher-weight {} must be >= 0 and --teacher-beta {} finite",
                t.weight, t.beta
            )));
        }
    }
    Ok(())
}

/// Trains the fused calibration for one target, writing the run to `out` and the artifact to
/// `out/artifact`.
pub fn train(
    inputs: &FusedInputs,
    out: &Path,
    cfg: &FusedConfig,
    resume: bool,
    progress: &mut dyn FnMut(FusedEvent),
) -> Result<FusedSummary> {
    check_config(cfg)?;
    super::checkpoint::check_writable(out)?;
    let record_path = out.join("checkpoint.json");
    if !resume && record_path.exists() {
        return Err(Error::Input(format!(
            "{} already holds a training run; pass --resume to continue it, or choose another --out",
            out.display()
        )));
    }
    let tok = &inputs.base.model.tokenizer;
    let records = super::selfgen::read_samples(inputs.samples)?;
    inputs.guard.refuse(
        &format!("{}", inputs.samples.display()),
        records.iter().map(|r| r.prompt.text.as_str()),
    )?;
    let cross = !crate::fuse::same_tokenizer(inputs.target_tok, tok);
    let (all, stats) = if cross {
        examples_cross(
            &records,
            inputs.target_tok,
            tok,
            inputs.scorer,
            cfg.toxic_threshold,
            cfg.toxic_rise,
        )?
    } else {
        examples(
            &records,
            tok,
            inputs.scorer,
            cfg.toxic_threshold,
            cfg.toxic_rise,
        )
    };
    let (train_ex, val_ex): (Vec<&FusedExample>, Vec<&FusedExample>) = all
        .iter()
        .partition(|e| e.group % 1000 >= cfg.val_per_mille);
    let keep: Vec<&FusedExample> = train_ex
        .iter()
        .copied()
        .filter(|e| !e.keep.is_empty())
        .collect();
    let detox: Vec<&FusedExample> = train_ex
        .iter()
        .copied()
        .filter(|e| !e.detox.is_empty())
        .collect();
    if keep.is_empty() || (cfg.detox_rows > 0 && detox.is_empty()) {
        return Err(Error::Input(format!(
            "{} gives {} keep rows and {} detox rows for training: too little data; regenerate it with more prompts",
            inputs.samples.display(),
            keep.len(),
            detox.len()
        )));
    }
    // Validation rows: keep-only views and detox-only views of held-out rows.
    let val_keep: Vec<FusedExample> = val_ex
        .iter()
        .filter(|e| !e.keep.is_empty())
        .take(cfg.val_rows)
        .map(|e| e.keep_only())
        .collect();
    let val_detox: Vec<FusedExample> = val_ex
        .iter()
        .filter(|e| !e.detox.is_empty())
        .take(cfg.val_rows)
        .map(|e| e.detox_only())
        .collect();

    let target = FrozenTarget {
        model: inputs.target,
        head: crate::lm::head_weight(inputs.target_path)?,
    };
    let pad = (inputs.target_tok.eos.unwrap_or(0), tok.eos.unwrap_or(0));
    // The teacher's experts read the target's ids, so they need its vocabulary.
    let load_expert = |dir: &Path, what: &str| {
        crate::fuse::load_with_target_vocab(
            dir,
            inputs.target_tok,
            inputs.target_path,
            &format!("the teacher's {what}"),
            "Pass --teacher-expert and --teacher-anti-expert trained from the target (calibrate --recipe paper)",
        )
    };
    let (experts, teacher_sha256) = match &cfg.teacher {
        None => (None, None),
        Some(t) => (
            Some((
                load_expert(&t.expert, "expert")?,
                load_expert(&t.anti_expert, "anti-expert")?,
            )),
            Some((
                crate::fetch::sha256_weights(&t.expert)?,
                crate::fetch::sha256_weights(&t.anti_expert)?,
            )),
        ),
    };
    let teacher = experts
        .as_ref()
        .zip(cfg.teacher.as_ref())
        .map(|((e, a), t)| Teacher {
            expert: e.as_ref(),
            anti_expert: a.as_ref(),
            beta: t.beta,
        });
    let (cal, shared_sha256) = match inputs.shared {
        None => (
            inputs
                .base
                .init(cfg.layers, Default::default())?
                .with_layer_training(cfg.layer_training, cfg.seed)?,
            None,
        ),
        Some(dir) => {
            let (cal, sha) = shared_calibration(dir, inputs.base)?;
            if cal.config.num_hidden_layers != cfg.layers {
                return Err(Error::Input(format!(
                    "the calibration in {} has {} layers but --layers is {}",
                    dir.display(),
                    cal.config.num_hidden_layers,
                    cfg.layers
                )));
            }
            if cfg.layer_training == LayerTraining::Full {
                return Err(Error::Input(format!(
                    "--shared {} keeps the calibration layers as they are for every target: train this target's own adapters over them (--layer-training lora) or only its map (--layer-training frozen)",
                    dir.display()
                )));
            }
            // Lora: adapters of this target's own over the shared layers, saved beside its map.
            (
                cal.with_layer_training(cfg.layer_training, cfg.seed)?,
                Some(sha),
            )
        }
    };
    let init_rows: Vec<&FusedExample> = super::lens::sample(&keep, cfg.init_rows);
    let map0 = init_map(
        &cal,
        &target,
        &init_rows,
        pad,
        cfg.init_ridge,
        cfg.fusion_norm,
    )?;
    let fv = FusionVars::new(&map0)?;
    let mut vars = cal.vars().clone();
    fv.insert_into(&mut vars);
    let mut opt_cfg = cfg.optim;
    opt_cfg.total_steps = cfg.steps;
    let mut opt = AdamW::new(opt_cfg, &vars)?;
    let samples_sha256 = crate::fetch::sha256_path(inputs.samples)?;
    let mut state = FusedRecord {
        step: 0,
        keep_epoch: 0,
        keep_pos: 0,
        detox_epoch: 0,
        detox_pos: 0,
        file: String::new(),
        config: cfg.clone(),
        base_sha256: inputs.base.sha256.clone(),
        target_sha256: inputs.target_sha256.clone(),
        samples_sha256,
        shared_sha256,
        teacher_sha256,
    };
    let log_path = out.join("log.jsonl");
    if resume {
        let text = std::fs::read_to_string(&record_path).map_err(|e| {
            Error::Input(format!(
                "--resume: cannot read {} ({e}); run without --resume to start",
                record_path.display()
            ))
        })?;
        let rec: FusedRecord = serde_json::from_str(&text).map_err(|e| {
            Error::Input(format!(
                "--resume: {} is damaged: {e}",
                record_path.display()
            ))
        })?;
        let same = rec.config == state.config
            && rec.base_sha256 == state.base_sha256
            && rec.target_sha256 == state.target_sha256
            && rec.samples_sha256 == state.samples_sha256
            && rec.shared_sha256 == state.shared_sha256
            && rec.teacher_sha256 == state.teacher_sha256;
        if !same {
            return Err(Error::Input(format!(
                "--resume: the run in {} was made with other options, models or data; pass the same ones or choose another --out",
                out.display()
            )));
        }
        super::checkpoint::load_state(&out.join(&rec.file), &vars, &mut opt, rec.step)?;
        state = rec;
    }
    let mut log = super::checkpoint::open_log(&log_path, resume.then_some(state.step))?;
    let mut write_log = |v: &serde_json::Value| log.append(v);
    progress(FusedEvent::Start {
        step: state.step,
        steps: cfg.steps,
        keep_rows: keep.len(),
        detox_rows: detox.len(),
        trainable_params: vars.values().map(|v| v.elem_count()).sum(),
        stats: &stats,
    });

    // Target states of the validation rows are fixed: computed once.
    let val_batches: Vec<(FusedBatch, Tensor)> = [&val_keep, &val_detox]
        .into_iter()
        .flat_map(|set| {
            set.chunks(32)
                .map(|c| c.iter().collect::<Vec<_>>())
                .collect::<Vec<_>>()
        })
        .map(|rows| {
            let b = make_batch(&rows, &vec![0.0; rows.len()], pad, DType::F32)?;
            let ht = target.hidden_at(&b.ids, &b.positions)?;
            Ok((b, ht))
        })
        .collect::<Result<_>>()?;
    let validate = |step: usize| -> Result<serde_json::Value> {
        let map = fv.map();
        let mut line = serde_json::json!({"step": step});
        for &alpha in std::iter::once(&0.0).chain(&cfg.val_alphas) {
            let mut sums = TermSums::default();
            for (b, ht) in &val_batches {
                let b = b.at_alpha(alpha)?;
                sums.add(
                    batch_objective(&cal, &map, ht, &target.head, &b, None, cfg.keep_divergence)?.0,
                );
            }
            line[format!("a{alpha}")] = serde_json::json!({
                "kl": sums.mean_kl(), "reverse_kl": sums.mean_reverse_kl(),
                "toxic_prob": sums.mean_toxic_prob(),
                "unlikelihood": sums.mean_unlikelihood(),
                "keep_positions": sums.keep, "detox_positions": sums.detox,
            });
        }
        Ok(line)
    };
    let mut last_val = serde_json::Value::Null;
    if state.step == 0 && !val_batches.is_empty() {
        last_val = validate(0)?;
        write_log(&last_val)?;
        progress(FusedEvent::Validation(&last_val));
    }
    let t_start = Instant::now();
    const KEEP_STREAM: u64 = 0x6b65_6570; // "keep"
    const DETOX_STREAM: u64 = 0x0064_6574_6f78; // "detox"
    while state.step < cfg.steps {
        let t0 = Instant::now();
        let ki = take_rows(
            keep.len(),
            cfg.keep_rows,
            cfg.seed,
            KEEP_STREAM,
            &mut state.keep_epoch,
            &mut state.keep_pos,
        );
        let di = take_rows(
            detox.len(),
            cfg.detox_rows,
            cfg.seed,
            DETOX_STREAM,
            &mut state.detox_epoch,
            &mut state.detox_pos,
        );
        // Keep rows train only their keep positions, detox rows only their toxic tokens (and,
        // under a teacher, its distribution along their continuations).
        let rows: Vec<FusedExample> = ki
            .iter()
            .map(|&i| keep[i].keep_only())
            .chain(di.iter().map(|&i| {
                if teacher.is_some() {
                    detox[i].with_teacher()
                } else {
                    detox[i].detox_only()
                }
            }))
            .collect();
        let alphas: Vec<f64> = (0..rows.len())
            .map(|r| row_alpha(cfg, state.step, r))
            .collect();
        let refs: Vec<&FusedExample> = rows.iter().collect();
        let mut batch = make_batch(&refs, &alphas, pad, DType::F32)?;
        if let Some(t) = &teacher {
            batch.teacher = teacher_logits(t, &batch)?;
        }
        let ht = target.hidden_at(&batch.ids, &batch.positions)?;
        let (sums, grads) = batch_objective(
            &cal,
            &fv.map(),
            &ht,
            &target.head,
            &batch,
            Some(cfg.weights()),
            cfg.keep_divergence,
        )?;
        let grads = grads.expect("gradients were asked for");
        if ![sums.kl, sums.reverse_kl, sums.unlikelihood, sums.teach_kl]
            .iter()
            .all(|x| x.is_finite())
        {
            return Err(Error::Input(format!(
                "the loss became non-finite at step {}; lower --lr (the last checkpoint is intact)",
                state.step + 1
            )));
        }
        let info = opt.step(&vars, &grads)?;
        state.step += 1;
        let entry = FusedStepLog {
            step: state.step,
            kl: sums.mean_kl(),
            reverse_kl: sums.mean_reverse_kl(),
            unlikelihood: sums.mean_unlikelihood(),
            toxic_prob: sums.mean_toxic_prob(),
            teach_kl: (sums.teach > 0).then(|| sums.mean_teach_kl()),
            lr: info.lr,
            grad_norm: info.grad_norm,
            positions: batch.positions.len(),
            seconds: t0.elapsed().as_secs_f64(),
        };
        write_log(&serde_json::to_value(&entry)?)?;
        progress(FusedEvent::Step(&entry));
        let last = state.step == cfg.steps;
        if (cfg.eval_every > 0 && state.step.is_multiple_of(cfg.eval_every) || last)
            && !val_batches.is_empty()
        {
            last_val = validate(state.step)?;
            write_log(&last_val)?;
            progress(FusedEvent::Validation(&last_val));
        }
        if cfg.checkpoint_every > 0 && state.step.is_multiple_of(cfg.checkpoint_every) || last {
            let previous = std::mem::take(&mut state.file);
            state.file = super::checkpoint::save_state(out, state.step, &vars, &opt)?;
            super::checkpoint::commit_record(out, &state, &previous, &state.file)?;
            progress(FusedEvent::Checkpoint { step: state.step });
        }
    }
    let artifact = inputs.artifact.clone();
    let manifest = serde_json::json!({
        "steps": state.step,
        "config": cfg,
        "data": {"samples": inputs.samples, "sha256": state.samples_sha256, "stats": stats},
        "validation": last_val,
    });
    save_artifact(
        &artifact,
        inputs.base,
        (&cal, inputs.shared.is_some()),
        &fv.map(),
        inputs.target_path,
        &inputs.target_sha256,
        &manifest,
    )?;
    Ok(FusedSummary {
        steps: state.step,
        seconds: t_start.elapsed().as_secs_f64(),
        stats,
        final_validation: last_val,
        artifact,
    })
}

// ---------------------------------------------------------------------------------------
// The artifact: shared calibration part + one map per target.

/// The file stem a target's map is saved under.
pub fn target_key(target_path: &Path) -> String {
    target_path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "target".into())
}

/// The file a target's own adapters are saved in, beside its map.
fn adapters_file(key: &str) -> String {
    format!("{key}.adapters.safetensors")
}

/// Writes the map for one target and what `cal` trained, each with a manifest naming the
/// sha256 of what it was made from. With `shared` false, what `cal` trained is the shared
/// calibration part (written when it trained anything, or when there is none yet); with
/// `shared` true, the shared part is left as it is and what `cal` trained (adapters over the
/// shared layers, if any) is this target's own, saved beside its map.
pub fn save_artifact(
    dir: &Path,
    base: &Base,
    (cal, shared): (&CalibrationModel, bool),
    map: &FusionMap,
    target_path: &Path,
    target_sha256: &str,
    train_manifest: &serde_json::Value,
) -> Result<()> {
    std::fs::create_dir_all(dir.join("targets")).ctx(|| format!("creating {}", dir.display()))?;
    let trained: HashMap<String, Tensor> = cal
        .vars()
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().to_dtype(DType::F16)?)))
        .collect::<Result<_>>()?;
    let tensors_path = dir.join(CALIBRATION_TENSORS);
    let manifest_path = dir.join(CALIBRATION_MANIFEST);
    let key = target_key(target_path);
    let own_adapters = (shared && !trained.is_empty()).then(|| adapters_file(&key));
    if let Some(file) = &own_adapters {
        crate::atomic::write_safetensors(&dir.join("targets").join(file), &trained)?;
    }
    let cal_manifest = if !shared && (!trained.is_empty() || !manifest_path.exists()) {
        crate::atomic::write_safetensors(&tensors_path, &trained)?;
        let m = serde_json::json!({
            "kind": "detoxfuse fused calibration",
            "detoxfuse_version": env!("CARGO_PKG_VERSION"),
            "base": {"file": base.path.file_name().map(|n| n.to_string_lossy()), "sha256": base.sha256},
            "layers": cal.config.num_hidden_layers,
            "tensors": CALIBRATION_TENSORS,
            "tensors_sha256": crate::fetch::sha256_path(&tensors_path)?,
            "trained_by": train_manifest,
        });
        write_json(&manifest_path, &m)?;
        m
    } else {
        read_json(&manifest_path)?
    };
    let map_path = dir.join("targets").join(format!("{key}.safetensors"));
    map.save(&map_path)?;
    let mut m = serde_json::json!({
        "target": {"file": target_path.file_name().map(|n| n.to_string_lossy()), "sha256": target_sha256},
        "calibration_tensors_sha256": cal_manifest["tensors_sha256"],
        "map": format!("{key}.safetensors"),
        "map_sha256": crate::fetch::sha256_path(&map_path)?,
        "dims": map.dims()?,
        "norm": map.norm,
        "trained_by": train_manifest,
    });
    if let Some(file) = own_adapters {
        m["adapters_sha256"] = crate::fetch::sha256_path(&dir.join("targets").join(&file))?.into();
        m["adapters"] = file.into();
    }
    write_json(&dir.join("targets").join(format!("{key}.json")), &m)
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    crate::atomic::write(path, serde_json::to_string_pretty(v)?.as_bytes())
}

fn read_json(p: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(p).map_err(|e| {
        Error::Input(format!(
            "{} is missing or unreadable ({e}): not a fused calibration directory; train one with `detoxfuse calibrate --recipe fused`",
            p.display()
        ))
    })?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Input(format!("{} is damaged ({e}); restore it", p.display())))
}

fn check_sha(path: &Path, want: &serde_json::Value, what: &str) -> Result<()> {
    check_digest(path, &crate::fetch::sha256_path(path)?, want, what)
}

/// [`check_sha`] with the file's sha256 already computed.
fn check_digest(path: &Path, got: &str, want: &serde_json::Value, what: &str) -> Result<()> {
    if want.as_str() != Some(got) {
        return Err(Error::Input(format!(
            "{what} {} has sha256 {got} but the manifest expects {want}: the file is corrupt or from another run; restore it or retrain",
            path.display()
        )));
    }
    Ok(())
}

/// The calibration model of an artifact directory, nothing trainable: `base`'s first layers
/// with the stored trained part folded in (LoRA deltas added, trained layer weights
/// replacing the base's), checked against the manifest's sha256 of base and tensors. Also
/// returns the tensors' sha256.
pub fn shared_calibration(dir: &Path, base: &Base) -> Result<(CalibrationModel, String)> {
    let manifest = read_json(&dir.join(CALIBRATION_MANIFEST))?;
    let tensors_path = dir.join(CALIBRATION_TENSORS);
    check_sha(
        &tensors_path,
        &manifest["tensors_sha256"],
        "calibration tensors",
    )?;
    if manifest["base"]["sha256"].as_str() != Some(base.sha256.as_str()) {
        return Err(Error::Input(format!(
            "the calibration in {} was trained from a base with sha256 {} but {} has {}; pass that base",
            dir.display(),
            manifest["base"]["sha256"],
            base.path.display(),
            base.sha256
        )));
    }
    let layers = manifest["layers"].as_u64().unwrap_or(0) as usize;
    let trained = load_f32(&tensors_path)?;
    let cal = base
        .init(layers, Default::default())?
        .with_layer_training(LayerTraining::Frozen, 0)?
        .with_frozen_trained(&trained)
        .map_err(|e| Error::Input(format!("{}: {e}", tensors_path.display())))?;
    let sha = manifest["tensors_sha256"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    Ok((cal, sha))
}

/// A stored trained part's tensors, in f32.
fn load_f32(path: &Path) -> Result<HashMap<String, Tensor>> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
        Error::Input(format!(
            "{} is unreadable ({e}); restore it",
            path.display()
        ))
    })?;
    tensors
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
        .collect()
}

/// A loaded fused calibration for one target.
pub struct FusedArtifact {
    /// The calibration model (base layers with the trained part folded in), f32.
    pub calibration: crate::lm::export::HfLlama,
    pub map: FusionMap,
    pub manifest: serde_json::Value,
    pub target_manifest: serde_json::Value,
}

/// Reads an artifact directory for `target_path`, rebuilding the calibration model from
/// `base_path` (a GGUF whose sha256 must match the manifest) and the stored trained part.
pub fn load_artifact(dir: &Path, base_path: &Path, target_path: &Path) -> Result<FusedArtifact> {
    let manifest = read_json(&dir.join(CALIBRATION_MANIFEST))?;
    let key = target_key(target_path);
    let tm_path = dir.join("targets").join(format!("{key}.json"));
    let target_manifest = read_json(&tm_path).map_err(|_| {
        Error::Input(format!(
            "{} has no fusion map for target {key} ({} is missing); train one with `detoxfuse calibrate --recipe fused --target {} --shared {}`",
            dir.display(),
            tm_path.display(),
            target_path.display(),
            dir.display()
        ))
    })?;
    let map_path = dir.join("targets").join(format!("{key}.safetensors"));
    check_sha(&map_path, &target_manifest["map_sha256"], "fusion map")?;
    if target_manifest["calibration_tensors_sha256"] != manifest["tensors_sha256"] {
        return Err(Error::Input(format!(
            "the fusion map {} was trained over other calibration layers than {} holds; retrain it",
            map_path.display(),
            dir.display()
        )));
    }
    let layers = manifest["layers"].as_u64().unwrap_or(0) as usize;
    let base = Base::load(base_path, layers)?;
    // The target is often the base itself (SmolLM2): its file is hashed once.
    let target_sha256 = if target_path == base_path {
        base.sha256.clone()
    } else {
        crate::fetch::sha256_path(target_path)?
    };
    check_digest(
        target_path,
        &target_sha256,
        &target_manifest["target"]["sha256"],
        "target model",
    )?;
    let (mut cal, _) = shared_calibration(dir, &base)?;
    if let Some(file) = target_manifest["adapters"].as_str() {
        let path = dir.join("targets").join(file);
        check_sha(
            &path,
            &target_manifest["adapters_sha256"],
            "target adapters",
        )?;
        let adapters = load_f32(&path)?;
        cal = cal
            .with_frozen_trained(&adapters)
            .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
    }
    let tensors = cal.merged_tensors()?;
    let mut map = FusionMap::load(&map_path)?;
    // Maps written before the field existed were trained with the paper's formula.
    if let Some(norm) = target_manifest.get("norm") {
        map.norm = serde_json::from_value(norm.clone()).map_err(|e| {
            Error::Input(format!(
                "{}: unknown \"norm\" {norm} ({e}); this build reads paper and keep_target_norm",
                tm_path.display()
            ))
        })?;
    }
    let (dc, _) = map.dims()?;
    if dc != cal.config.hidden_size {
        return Err(Error::Input(format!(
            "fusion map {} maps width {dc} but the calibration model is {} wide; retrain it",
            map_path.display(),
            cal.config.hidden_size
        )));
    }
    let calibration = crate::lm::export::HfLlama {
        config: cal.config.clone(),
        tensors,
        tokenizer: base.model.tokenizer.clone(),
    };
    Ok(FusedArtifact {
        calibration,
        map,
        manifest,
        target_manifest,
    })
}
