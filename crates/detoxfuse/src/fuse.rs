//! Step 3 of the method: the fused decoder.
//!
//! At every step `h = alpha · LayerNorm(h_cal · A) + (1 − alpha) · h_target` (LayerNorm
//! without parameters in the paper's recipe, with a learned affine in the fusion-aware one,
//! and optionally rescaled to the target state's RMS: [`FusionMap`], [`FusionNorm`]), and the
//! logits come from the target's LM head. The calibration model
//! keeps its own KV cache and always reads exactly the text the target has read (defect D1
//! fixed); it never computes an LM head (D7). Any widths work (D4).
//!
//! When both models share a tokenizer the calibration model is fed the target's ids. Otherwise
//! (D2) each row keeps the text so far as bytes; after each target token the calibration
//! tokenizer re-encodes the text, the calibration cache is rolled back to where the new ids
//! stop agreeing with the old ones, and only the changed tail is run again. Bytes of an
//! unfinished UTF-8 character wait until the character is complete.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};

use crate::error::{Error, Result};
use crate::generate::{rows_of, Decoder};
use crate::lm::{ids_tensor, take_rows, CausalLm, KvCache, TokenId};
use crate::text::Tokenizer;

/// The calibration tokenizer's reading of a byte stream that grows by the target's tokens
/// (cross-tokenizer fusion). A target token may end inside a UTF-8 character, and a longer
/// text may tokenize differently at its end, so each push re-encodes the complete-UTF-8
/// prefix and says how many of the previous ids still stand: the calibration model's cache
/// rolls back to there.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CrossText {
    text: Vec<u8>,
    ids: Vec<TokenId>,
}

impl CrossText {
    /// The calibration ids of the complete-UTF-8 prefix read so far.
    pub fn ids(&self) -> &[TokenId] {
        &self.ids
    }

    /// The bytes read so far (possibly ending inside a character).
    pub fn bytes(&self) -> &[u8] {
        &self.text
    }

    /// Appends `bytes`. `None`: the ids did not change. `Some(keep)`: the first `keep` ids
    /// stand and `ids()[keep..]` (never empty) are new, to be run through the calibration
    /// model.
    pub fn push(&mut self, tok: &Tokenizer, bytes: &[u8]) -> Result<Option<usize>> {
        self.text.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.text) {
            Ok(s) => s,
            Err(e) => std::str::from_utf8(&self.text[..e.valid_up_to()]).expect("valid prefix"),
        };
        let ids = tok.encode(valid, false)?;
        if ids == self.ids {
            return Ok(None);
        }
        let mut keep = self
            .ids
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count();
        if keep == ids.len() {
            // The text grew but its tokens shrank to a prefix: recompute the last one.
            keep = keep.saturating_sub(1);
        }
        self.ids = ids;
        Ok((!self.ids.is_empty()).then_some(keep))
    }
}

/// The calibration model's side of a fused decoder.
struct Calibration<'m> {
    model: &'m dyn CausalLm,
    /// `A` (`d_cal × d_target`), the LayerNorm's affine parameters and the scaling rule.
    map: FusionMap,
    /// (target tokenizer, calibration tokenizer) when they differ: the cross-tokenizer path.
    cross: Option<(&'m Tokenizer, &'m Tokenizer)>,
}

/// The calibration model's state for the fused rows (α > 0) of the batch, in row order.
struct CalRows {
    /// One row per fused batch row; rows may differ in length (they joined at different
    /// times, or, across tokenizers, read different numbers of calibration tokens).
    cache: KvCache,
    /// Cross-tokenizer path: each fused row's text and calibration ids (empty otherwise).
    texts: Vec<CrossText>,
    /// Cross-tokenizer path: each fused row's last hidden state `(rows, d_cal)` (a target token
    /// that ends inside a character leaves it as it was).
    hidden: Option<Tensor>,
}

impl CalRows {
    fn new(n_layers: usize) -> Self {
        Self {
            cache: KvCache::new(n_layers),
            texts: Vec::new(),
            hidden: None,
        }
    }

    /// Keeps the listed fused rows.
    fn select(&mut self, keep: &[usize]) -> Result<()> {
        self.cache.select_rows(keep)?;
        if !self.texts.is_empty() {
            self.texts = keep.iter().map(|&r| self.texts[r].clone()).collect();
        }
        self.hidden = match (&self.hidden, keep.is_empty()) {
            (Some(h), false) => Some(take_rows(h, keep)?),
            _ => None,
        };
        Ok(())
    }

