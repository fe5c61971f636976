//! Step 2 of the method: a linear map `A` (`d_cal × d_target`) from the calibration model's
//! space to the target's, learned with InfoNCE (the positive against `K` random negatives,
//! scored by inner product, cross-entropy with the positive first).
//!
//! Two variants:
//! - **embedding** (the paper's): pairs are the two input-embedding rows of each token in the
//!   common vocabulary;
//! - **hidden** (where fusion happens, defect D3 fixed): pairs are the two models' final
//!   hidden states at the same character offset of shared text, wherever both tokenizations
//!   have a token ending there.
//!
//! Quality is retrieval accuracy@1 on held-out pairs: the mapped calibration vector's nearest
//! target vector (cosine) among all held-out target vectors must be its own pair.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::{Rng, SeedableRng};

use crate::error::{Error, IoContext, Result};
use crate::gguf::GgufFile;
use crate::lm::{self, take_rows, CausalLm, TokenId};
use crate::text::vocab::CommonVocab;
use crate::text::Tokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Variant {
    /// The paper's: input-embedding rows of common tokens.
    Embedding,
    /// Final hidden states on shared text (where fusion happens).
    Hidden,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct AlignConfig {
    /// Which states the map is learned on.
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = AlignConfig::default().variant))]
    pub variant: Variant,
    /// Negatives per positive.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = AlignConfig::default().negatives))]
    pub negatives: usize,
    /// Passes over the training pairs.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = AlignConfig::default().epochs))]
    pub epochs: usize,
    /// Pairs per optimizer step.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = AlignConfig::default().batch))]
    pub batch: usize,
    /// Adam learning rate.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = AlignConfig::default().lr))]
    pub lr: f64,
    /// Seed of the pair split, the shuffles and the negatives.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = AlignConfig::default().seed))]
    pub seed: u64,
    /// Held-out share of the pairs, in thousandths.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = AlignConfig::default().held_out_per_mille))]
    pub held_out_per_mille: u64,
}

impl Default for AlignConfig {
    fn default() -> Self {
        Self {
            variant: Variant::Embedding,
            negatives: 10,
            epochs: 3,
            batch: 32,
            lr: 1e-3,
            seed: 0,
            held_out_per_mille: 100,
        }
    }
}

/// Which model a file is: where it was, its hash, its width.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelId {
    pub path: PathBuf,
    pub sha256: String,
    pub width: usize,
}

impl ModelId {
    pub fn of(path: &Path, width: usize) -> Result<Self> {
        Ok(Self {
            path: path.to_path_buf(),
            sha256: crate::fetch::sha256_path(path)?,
            width,
        })
    }
}

/// What `align` saves beside `A`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AlignManifest {
    pub calibration: ModelId,
    pub target: ModelId,
    pub config: AlignConfig,
    pub common_vocab: usize,
    pub train_pairs: usize,
    pub held_out_pairs: usize,
    pub final_loss: f64,
    /// Retrieval accuracy@1 on held-out pairs.
    pub retrieval_at_1: f64,
    /// The same before training (A at its random initialisation), for scale.
    pub retrieval_at_1_init: f64,
}

/// What `detoxfuse align` reports of a learned map.
impl std::fmt::Display for AlignManifest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} alignment {} -> {}: {} training / {} held-out pairs, K = {}, {} epochs; final loss {:.4}; held-out retrieval accuracy@1 {:.4} (random init {:.4})",
            self.config.variant,
            self.calibration.width,
            self.target.width,
            self.train_pairs,
            self.held_out_pairs,
            self.config.negatives,
            self.config.epochs,
            self.final_loss,
            self.retrieval_at_1,
            self.retrieval_at_1_init,
        )
    }
}

/// A learned alignment.
pub struct Alignment {
    /// `(d_cal, d_target)`.
    pub a: Tensor,
    pub manifest: AlignManifest,
}

