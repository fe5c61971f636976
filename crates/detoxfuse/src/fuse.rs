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
use crate::lm::{ids_tensor, CausalLm, KvCache, TokenId};
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

/// The calibration side of one batch row when tokenizers differ.
#[derive(Clone)]
struct CrossRow {
    /// Text read so far (the target's tokens rendered to bytes) and its calibration ids.
    text: CrossText,
    cache: KvCache,
    /// Final hidden state at the last calibration position, `(d_cal)`.
    hidden: Tensor,
}

enum CalState<'m> {
    /// Same tokenizer: one batched cache fed the target's ids.
    Shared { cache: KvCache },
    /// Different tokenizers: per-row text, ids and cache.
    Cross {
        target_tok: &'m Tokenizer,
        cal_tok: &'m Tokenizer,
        rows: Vec<CrossRow>,
    },
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
pub struct FusedDecoder<'m> {
    target: &'m dyn CausalLm,
    cal: &'m dyn CausalLm,
    /// `A` (`d_cal × d_target`), the LayerNorm's affine parameters and the scaling rule.
    map: FusionMap,
    alpha: f64,
    tcache: KvCache,
    state: CalState<'m>,
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
        let state = match cross {
            None => CalState::Shared {
                cache: cal.new_cache(),
            },
            Some((target_tok, cal_tok)) => CalState::Cross {
                target_tok,
                cal_tok,
                rows: Vec::new(),
            },
        };
        Ok(Self {
            target,
            cal,
            map,
            alpha,
            tcache: target.new_cache(),
            state,
        })
    }

    /// `KeepTargetNorm` rescales every fused state to the target state's RMS whatever the
    /// map was trained with (eval's `fusednorm` rows); `Paper` keeps the map's own rule (a
    /// map trained with the norm kept is always used with it).
    pub fn with_norm(mut self, norm: FusionNorm) -> Self {
        if norm == FusionNorm::KeepTargetNorm {
            self.map.norm = norm;
        }
        self
    }

    /// The calibration model's ids for each row (cross-tokenizer path; empty otherwise).
    pub fn calibration_ids(&self) -> Vec<Vec<TokenId>> {
        match &self.state {
            CalState::Cross { rows, .. } => rows.iter().map(|r| r.text.ids().to_vec()).collect(),
            CalState::Shared { .. } => Vec::new(),
        }
    }

    fn logits(&self, h_target: &Tensor, h_cal: Option<Tensor>) -> Result<Vec<Vec<f32>>> {
        let h = match h_cal {
            Some(hc) => self.map.fuse(h_target, &hc, self.alpha)?,
            None => h_target.clone(),
        };
        rows_of(&self.target.lm_head(&h)?)
    }

    /// Advances a cross-tokenizer row by `bytes`, updating its ids, cache and last hidden state.
    fn advance_row(
        cal: &dyn CausalLm,
        tok: &Tokenizer,
        row: &mut CrossRow,
        bytes: &[u8],
    ) -> Result<()> {
        let Some(keep) = row.text.push(tok, bytes)? else {
            return Ok(());
        };
        row.cache.truncate(keep)?;
        let new = row.text.ids()[keep..].to_vec();
        let h = cal.forward_hidden(&ids_tensor(&[new])?, &mut row.cache)?;
        row.hidden = last(&h)?.squeeze(0)?;
        Ok(())
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
        self.tcache = self.target.new_cache();
        let ht = last(
            &self
                .target
                .forward_hidden(&ids_tensor(&[prompt.to_vec()])?, &mut self.tcache)?,
        )?;
        if self.alpha == 0.0 {
            // The untouched target, computed exactly as the plain decoder does.
            return Ok(self.logits(&ht, None)?.remove(0));
        }
        let cal = self.cal;
        let hc = match &mut self.state {
            CalState::Shared { cache } => {
                *cache = cal.new_cache();
                last(&cal.forward_hidden(&ids_tensor(&[prompt.to_vec()])?, cache)?)?
            }
            CalState::Cross {
                target_tok,
                cal_tok,
                rows,
            } => {
                let bytes: Vec<u8> = prompt
                    .iter()
                    .flat_map(|&t| target_tok.token_bytes(t, false))
                    .collect();
                let mut row = CrossRow {
                    text: CrossText::default(),
                    cache: cal.new_cache(),
                    hidden: Tensor::zeros(
                        cal.info().hidden_size,
                        candle_core::DType::F32,
                        &candle_core::Device::Cpu,
                    )?,
                };
                Self::advance_row(cal, cal_tok, &mut row, &bytes)?;
                if row.text.ids().is_empty() {
                    return Err(Error::Input(
                        "the prompt has no text for the calibration model to read".into(),
                    ));
                }
                let h = row.hidden.unsqueeze(0)?;
                *rows = vec![row];
                h
            }
        };
        Ok(self.logits(&ht, Some(hc))?.remove(0))
    }

    fn fork(&mut self, n: usize) -> Result<()> {
        self.tcache.repeat_batch(n)?;
        if self.alpha == 0.0 {
            return Ok(());
        }
        match &mut self.state {
            CalState::Shared { cache } => cache.repeat_batch(n),
            CalState::Cross { rows, .. } => {
                let one = rows
                    .first()
                    .cloned()
                    .ok_or_else(|| Error::Input("fork before prefill".into()))?;
                *rows = vec![one; n];
                Ok(())
            }
        }
    }

    fn retain_rows(&mut self, keep: &[usize]) -> Result<()> {
        self.tcache.select_rows(keep)?;
        if self.alpha == 0.0 {
            return Ok(());
        }
        match &mut self.state {
            CalState::Shared { cache } => cache.select_rows(keep),
            CalState::Cross { rows, .. } => {
                *rows = keep.iter().map(|&r| rows[r].clone()).collect();
                Ok(())
            }
        }
    }

    fn step(&mut self, tokens: &[TokenId]) -> Result<Vec<Vec<f32>>> {
        let ids: Vec<Vec<TokenId>> = tokens.iter().map(|&t| vec![t]).collect();
        let ht = last(
            &self
                .target
                .forward_hidden(&ids_tensor(&ids)?, &mut self.tcache)?,
        )?;
        if self.alpha == 0.0 {
            return self.logits(&ht, None);
        }
        let cal = self.cal;
        let hc = match &mut self.state {
            CalState::Shared { cache } => last(&cal.forward_hidden(&ids_tensor(&ids)?, cache)?)?,
            CalState::Cross {
                target_tok,
                cal_tok,
                rows,
            } => {
                let mut hs = Vec::with_capacity(rows.len());
                for (row, &t) in rows.iter_mut().zip(tokens) {
                    Self::advance_row(cal, cal_tok, row, &target_tok.token_bytes(t, false))?;
                    hs.push(row.hidden.clone());
                }
                Tensor::stack(&hs, 0)?
            }
        };
        self.logits(&ht, Some(hc))
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