    /// Adds rows read apart (a batch-1 cache made `n` rows by the caller).
    fn append(
        &mut self,
        cache: KvCache,
        text: Option<CrossText>,
        hidden: Option<Tensor>,
        n: usize,
    ) -> Result<()> {
        self.cache.append_rows(cache)?;
        self.texts
            .extend(text.into_iter().flat_map(|t| std::iter::repeat_n(t, n)));
        if let Some(h) = hidden {
            let h = h.repeat((n, 1))?;
            self.hidden = Some(match self.hidden.take() {
                Some(old) => Tensor::cat(&[old, h], 0)?,
                None => h,
            });
        }
        Ok(())
    }
}

/// A prompt read on its own before its rows join a running batch ([`FusedDecoder::begin`],
/// [`FusedDecoder::prefill_some`], [`FusedDecoder::join`]): long prompts are read a chunk at
/// a time, between the decode steps of the rows already running.
pub struct Prefill {
    ids: Vec<TokenId>,
    read: usize,
    alpha: f64,
    tcache: KvCache,
    /// Same tokenizer and α > 0: the calibration model reads the prompt alongside.
    ccache: Option<KvCache>,
    /// Last hidden states so far (target, calibration).
    ht: Option<Tensor>,
    hc: Option<Tensor>,
}

impl Prefill {
    /// Prompt tokens not read yet.
    pub fn remaining(&self) -> usize {
        self.ids.len() - self.read
    }
}

/// How the fused state is scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum FusionNorm {
    /// The paper's formula as is.
    #[default]
    Paper,
    /// The paper's formula, then each row rescaled to the target state's RMS. Not in the
    /// paper: `(1 − alpha)·h_t` plus a nearly orthogonal unit-variance vector is a shorter
    /// vector, which the LM head turns into a flatter (higher-temperature) distribution
    /// (`examples/fusion_scale.rs`); this keeps only the change of direction.
    KeepTargetNorm,
}

/// Rescales each row of `h` to the RMS of the same row of `h_target`.
pub fn keep_norm(h: &Tensor, h_target: &Tensor) -> Result<Tensor> {
    let rms = |x: &Tensor| -> Result<Tensor> { Ok(x.sqr()?.mean_keepdim(D::Minus1)?.sqrt()?) };
    Ok(h.broadcast_mul(&(rms(h_target)? / (rms(h)? + 1e-12)?)?)?)
}

/// Target + calibration model, fused before the target's LM head.
///
/// One decoder holds a batch of rows, each with its own α (0: the untouched target, and
/// then no calibration work for that row). Through [`Decoder`] it decodes one prompt's
/// samples at one α; for continuous batching ([`crate::serving`]) prompts are read apart
/// ([`FusedDecoder::begin`]) and join the running batch at any step ([`FusedDecoder::join`]),
/// and finished rows leave ([`Decoder::retain_rows`]).
pub struct FusedDecoder<'m> {
    target: &'m dyn CausalLm,
    /// `None`: only the plain target (every row at α 0).
    cal: Option<Calibration<'m>>,
    /// The α of [`Decoder::prefill`].
    alpha: f64,
    tcache: KvCache,
    /// Each batch row's α.
    alphas: Vec<f64>,
    crows: CalRows,
}

/// Parameter-free LayerNorm over the last dimension (eps 1e-5), from elementary ops so that
/// training can differentiate it (candle's fused `LayerNorm` has no backward pass).
pub fn layer_norm(x: &Tensor) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let c = x.broadcast_sub(&mean)?;
    let var = c.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(c.broadcast_div(&(var + 1e-5)?.sqrt()?)?)
}

/// `alpha · LN(h_cal · A) + (1 − alpha) · h_target` for `(b, d)` rows.
pub fn fuse(h_target: &Tensor, h_cal: &Tensor, a: &Tensor, alpha: f64) -> Result<Tensor> {
    FusionMap::paper(a)?.fuse(h_target, h_cal, alpha)
}