impl Alignment {
    /// Writes `A` to `path` (safetensors, tensor "A") and the manifest to `path` with the
    /// extension `.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        // Both files are written before either replaces an old one (a full disk leaves the old
        // pair), and the manifest goes first: a map is never in place without the manifest it
        // was made with.
        let manifest = serde_json::to_string_pretty(&self.manifest)?;
        let tensors = std::collections::HashMap::from([("A".to_string(), self.a.clone())]);
        crate::atomic::write_together(vec![
            (
                &manifest_path(path),
                Box::new(|tmp: &Path| {
                    std::fs::write(tmp, &manifest).ctx(|| format!("writing {}", tmp.display()))
                }),
            ),
            (
                path,
                Box::new(|tmp: &Path| crate::atomic::save_safetensors(&tensors, tmp)),
            ),
        ])
    }

    /// Loads `A` and its manifest and checks them against the models they will join.
    pub fn load(path: &Path, calibration: &ModelId, target: &ModelId) -> Result<Self> {
        let t = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
            Error::Input(format!(
                "cannot read alignment {}: {e}; make one with `detoxfuse align`",
                path.display()
            ))
        })?;
        let a = t
            .get("A")
            .ok_or_else(|| Error::Input(format!("{} holds no tensor \"A\"", path.display())))?
            .to_dtype(DType::F32)?;
        let mpath = manifest_path(path);
        let manifest: AlignManifest = serde_json::from_str(
            &std::fs::read_to_string(&mpath)
                .ctx(|| format!("reading the alignment manifest {}", mpath.display()))?,
        )
        .map_err(|e| Error::Input(format!("{} is damaged: {e}", mpath.display())))?;
        let (rows, cols) = a.dims2()?;
        if (rows, cols) != (calibration.width, target.width) {
            return Err(Error::Input(format!(
                "alignment {} maps width {rows} to {cols}, but the calibration model is {} wide and the target {}; run `detoxfuse align` for this pair",
                path.display(),
                calibration.width,
                target.width
            )));
        }
        for (what, want, got) in [
            ("calibration model", &manifest.calibration, calibration),
            ("target", &manifest.target, target),
        ] {
            if want.sha256 != got.sha256 {
                return Err(Error::Input(format!(
                    "alignment {} was learned for another {what} ({}, sha256 {}…) than {} (sha256 {}…); run `detoxfuse align` for this pair",
                    path.display(),
                    want.path.display(),
                    &want.sha256[..12.min(want.sha256.len())],
                    got.path.display(),
                    &got.sha256[..12.min(got.sha256.len())]
                )));
            }
        }
        Ok(Self { a, manifest })
    }
}

pub fn manifest_path(path: &Path) -> PathBuf {
    path.with_extension("json")
}

/// A model's input-embedding table `(vocab, width)` in f32.
pub fn embedding_table(path: &Path) -> Result<Tensor> {
    if path.is_dir() {
        let (_, mut t) = lm::llama::read_hf_weights(path)?;
        return t
            .remove("model.embed_tokens.weight")
            .ok_or_else(|| Error::BadModelDir {
                path: path.to_path_buf(),
                reason: "no model.embed_tokens.weight".into(),
            });
    }
    let mut f = GgufFile::open(path)?;
    Ok(f.tensor("token_embd.weight")?.dequantize(&Device::Cpu)?)
}

/// Training pairs `(x: (n, d_cal), y: (n, d_target))` and whether each is held out.
pub struct Pairs {
    pub x: Tensor,
    pub y: Tensor,
    pub held_out: Vec<bool>,
}

/// Embedding-variant pairs over the common vocabulary; a token is held out by a hash of its
/// id pair.
pub fn embedding_pairs(
    cal_table: &Tensor,
    target_table: &Tensor,
    common: &CommonVocab,
    held_out_per_mille: u64,
) -> Result<Pairs> {
    let ci: Vec<u32> = common.pairs.iter().map(|p| p.0).collect();
    let ti: Vec<u32> = common.pairs.iter().map(|p| p.1).collect();
    let n = ci.len();
    let held_out = common
        .pairs
        .iter()
        .map(|&(a, b)| {
            let key = ((a as u64) << 32) | b as u64;
            crate::sample::stable_hash(&key.to_le_bytes()) % 1000 < held_out_per_mille
        })
        .collect();
    Ok(Pairs {
        x: cal_table.index_select(&Tensor::from_vec(ci, n, &Device::Cpu)?, 0)?,
        y: target_table.index_select(&Tensor::from_vec(ti, n, &Device::Cpu)?, 0)?,
        held_out,
    })
}

/// Byte offsets where each token of `ids` ends (control tokens add no bytes).
fn token_ends(tok: &Tokenizer, ids: &[TokenId]) -> Vec<usize> {
    let mut end = 0;
    ids.iter()
        .map(|&id| {
            end += tok.token_bytes(id, false).len();
            end
        })
        .collect()
}