/// The per-target part of a fused calibration: `A` (`d_cal × d_target`) and the LayerNorm's
/// affine parameters (`d_target` each).
#[derive(Debug, Clone)]
pub struct FusionMap {
    pub a: Tensor,
    pub gamma: Tensor,
    pub beta: Tensor,
    /// How the fused state is scaled; a map trained through one rule is used with that rule.
    pub norm: FusionNorm,
}

pub const MAP_A: &str = "fusion.a";
pub const MAP_GAMMA: &str = "fusion.gamma";
pub const MAP_BETA: &str = "fusion.beta";

impl FusionMap {
    /// The paper's map: `A` and a LayerNorm without parameters (`γ = 1`, `β = 0`).
    pub fn paper(a: &Tensor) -> Result<Self> {
        let dt = a.dim(1)?;
        Ok(Self {
            gamma: Tensor::ones(dt, a.dtype(), a.device())?,
            beta: Tensor::zeros(dt, a.dtype(), a.device())?,
            a: a.clone(),
            norm: FusionNorm::Paper,
        })
    }

    /// `γ ⊙ LN(h_c·A) + β` for `(n, d_cal)` rows.
    pub fn mapped(&self, h_cal: &Tensor) -> Result<Tensor> {
        let u = layer_norm(&h_cal.matmul(&self.a)?)?;
        Ok(u.broadcast_mul(&self.gamma)?.broadcast_add(&self.beta)?)
    }

    /// `α·mapped + (1 − α)·h_t` with one α per row (`alpha`: `(n, 1)`), then the map's
    /// [`FusionNorm`].
    pub fn fuse_rows(&self, h_target: &Tensor, h_cal: &Tensor, alpha: &Tensor) -> Result<Tensor> {
        let m = self.mapped(h_cal)?;
        let one_minus = alpha.affine(-1.0, 1.0)?;
        self.scaled(
            (m.broadcast_mul(alpha)? + h_target.broadcast_mul(&one_minus)?)?,
            h_target,
        )
    }

    /// `α·mapped + (1 − α)·h_t` with one α for all rows (the decoder's rule), then the map's
    /// [`FusionNorm`].
    pub fn fuse(&self, h_target: &Tensor, h_cal: &Tensor, alpha: f64) -> Result<Tensor> {
        let m = self.mapped(h_cal)?;
        self.scaled(((m * alpha)? + (h_target * (1.0 - alpha))?)?, h_target)
    }

    /// [`FusionMap::fuse`] with one α per row (a batch whose requests asked for different
    /// strengths). Rows at the same α get exactly what [`FusionMap::fuse`] gives them: α and
    /// 1 − α are taken in f64, then rounded, as the scalar rule does.
    pub fn fuse_per_row(
        &self,
        h_target: &Tensor,
        h_cal: &Tensor,
        alphas: &[f64],
    ) -> Result<Tensor> {
        match alphas {
            [] => Ok(h_target.clone()),
            [a, rest @ ..] if rest.iter().all(|b| b == a) => self.fuse(h_target, h_cal, *a),
            _ => {
                let column = |f: &dyn Fn(f64) -> f64| {
                    let v: Vec<f32> = alphas.iter().map(|&a| f(a) as f32).collect();
                    Tensor::from_vec(v, (alphas.len(), 1), &Device::Cpu)
                };
                let m = self.mapped(h_cal)?;
                let h = (m.broadcast_mul(&column(&|a| a)?)?
                    + h_target.broadcast_mul(&column(&|a| 1.0 - a)?)?)?;
                self.scaled(h, h_target)
            }
        }
    }

    fn scaled(&self, h: Tensor, h_target: &Tensor) -> Result<Tensor> {
        match self.norm {
            FusionNorm::Paper => Ok(h),
            FusionNorm::KeepTargetNorm => keep_norm(&h, h_target),
        }
    }

    /// (d_cal, d_target).
    pub fn dims(&self) -> Result<(usize, usize)> {
        Ok(self.a.dims2()?)
    }

    fn check(&self) -> Result<()> {
        let (_, dt) = self.dims()?;
        if self.gamma.dims() != [dt] || self.beta.dims() != [dt] {
            return Err(Error::Input(format!(
                "fusion map: A maps to width {dt} but gamma is {:?} and beta {:?}",
                self.gamma.dims(),
                self.beta.dims()
            )));
        }
        Ok(())
    }

    /// Reads a map written by [`FusionMap::save`], in f32, with the paper's scaling (the
    /// artifact's manifest says when it is another).
    pub fn load(path: &Path) -> Result<Self> {
        let t = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
            Error::Input(format!(
                "fusion map {} is unreadable ({e}); retrain it with `detoxfuse calibrate --recipe fused`",
                path.display()
            ))
        })?;
        let get = |k: &str| -> Result<Tensor> {
            Ok(t.get(k)
                .ok_or_else(|| {
                    Error::Input(format!(
                        "fusion map {} lacks tensor {k}; retrain it with `detoxfuse calibrate --recipe fused`",
                        path.display()
                    ))
                })?
                .to_dtype(DType::F32)?)
        };
        let m = Self {
            a: get(MAP_A)?,
            gamma: get(MAP_GAMMA)?,
            beta: get(MAP_BETA)?,
            norm: FusionNorm::Paper,
        };
        m.check()
            .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
        Ok(m)
    }

    /// Writes the map in f16 (temporary file, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let t: HashMap<String, Tensor> = [
            (MAP_A, &self.a),
            (MAP_GAMMA, &self.gamma),
            (MAP_BETA, &self.beta),
        ]
        .into_iter()
        .map(|(k, v)| Ok((k.to_string(), v.to_dtype(DType::F16)?)))
        .collect::<Result<_>>()?;
        crate::atomic::write_safetensors(path, &t)
    }
}

/// True when two tokenizers map every text to the same ids (same vocabulary and rules).
pub fn same_tokenizer(a: &Tokenizer, b: &Tokenizer) -> bool {
    a.vocab_size() == b.vocab_size()
        && a.kind() == b.kind()
        && a.bos == b.bos
        && a.add_bos == b.add_bos
        && (0..a.vocab_size() as TokenId).all(|i| a.piece(i) == b.piece(i))
}

/// Loads the model in `dir` for a role that reads the target's token ids (a DExperts expert or
/// anti-expert, a teacher's), refusing it unless its tokenizer is the target's: `role` names it
/// in the error ("the DExperts baseline's anti-expert"), `target` is the target's path and
/// `advice` what the user can do instead.
pub fn load_with_target_vocab(
    dir: &Path,
    target_tok: &Tokenizer,
    target: &Path,
    role: &str,
    advice: &str,
) -> Result<Box<dyn CausalLm>> {
    let tok = Tokenizer::for_model(dir)?;
    if !same_tokenizer(&tok, target_tok) {
        return Err(Error::Input(format!(
            "{role} {} has another vocabulary than the target {}: it reads the target's token ids, \
             so it must be trained from the target's tokenizer. {advice}",
            dir.display(),
            target.display()
        )));
    }
    crate::lm::load(dir)
}

impl<'m> FusedDecoder<'m> {
    /// `cross` holds (target tokenizer, calibration tokenizer) when they differ (see
    /// [`same_tokenizer`]); `None` takes the direct path.
    pub fn new(
        target: &'m dyn CausalLm,
        cal: &'m dyn CausalLm,
        a: &Tensor,
        alpha: f64,
        cross: Option<(&'m Tokenizer, &'m Tokenizer)>,
    ) -> Result<Self> {
        Self::with_map(
            target,
            cal,
            FusionMap::paper(&a.to_dtype(DType::F32)?)?,
            alpha,
            cross,
        )
    }

    /// [`FusedDecoder::new`] with a trained map (LayerNorm with affine parameters).
    pub fn with_map(
        target: &'m dyn CausalLm,
        cal: &'m dyn CausalLm,
        map: FusionMap,
        alpha: f64,
        cross: Option<(&'m Tokenizer, &'m Tokenizer)>,
    ) -> Result<Self> {
        check_alpha(alpha)?;
        let (dc, dt) = map.dims()?;
        let (wc, wt) = (cal.info().hidden_size, target.info().hidden_size);
        if (dc, dt) != (wc, wt) {
            return Err(Error::Input(format!(
                "alignment A is {dc} x {dt} but the calibration model is {wc} wide and the target {wt}; run `detoxfuse align` for this pair"
            )));
        }
        Ok(Self {
            alpha,
            crows: CalRows::new(cal.info().n_layers),
            cal: Some(Calibration {
                model: cal,
                map,
                cross,
            }),
            ..Self::plain(target)
        })
    }