/// Hidden-variant pairs: both models read each text; wherever both have a token ending at
/// the same byte offset, their final hidden states there form a pair. A text's pairs are
/// held out together (by a hash of the text).
pub fn hidden_pairs(
    cal: (&dyn CausalLm, &Tokenizer),
    target: (&dyn CausalLm, &Tokenizer),
    texts: &[String],
    held_out_per_mille: u64,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Pairs> {
    let (mut xs, mut ys, mut held_out) = (Vec::new(), Vec::new(), Vec::new());
    for (k, text) in texts.iter().enumerate() {
        progress(k, texts.len());
        let ci = cal.1.encode(text, false)?;
        let ti = target.1.encode(text, false)?;
        if ci.is_empty() || ti.is_empty() {
            continue;
        }
        let hc = cal.0.forward_hidden(
            &lm::ids_tensor(std::slice::from_ref(&ci))?,
            &mut cal.0.new_cache(),
        )?;
        let ht = target.0.forward_hidden(
            &lm::ids_tensor(std::slice::from_ref(&ti))?,
            &mut target.0.new_cache(),
        )?;
        let (ce, te) = (token_ends(cal.1, &ci), token_ends(target.1, &ti));
        let (mut pc, mut pt) = (Vec::new(), Vec::new());
        let mut j = 0;
        for (i, &e) in ce.iter().enumerate() {
            if e == 0 {
                continue;
            }
            while j < te.len() && te[j] < e {
                j += 1;
            }
            if j < te.len() && te[j] == e {
                pc.push(i as u32);
                pt.push(j as u32);
            }
        }
        if pc.is_empty() {
            continue;
        }
        let out = crate::sample::stable_hash(text.as_bytes()) % 1000 < held_out_per_mille;
        held_out.extend(std::iter::repeat_n(out, pc.len()));
        let n = pc.len();
        xs.push(
            hc.squeeze(0)?
                .index_select(&Tensor::from_vec(pc, n, &Device::Cpu)?, 0)?,
        );
        ys.push(
            ht.squeeze(0)?
                .index_select(&Tensor::from_vec(pt, n, &Device::Cpu)?, 0)?,
        );
    }
    if xs.is_empty() {
        return Err(Error::Input(
            "no token boundaries shared by the two tokenizers in the given texts".into(),
        ));
    }
    Ok(Pairs {
        x: Tensor::cat(&xs, 0)?.to_dtype(DType::F32)?,
        y: Tensor::cat(&ys, 0)?.to_dtype(DType::F32)?,
        held_out,
    })
}

/// Accuracy@1 of retrieving each `y` row from its mapped `x` row among all `y` rows (cosine).
pub fn retrieval_at_1(a: &Tensor, x: &Tensor, y: &Tensor) -> Result<f64> {
    let n = x.dim(0)?;
    if n == 0 {
        return Ok(f64::NAN);
    }
    let unit = |t: &Tensor| -> Result<Tensor> {
        Ok(t.broadcast_div(&(t.sqr()?.sum_keepdim(D::Minus1)?.sqrt()? + 1e-12)?)?)
    };
    let m = unit(&x.matmul(a)?)?;
    let yu = unit(y)?;
    let mut hits = 0usize;
    for start in (0..n).step_by(1024) {
        let len = 1024.min(n - start);
        let best: Vec<u32> = m
            .narrow(0, start, len)?
            .matmul(&yu.t()?)?
            .argmax(D::Minus1)?
            .to_vec1()?;
        hits += best
            .iter()
            .enumerate()
            .filter(|&(i, &b)| b as usize == start + i)
            .count();
    }
    Ok(hits as f64 / n as f64)
}

/// `A` before training: normal entries with standard deviation 1/sqrt(d_cal).
pub fn initial_a(dc: usize, dt: usize, rng: &mut rand::rngs::StdRng) -> Result<Tensor> {
    let std = 1.0 / (dc as f64).sqrt();
    let init: Vec<f32> = (0..dc * dt)
        .map(|_| {
            // Box-Muller normal.
            let (u1, u2): (f64, f64) = (rng.random_range(1e-12..1.0), rng.random());
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
        })
        .collect();
    Ok(Tensor::from_vec(init, (dc, dt), &Device::Cpu)?)
}

impl Alignment {
    /// An untrained alignment (A at its initialisation, retrieval at chance) between two
    /// models: for tests and smoke checks of the decoding machinery, never for detox.
    pub fn untrained(calibration: ModelId, target: ModelId, seed: u64) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        Ok(Self {
            a: initial_a(calibration.width, target.width, &mut rng)?,
            manifest: AlignManifest {
                calibration,
                target,
                config: AlignConfig {
                    epochs: 0,
                    seed,
                    ..AlignConfig::default()
                },
                common_vocab: 0,
                train_pairs: 0,
                held_out_pairs: 0,
                // epochs 0 marks it untrained (JSON has no NaN)
                final_loss: 0.0,
                retrieval_at_1: 0.0,
                retrieval_at_1_init: 0.0,
            },
        })
    }
}