    /// The target alone: every row at α 0 (a server without a calibration model).
    pub fn plain(target: &'m dyn CausalLm) -> Self {
        Self {
            target,
            cal: None,
            alpha: 0.0,
            tcache: target.new_cache(),
            alphas: Vec::new(),
            crows: CalRows::new(0),
        }
    }

    /// `KeepTargetNorm` rescales every fused state to the target state's RMS whatever the
    /// map was trained with (eval's `fusednorm` rows); `Paper` keeps the map's own rule (a
    /// map trained with the norm kept is always used with it).
    pub fn with_norm(mut self, norm: FusionNorm) -> Self {
        if let (FusionNorm::KeepTargetNorm, Some(c)) = (norm, self.cal.as_mut()) {
            c.map.norm = norm;
        }
        self
    }

    /// Rows in the batch.
    pub fn rows(&self) -> usize {
        self.alphas.len()
    }

    /// The calibration model's ids for each fused row (cross-tokenizer path; empty otherwise).
    pub fn calibration_ids(&self) -> Vec<Vec<TokenId>> {
        self.crows.texts.iter().map(|t| t.ids().to_vec()).collect()
    }

    /// Starts reading `prompt` apart from the batch, for rows at `alpha`.
    pub fn begin(&self, prompt: &[TokenId], alpha: f64) -> Result<Prefill> {
        check_alpha(alpha)?;
        if prompt.is_empty() {
            return Err(Error::Input("the prompt has no tokens".into()));
        }
        let shared_cal = match (&self.cal, alpha > 0.0) {
            (_, false) => None,
            (None, true) => {
                return Err(Error::Input(format!(
                "alpha {alpha} needs a calibration model, and this decoder has none: use alpha 0"
            )))
            }
            (Some(c), true) => c.cross.is_none().then(|| c.model.new_cache()),
        };
        Ok(Prefill {
            ids: prompt.to_vec(),
            read: 0,
            alpha,
            tcache: self.target.new_cache(),
            ccache: shared_cal,
            ht: None,
            hc: None,
        })
    }

    /// Reads up to `budget` more of `p`'s prompt; returns how many tokens it read.
    pub fn prefill_some(&self, p: &mut Prefill, budget: usize) -> Result<usize> {
        let n = budget.min(p.remaining());
        if n == 0 {
            return Ok(0);
        }
        let chunk = ids_tensor(&[p.ids[p.read..p.read + n].to_vec()])?;
        p.ht = Some(last(&self.target.forward_hidden(&chunk, &mut p.tcache)?)?);
        if let (Some(c), Some(cache)) = (&self.cal, p.ccache.as_mut()) {
            p.hc = Some(last(&c.model.forward_hidden(&chunk, cache)?)?);
        }
        p.read += n;
        Ok(n)
    }

    /// Adds a fully read prompt to the end of the batch as `n` rows (its samples) and returns
    /// the next-token logits they share.
    pub fn join(&mut self, p: Prefill, n: usize) -> Result<Vec<f32>> {
        let (Some(ht), 0) = (p.ht, p.ids.len() - p.read) else {
            return Err(Error::Input(
                "a prompt joins the batch only once it is read (FusedDecoder::prefill_some)".into(),
            ));
        };
        if n == 0 {
            return Err(Error::Input("a prompt joins as at least one row".into()));
        }
        let logits = match (&self.cal, p.alpha > 0.0) {
            (Some(cal), true) => {
                let (mut cache, hc, text) = match (cal.cross, p.ccache, p.hc) {
                    (None, Some(cache), Some(hc)) => (cache, hc, None),
                    (Some((ttok, ctok)), _, _) => {
                        let bytes: Vec<u8> = p
                            .ids
                            .iter()
                            .flat_map(|&t| ttok.token_bytes(t, false))
                            .collect();
                        let mut text = CrossText::default();
                        text.push(ctok, &bytes)?;
                        if text.ids().is_empty() {
                            return Err(Error::Input(
                                "the prompt has no text for the calibration model to read".into(),
                            ));
                        }
                        let mut cache = cal.model.new_cache();
                        let ids = ids_tensor(&[text.ids().to_vec()])?;
                        let hc = last(&cal.model.forward_hidden(&ids, &mut cache)?)?;
                        (cache, hc, Some(text))
                    }
                    _ => {
                        return Err(Error::Input(
                            "the prompt was read without its calibration side".into(),
                        ))
                    }
                };
                let logits =
                    rows_of(&self.target.lm_head(&cal.map.fuse(&ht, &hc, p.alpha)?)?)?.remove(0);
                if n > 1 {
                    cache.repeat_batch(n)?;
                }
                let hidden = text.is_some().then_some(hc);
                self.crows.append(cache, text, hidden, n)?;
                logits
            }
            // The untouched target, computed exactly as the plain decoder does.
            _ => rows_of(&self.target.lm_head(&ht)?)?.remove(0),
        };
        let mut tcache = p.tcache;
        if n > 1 {
            tcache.repeat_batch(n)?;
        }
        self.tcache.append_rows(tcache)?;
        self.alphas.extend(std::iter::repeat_n(p.alpha, n));
        Ok(logits)
    }