/// Learns `A` on the training pairs; returns it, the last epoch's mean loss and held-out
/// accuracy@1 before and after.
pub fn train(
    pairs: &Pairs,
    cfg: &AlignConfig,
    progress: &mut dyn FnMut(usize, usize, f64),
) -> Result<(Tensor, f64, f64, f64, usize, usize)> {
    let (train_idx, held_idx): (Vec<usize>, Vec<usize>) =
        (0..pairs.held_out.len()).partition(|&i| !pairs.held_out[i]);
    if train_idx.len() <= cfg.negatives {
        return Err(Error::Input(format!(
            "only {} training pairs for {} negatives",
            train_idx.len(),
            cfg.negatives
        )));
    }
    let (x, y) = (
        take_rows(&pairs.x, &train_idx)?,
        take_rows(&pairs.y, &train_idx)?,
    );
    let (hx, hy) = (
        take_rows(&pairs.x, &held_idx)?,
        take_rows(&pairs.y, &held_idx)?,
    );
    let (dc, dt) = (x.dim(1)?, y.dim(1)?);
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let a = Var::from_tensor(&initial_a(dc, dt, &mut rng)?)?;
    let acc_init = retrieval_at_1(a.as_tensor(), &hx, &hy)?;
    let mut opt = AdamW::new(
        vec![a.clone()],
        ParamsAdamW {
            lr: cfg.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let n = train_idx.len();
    let steps_per_epoch = n.div_ceil(cfg.batch);
    let total = steps_per_epoch * cfg.epochs;
    let mut last_epoch_loss = f64::NAN;
    let mut order: Vec<usize> = (0..n).collect();
    for epoch in 0..cfg.epochs {
        use rand::seq::SliceRandom;
        order.shuffle(&mut rng);
        let mut sum = 0.0;
        for (s, chunk) in order.chunks(cfg.batch).enumerate() {
            let b = chunk.len();
            let neg: Vec<usize> = chunk
                .iter()
                .flat_map(|&i| {
                    let mut v = Vec::with_capacity(cfg.negatives);
                    while v.len() < cfg.negatives {
                        let j = rng.random_range(0..n);
                        if j != i {
                            v.push(j);
                        }
                    }
                    v
                })
                .collect();
            let mapped = take_rows(&x, chunk)?.matmul(a.as_tensor())?; // (b, dt)
            let pos = (&mapped * take_rows(&y, chunk)?)?.sum_keepdim(1)?; // (b, 1)
            let negs = take_rows(&y, &neg)?.reshape((b, cfg.negatives, dt))?;
            let sneg = negs.matmul(&mapped.unsqueeze(2)?)?.squeeze(2)?; // (b, K)
            let scores = Tensor::cat(&[&pos, &sneg], 1)?;
            let target = Tensor::zeros(b, DType::U32, &Device::Cpu)?;
            let loss = candle_nn::loss::cross_entropy(&scores, &target)?;
            opt.backward_step(&loss)?;
            let l = loss.to_scalar::<f32>()? as f64;
            sum += l;
            progress(epoch * steps_per_epoch + s + 1, total, l);
        }
        last_epoch_loss = sum / steps_per_epoch as f64;
    }
    let acc = retrieval_at_1(a.as_tensor(), &hx, &hy)?;
    Ok((
        a.as_tensor().clone(),
        last_epoch_loss,
        acc_init,
        acc,
        train_idx.len(),
        held_idx.len(),
    ))
}