    /// The batch rows with α > 0, in order (the rows of the calibration state).
    fn fused_rows(&self) -> Vec<usize> {
        (0..self.rows()).filter(|&r| self.alphas[r] > 0.0).collect()
    }

    /// Feeds each fused row its token through the calibration model; returns their last
    /// hidden states `(fused rows, d_cal)`.
    fn calibration_step(
        cal: &Calibration<'_>,
        crows: &mut CalRows,
        tokens: &[TokenId],
    ) -> Result<Tensor> {
        let Some((ttok, ctok)) = cal.cross else {
            let ids: Vec<Vec<TokenId>> = tokens.iter().map(|&t| vec![t]).collect();
            return last(
                &cal.model
                    .forward_hidden(&ids_tensor(&ids)?, &mut crows.cache)?,
            );
        };
        // Across tokenizers each row re-reads its text; most rows then have one new
        // calibration id, some none (a character not complete yet) and a few several (the
        // text's tail tokenized differently). They run as one batch, one id per row a round;
        // a row with nothing to read in a round reads a placeholder that is rolled back.
        let mut fresh: Vec<Vec<TokenId>> = Vec::with_capacity(tokens.len());
        for (r, (text, &t)) in crows.texts.iter_mut().zip(tokens).enumerate() {
            match text.push(ctok, &ttok.token_bytes(t, false))? {
                None => fresh.push(Vec::new()),
                Some(keep) => {
                    crows.cache.truncate_row(r, keep)?;
                    fresh.push(text.ids()[keep..].to_vec());
                }
            }
        }
        let mut hidden = crows
            .hidden
            .take()
            .ok_or_else(|| Error::Input("cross-tokenizer rows without hidden states".into()))?;
        let rows = tokens.len();
        for round in 0..fresh.iter().map(Vec::len).max().unwrap_or(0) {
            let ids: Vec<Vec<TokenId>> = fresh
                .iter()
                .map(|f| vec![f.get(round).copied().unwrap_or(0)])
                .collect();
            let before = crows.cache.row_lengths();
            let h = last(
                &cal.model
                    .forward_hidden(&ids_tensor(&ids)?, &mut crows.cache)?,
            )?;
            let mut pick = Vec::with_capacity(rows);
            for (r, f) in fresh.iter().enumerate() {
                if round < f.len() {
                    pick.push(rows + r);
                } else {
                    crows.cache.truncate_row(r, before[r])?;
                    pick.push(r);
                }
            }
            hidden = take_rows(&Tensor::cat(&[hidden, h], 0)?, &pick)?;
        }
        crows.hidden = Some(hidden.clone());
        Ok(hidden)
    }
}

fn check_alpha(alpha: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&alpha) || alpha.is_nan() {
        return Err(Error::Input(format!(
            "--alpha {alpha} is outside [0, 1]; 0 is the untouched target, 1 uses only the calibration model's mapped state"
        )));
    }
    Ok(())
}

fn last(h: &Tensor) -> Result<Tensor> {
    let t = h.dim(1)?;
    Ok(h.narrow(1, t - 1, 1)?.squeeze(1)?)
}

impl Decoder for FusedDecoder<'_> {
    fn context_length(&self) -> usize {
        self.target.info().context_length
    }

    fn prefill(&mut self, prompt: &[TokenId]) -> Result<Vec<f32>> {
        self.retain_rows(&[])?;
        let mut p = self.begin(prompt, self.alpha)?;
        self.prefill_some(&mut p, usize::MAX)?;
        self.join(p, 1)
    }

    fn fork(&mut self, n: usize) -> Result<()> {
        if self.rows() != 1 {
            return Err(Error::Input(format!(
                "fork needs one row (a prefilled prompt), the batch has {}",
                self.rows()
            )));
        }
        self.tcache.repeat_batch(n)?;
        if self.alphas[0] > 0.0 {
            let c = &mut self.crows;
            c.cache.repeat_batch(n)?;
            c.texts = c
                .texts
                .iter()
                .flat_map(|t| std::iter::repeat_n(t.clone(), n))
                .collect();
            c.hidden = c.hidden.as_ref().map(|h| h.repeat((n, 1))).transpose()?;
        }
        self.alphas = vec![self.alphas[0]; n];
        Ok(())
    }

    fn retain_rows(&mut self, keep: &[usize]) -> Result<()> {
        let fused = self.fused_rows();
        self.tcache.select_rows(keep)?;
        if !fused.is_empty() {
            let ckeep: Vec<usize> = keep
                .iter()
                .filter_map(|r| fused.binary_search(r).ok())
                .collect();
            if ckeep.len() < fused.len() {
                self.crows.select(&ckeep)?;
            }
        }
        self.alphas = keep.iter().map(|&r| self.alphas[r]).collect();
        Ok(())
    }

    fn step(&mut self, tokens: &[TokenId]) -> Result<Vec<Vec<f32>>> {
        if tokens.len() != self.rows() {
            return Err(Error::Input(format!(
                "a step feeds one token per row: {} tokens for {} rows",
                tokens.len(),
                self.rows()
            )));
        }
        let ids: Vec<Vec<TokenId>> = tokens.iter().map(|&t| vec![t]).collect();
        let ht = last(
            &self
                .target
                .forward_hidden(&ids_tensor(&ids)?, &mut self.tcache)?,
        )?;
        let fused = self.fused_rows();
        let (Some(cal), false) = (&self.cal, fused.is_empty()) else {
            return rows_of(&self.target.lm_head(&ht)?);
        };
        let ftokens: Vec<TokenId> = fused.iter().map(|&r| tokens[r]).collect();
        let hc = Self::calibration_step(cal, &mut self.crows, &ftokens)?;
        let alphas: Vec<f64> = fused.iter().map(|&r| self.alphas[r]).collect();
        let h = if fused.len() == tokens.len() {
            cal.map.fuse_per_row(&ht, &hc, &alphas)?
        } else {
            // Plain rows keep the target's state exactly; fused rows take theirs.
            let hf = cal
                .map
                .fuse_per_row(&take_rows(&ht, &fused)?, &hc, &alphas)?;
            let mut pick: Vec<usize> = (0..tokens.len()).collect();
            for (j, &r) in fused.iter().enumerate() {
                pick[r] = tokens.len() + j;
            }
            take_rows(&Tensor::cat(&[ht, hf], 0)?, &pick)?
        };
        rows_of(&self.target.lm_head(&h)?)
    }
}

/// Manifest of the shared calibration part.
pub const CALIBRATION_MANIFEST: &str = "calibration.json";
/// The shared calibration part's tensors: LoRA factors (`lora.*`) or layer weights.
pub const CALIBRATION_TENSORS: &str = "calibration.safetensors";

#[cfg(test)]
mod norm_tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn keep_norm_rescales_each_row_to_the_target_rms_and_keeps_its_direction() {
        let h = Tensor::new(&[[3.0f32, 4.0], [1.0, 0.0]], &Device::Cpu).unwrap();
        let t = Tensor::new(&[[0.0f32, 10.0], [2.0, 2.0]], &Device::Cpu).unwrap();
        let out: Vec<Vec<f32>> = keep_norm(&h, &t).unwrap().to_vec2().unwrap();
        // row 0: |h| = 5, |t| = 10 -> doubled; row 1: |h| = 1, |t| = sqrt(8)
        assert!((out[0][0] - 6.0).abs() < 1e-5 && (out[0][1] - 8.0).abs() < 1e-5);
        assert!((out[1][0] - 8f32.sqrt()).abs() < 1e-5 && out[1][1].abs() < 1e-6);
    }
}
