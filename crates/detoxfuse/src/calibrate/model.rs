//! The trainable calibration transformer: a llama-style decoder built only from ops that
//! candle 0.11 can differentiate.
//!
//! The inference models in `lm/` use candle's fused `rms_norm` and rope kernels, which have
//! no backward pass (gradients silently stop there). Here RMSNorm, rotary embeddings, the
//! causal softmax and SwiGLU are our own fused ops with hand-written backward passes
//! ([`super::ops`]), matmuls are candle's, and the LM head with its cross-entropy is done
//! by hand in row chunks ([`head_cross_entropy`]) so the `(tokens × vocabulary)` logits never
//! exist whole and the head's weight gradient is only computed when the head is trained.
//!
//! Weights use Hugging Face naming and layout (RoPE over halves), so a model exports as a
//! `LlamaForCausalLM` directory unchanged.

use std::collections::{BTreeMap, HashMap};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use super::ops::{self, Float};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::lm::export::{HfLlama, LAYER_TENSORS};
use crate::lm::llama::LlamaConfig;
use crate::lm::TokenId;

/// Which parts of the model are trained.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Trainable {
    /// Train the token embedding table (and with it a tied LM head).
    pub embeddings: bool,
    /// Train an untied LM head (ignored when the head is tied to the embeddings).
    pub head: bool,
}

impl Default for Trainable {
    /// The defaults keep the pretrained embeddings and head fixed: the calibration model's
    /// input space stays the base model's (which the embedding-table alignment relies on) and
    /// the head's weight gradient, the largest matmul of a step, is skipped.
    fn default() -> Self {
        Self {
            embeddings: false,
            head: false,
        }
    }
}

/// How the decoder layers (and the final norm) are trained.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum LayerTraining {
    /// Every layer weight is trained.
    #[default]
    Full,
    /// The layer weights stay the base's; a low-rank delta `B·A` (rank `rank`, `B` starting
    /// at zero) is trained on each projection matrix (LoRA, Hu et al. 2021).
    Lora { rank: usize },
    /// Nothing in the layers is trained.
    Frozen,
}

/// Name of the LoRA factor `which` ("a": `rank × in`, "b": `out × rank`) of weight `name`.
pub fn lora_name(name: &str, which: &str) -> String {
    format!("lora.{name}.{which}")
}

const EMBED: &str = "model.embed_tokens.weight";
const HEAD: &str = "lm_head.weight";

/// One training batch: right-padded token rows and the positions whose next token is scored.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `(rows, len)` token ids.
    pub ids: Tensor,
    /// Flat indices `row * len + pos` of the positions that predict a scored token.
    pub positions: Vec<u32>,
    /// The token each of those positions must predict.
    pub targets: Vec<TokenId>,
}

impl Batch {
    /// Builds a batch from token rows and, per row, which tokens count in the loss
    /// (`mask[i]` scores the prediction of token `i` from the tokens before it).
    pub fn new(rows: &[(&[TokenId], &[bool])], pad: TokenId, device: &Device) -> Result<Self> {
        let len = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
        let mut flat = Vec::with_capacity(rows.len() * len);
        let (mut positions, mut targets) = (Vec::new(), Vec::new());
        for (r, (ids, mask)) in rows.iter().enumerate() {
            flat.extend_from_slice(ids);
            flat.extend(std::iter::repeat_n(pad, len - ids.len()));
            for i in 1..ids.len() {
                if mask[i] {
                    positions.push((r * len + i - 1) as u32);
                    targets.push(ids[i]);
                }
            }
        }
        Ok(Self {
            ids: Tensor::from_vec(flat, (rows.len(), len), device)?,
            positions,
            targets,
        })
    }

    /// Number of scored tokens.
    pub fn scored(&self) -> usize {
        self.targets.len()
    }

    /// Number of token slots including padding.
    pub fn slots(&self) -> usize {
        self.ids.elem_count()
    }
}

/// The batch of `examples[idx]`, right-padded with `pad`.
pub fn make_batch(examples: &[super::data::Example], idx: &[usize], pad: u32) -> Result<Batch> {
    let rows: Vec<(&[u32], &[bool])> = idx
        .iter()
        .map(|&i| (examples[i].ids.as_slice(), examples[i].mask.as_slice()))
        .collect();
    Batch::new(&rows, pad, &candle_core::Device::Cpu)
}

/// The calibration model's parameters: trainable ones are [`Var`]s, frozen ones plain tensors.
pub struct CalibrationModel {
    pub config: LlamaConfig,
    pub trainable: Trainable,
    vars: BTreeMap<String, Var>,
    frozen: BTreeMap<String, Tensor>,
    dtype: DType,
}

impl CalibrationModel {
    /// Builds the model from Hugging Face-named f32 weights (e.g. the first L layers of a base
    /// LM, see [`crate::lm::export::hf_llama_from_gguf`]), in `dtype`.
    pub fn new(
        config: LlamaConfig,
        tensors: &HashMap<String, Tensor>,
        trainable: Trainable,
        dtype: DType,
    ) -> Result<Self> {
        if !config
            .num_attention_heads
            .is_multiple_of(config.num_key_value_heads)
        {
            return Err(Error::Input(format!(
                "{} attention heads are not a multiple of {} key/value heads",
                config.num_attention_heads, config.num_key_value_heads
            )));
        }
        let mut names = vec![EMBED.to_string(), "model.norm.weight".to_string()];
        if !config.tie_word_embeddings {
            names.push(HEAD.to_string());
        }
        for i in 0..config.num_hidden_layers {
            for (_, hf) in LAYER_TENSORS {
                names.push(format!("model.layers.{i}.{hf}.weight"));
            }
        }
        let (mut vars, mut frozen) = (BTreeMap::new(), BTreeMap::new());
        for name in names {
            let t = tensors
                .get(&name)
                .ok_or_else(|| Error::Input(format!("the base model has no tensor {name}")))?
                .to_dtype(dtype)?;
            let train = match name.as_str() {
                EMBED => trainable.embeddings,
                HEAD => trainable.head,
                _ => true,
            };
            if train {
                vars.insert(name, Var::from_tensor(&t)?);
            } else {
                frozen.insert(name, t);
            }
        }
        let model = Self {
            config,
            trainable,
            vars,
            frozen,
            dtype,
        };
        model.check_shapes()?;
        Ok(model)
    }

    /// Builds the model from the first `layers` layers of `base`.
    pub fn from_base(
        base: &HfLlama,
        layers: usize,
        trainable: Trainable,
        dtype: DType,
    ) -> Result<Self> {
        if layers == 0 || layers > base.config.num_hidden_layers {
            return Err(Error::Input(format!(
                "--layers {layers}: the base model has {} layers; choose 1..={}",
                base.config.num_hidden_layers, base.config.num_hidden_layers
            )));
        }
        let mut config = base.config.clone();
        config.num_hidden_layers = layers;
        Self::new(config, &base.tensors, trainable, dtype)
    }

    /// Loads a calibration model directory (Hugging Face Llama layout) for evaluation, in
    /// f32 with nothing trainable, with its tokenizer.
    pub fn load_dir(dir: &std::path::Path) -> Result<(Self, crate::text::Tokenizer)> {
        let hf = crate::lm::export::read_hf_dir(dir)?;
        let frozen = Trainable::default();
        let mut model = Self::new(hf.config, &hf.tensors, frozen, DType::F32)?;
        // Layers, norms and all: nothing is trained when evaluating.
        model.frozen.extend(
            std::mem::take(&mut model.vars)
                .into_iter()
                .map(|(k, v)| (k, v.as_tensor().clone())),
        );
        Ok((model, hf.tokenizer))
    }

    fn check_shapes(&self) -> Result<()> {
        let c = &self.config;
        let (d, hd) = (c.hidden_size, c.head_dim());
        let mut expect: Vec<(String, Vec<usize>)> = vec![
            (EMBED.into(), vec![c.vocab_size, d]),
            ("model.norm.weight".into(), vec![d]),
        ];
        if !c.tie_word_embeddings {
            expect.push((HEAD.into(), vec![c.vocab_size, d]));
        }
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let kv = c.num_key_value_heads * hd;
            for (n, s) in [
                ("input_layernorm", vec![d]),
                ("post_attention_layernorm", vec![d]),
                ("self_attn.q_proj", vec![c.num_attention_heads * hd, d]),
                ("self_attn.k_proj", vec![kv, d]),
                ("self_attn.v_proj", vec![kv, d]),
                ("self_attn.o_proj", vec![d, c.num_attention_heads * hd]),
                ("mlp.gate_proj", vec![c.intermediate_size, d]),
                ("mlp.up_proj", vec![c.intermediate_size, d]),
                ("mlp.down_proj", vec![d, c.intermediate_size]),
            ] {
                expect.push((format!("{p}.{n}.weight"), s));
            }
        }
        for (name, shape) in expect {
            let got = self.get(&name)?.dims().to_vec();
            if got != shape {
                return Err(Error::Input(format!(
                    "tensor {name} has shape {got:?} but config.json implies {shape:?}"
                )));
            }
        }
        Ok(())
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// A parameter by its Hugging Face name.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        if let Some(v) = self.vars.get(name) {
            return Ok(v.as_tensor().clone());
        }
        self.frozen
            .get(name)
            .cloned()
            .ok_or_else(|| Error::Input(format!("no parameter {name}")))
    }

    /// The trainable parameters, in a fixed (name) order.
    pub fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    /// Every parameter (trainable and frozen) by name, for export.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        let mut all: HashMap<String, Tensor> = self.frozen.clone().into_iter().collect();
        for (k, v) in &self.vars {
            all.insert(k.clone(), v.as_tensor().clone());
        }
        all
    }

    /// Replaces the LM head by an untied `head` (`vocabulary × hidden`), trainable when
    /// `trainable.head` says so (e.g. a tuned-lens head, [`super::lens`]).
    pub fn with_untied_head(mut self, head: Tensor) -> Result<Self> {
        let want = [self.config.vocab_size, self.config.hidden_size];
        if head.dims() != want {
            return Err(Error::Input(format!(
                "an LM head of shape {:?} does not fit a model with vocabulary {} and width {}",
                head.dims(),
                want[0],
                want[1]
            )));
        }
        let head = head.to_dtype(self.dtype)?;
        self.config.tie_word_embeddings = false;
        self.vars.remove(HEAD);
        self.frozen.remove(HEAD);
        if self.trainable.head {
            self.vars.insert(HEAD.to_string(), Var::from_tensor(&head)?);
        } else {
            self.frozen.insert(HEAD.to_string(), head);
        }
        self.check_shapes()?;
        Ok(self)
    }

    /// Sets how the layers train: `Frozen` and `Lora` move every layer weight (and the final
    /// norm) out of the trainable set; `Lora` then adds seeded adapters on each projection.
    pub fn with_layer_training(mut self, mode: LayerTraining, seed: u64) -> Result<Self> {
        if mode == LayerTraining::Full {
            return Ok(self);
        }
        let layer_names: Vec<String> = self
            .vars
            .keys()
            .filter(|n| n.as_str() != EMBED && n.as_str() != HEAD && !n.starts_with("lora."))
            .cloned()
            .collect();
        for n in layer_names {
            let v = self.vars.remove(&n).expect("listed");
            self.frozen.insert(n, v.as_tensor().clone());
        }
        if let LayerTraining::Lora { rank } = mode {
            if rank == 0 {
                return Err(Error::Input("--lora-rank must be at least 1".into()));
            }
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
            for i in 0..self.config.num_hidden_layers {
                for (_, hf) in LAYER_TENSORS {
                    let name = format!("model.layers.{i}.{hf}.weight");
                    let w = self.get(&name)?;
                    if w.rank() != 2 {
                        continue;
                    }
                    let (out, inp) = w.dims2()?;
                    // Kaiming-uniform A, zero B: the adapted model starts as the base.
                    let bound = 1.0 / (inp as f64).sqrt();
                    let a: Vec<f64> = (0..rank * inp)
                        .map(|_| rand::Rng::random_range(&mut rng, -bound..bound))
                        .collect();
                    let a = Tensor::from_vec(a, (rank, inp), w.device())?.to_dtype(self.dtype)?;
                    let b = Tensor::zeros((out, rank), self.dtype, w.device())?;
                    self.vars
                        .insert(lora_name(&name, "a"), Var::from_tensor(&a)?);
                    self.vars
                        .insert(lora_name(&name, "b"), Var::from_tensor(&b)?);
                }
            }
        }
        Ok(self)
    }

    /// A weight as the forward pass uses it: the stored one plus its LoRA delta, if any.
    pub fn weight(&self, name: &str) -> Result<Tensor> {
        let w = self.get(name)?;
        match (
            self.vars.get(&lora_name(name, "a")),
            self.vars.get(&lora_name(name, "b")),
        ) {
            (Some(a), Some(b)) => Ok((w + b.as_tensor().matmul(a.as_tensor())?)?),
            _ => Ok(w),
        }
    }

    /// Every parameter with the LoRA deltas folded into their weights (no `lora.*` tensors):
    /// a plain Llama for inference and export.
    pub fn merged_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for k in self.tensors().into_keys() {
            if k.starts_with("lora.") {
                continue;
            }
            let w = self.weight(&k)?;
            out.insert(k, w);
        }
        Ok(out)
    }

    /// Folds a stored trained part in, frozen: LoRA factor pairs (`lora.*`) are added to
    /// their weights as deltas, any other tensor replaces the weight of that name (a layer
    /// trained in full). Shapes are checked.
    pub fn with_frozen_trained(mut self, adapters: &HashMap<String, Tensor>) -> Result<Self> {
        for (k, t) in adapters {
            if k.starts_with("lora.") {
                continue;
            }
            let old = self.get(k).map_err(|_| {
                Error::Input(format!(
                    "trained tensor {k} is not a parameter of the base model"
                ))
            })?;
            if old.dims() != t.dims() {
                return Err(Error::Input(format!(
                    "trained tensor {k} has shape {:?} but the base's is {:?}",
                    t.dims(),
                    old.dims()
                )));
            }
            self.vars.remove(k);
            self.frozen.insert(k.clone(), t.to_dtype(self.dtype)?);
        }
        for k in adapters.keys() {
            let Some(rest) = k.strip_prefix("lora.") else {
                continue;
            };
            if rest.ends_with(".b") {
                continue; // handled with its `.a` factor
            }
            let base = rest
                .strip_suffix(".a")
                .ok_or_else(|| Error::Input(format!("adapter tensor {k} is not a LoRA factor")))?;
            let w = self.get(base)?;
            let (a, b) = (lora_name(base, "a"), lora_name(base, "b"));
            let (ta, tb) = match (adapters.get(&a), adapters.get(&b)) {
                (Some(ta), Some(tb)) => (ta, tb),
                _ => {
                    return Err(Error::Input(format!(
                        "adapter {base} lacks its a or b factor"
                    )))
                }
            };
            let (out, inp) = w.dims2()?;
            let (r, ia) = ta.dims2()?;
            let (ob, rb) = tb.dims2()?;
            if ia != inp || ob != out || rb != r {
                return Err(Error::Input(format!(
                    "adapter {base} has factors {:?} and {:?}, which do not fit a weight of shape {:?}",
                    ta.dims(), tb.dims(), w.dims()
                )));
            }
            let delta = tb.to_dtype(self.dtype)?.matmul(&ta.to_dtype(self.dtype)?)?;
            self.frozen.insert(base.to_string(), (w + delta)?);
            self.vars.remove(base);
        }
        Ok(self)
    }

    /// Number of trainable scalars.
    pub fn trainable_count(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    fn head_weight(&self) -> Result<Tensor> {
        self.get(if self.config.tie_word_embeddings {
            EMBED
        } else {
            HEAD
        })
    }

    fn head_var(&self) -> Option<&Var> {
        self.vars.get(if self.config.tie_word_embeddings {
            EMBED
        } else {
            HEAD
        })
    }

    /// Final (post-norm) hidden states `(rows, len, hidden)`, causal over each row.
    pub fn forward_hidden(&self, ids: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (b, t) = ids.dims2()?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim());
        let mut x = self.get(EMBED)?.index_select(&ids.flatten_all()?, 0)?;
        let eps = c.rms_norm_eps;
        for i in 0..c.num_hidden_layers {
            let w = |n: &str| self.weight(&format!("model.layers.{i}.{n}.weight"));
            let h = ops::rms_norm(&x, &w("input_layernorm")?, eps)?;
            // (b, t, heads, hd) projections; RoPE before moving heads in front of positions.
            let proj = |p: &str, n: usize| -> Result<Tensor> {
                Ok(h.matmul(&w(p)?.t()?)?.reshape((b, t, n, hd))?)
            };
            let q = ops::rope(&proj("self_attn.q_proj", nh)?, c.rope_theta)?.transpose(1, 2)?;
            let k = ops::rope(&proj("self_attn.k_proj", nkv)?, c.rope_theta)?.transpose(1, 2)?;
            let k = repeat_kv(&k, nh / nkv)?;
            let v = repeat_kv(&proj("self_attn.v_proj", nkv)?.transpose(1, 2)?, nh / nkv)?;
            let scores = q.contiguous()?.matmul(&k.t()?.contiguous()?)?;
            let probs = ops::causal_softmax(&scores, 1.0 / (hd as f64).sqrt())?;
            let att = probs
                .matmul(&v.contiguous()?)?
                .transpose(1, 2)?
                .reshape((b * t, nh * hd))?;
            x = (x + att.matmul(&w("self_attn.o_proj")?.t()?)?)?;
            let h = ops::rms_norm(&x, &w("post_attention_layernorm")?, eps)?;
            let gate = h.matmul(&w("mlp.gate_proj")?.t()?)?;
            let up = h.matmul(&w("mlp.up_proj")?.t()?)?;
            x = (x + ops::swiglu(&gate, &up)?.matmul(&w("mlp.down_proj")?.t()?)?)?;
        }
        let x = ops::rms_norm(&x, &self.get("model.norm.weight")?, eps)?;
        Ok(x.reshape((b, t, c.hidden_size))?)
    }

    /// Mean next-token cross-entropy over the batch's scored tokens, without gradients.
    pub fn loss(&self, batch: &Batch) -> Result<LossSum> {
        self.objective(batch, Objective::Likelihood)
    }

    /// Summed `objective` over the batch's scored tokens, without gradients.
    pub fn objective(&self, batch: &Batch, objective: Objective) -> Result<LossSum> {
        let hs = self.scored_hidden(batch)?.detach();
        let (sum, _) =
            head_cross_entropy(&hs, &self.head_weight()?, &batch.targets, objective, None)?;
        Ok(LossSum {
            nll: sum,
            tokens: batch.scored(),
        })
    }

    /// Mean loss over the batch's scored tokens and the gradient of that mean with respect to
    /// every trainable parameter.
    pub fn loss_and_grads(&self, batch: &Batch) -> Result<(f64, GradStore)> {
        let (means, grads) = self.objectives_and_grads(&[(batch, Objective::Likelihood, 1.0)])?;
        Ok((means[0], grads))
    }

    /// For parts `(batch, objective, weight)`: each part's mean objective over its scored
    /// tokens, and the gradient of `Σ weight × mean` with respect to every trainable
    /// parameter (one backward pass).
    pub fn objectives_and_grads(
        &self,
        parts: &[(&Batch, Objective, f64)],
    ) -> Result<(Vec<f64>, GradStore)> {
        let head_var = self.head_var();
        let head = self.head_weight()?;
        let (mut means, mut surrogate, mut head_grad) = (Vec::new(), None::<Tensor>, None);
        for &(batch, objective, weight) in parts {
            let n = batch.scored();
            if n == 0 {
                return Err(Error::Input(
                    "a training batch has no scored tokens (every example is prompt-only or one token long)".into(),
                ));
            }
            let hs = self.scored_hidden(batch)?;
            let scale = 1.0 / n as f64;
            let (sum, g) = head_cross_entropy(
                &hs.detach(),
                &head,
                &batch.targets,
                objective,
                Some((weight * scale, head_var.is_some())),
            )?;
            let g = g.expect("gradients were asked for");
            means.push(sum * scale);
            // d(sum(hs * g_h))/d(hs) = g_h: backpropagates the hand-computed head gradient.
            let s = (&hs * &g.hidden)?.sum_all()?;
            surrogate = Some(match surrogate {
                Some(prev) => (prev + s)?,
                None => s,
            });
            head_grad = match (head_grad, g.head) {
                (Some(a), Some(b)) => Some((a + b)?),
                (a, b) => a.or(b),
            };
        }
        let Some(surrogate) = surrogate else {
            return Err(Error::Input(
                "no training batch to take gradients of".into(),
            ));
        };
        let mut grads = surrogate.backward()?;
        if let (Some(var), Some(gw)) = (head_var, head_grad) {
            let total = match grads.get(var.as_tensor()) {
                Some(prev) => (prev + gw)?,
                None => gw,
            };
            grads.insert(var.as_tensor(), total);
        }
        Ok((means, grads))
    }

    /// Final hidden states at the batch's scored positions, `(scored, hidden)`.
    pub fn scored_hidden(&self, batch: &Batch) -> Result<Tensor> {
        let h = self.forward_hidden(&batch.ids)?;
        let (b, t, d) = h.dims3()?;
        let idx = Tensor::from_slice(&batch.positions, batch.positions.len(), h.device())?;
        Ok(h.reshape((b * t, d))?.index_select(&idx, 0)?)
    }
}

/// A sum of token negative log-likelihoods and how many tokens it covers.
#[derive(Debug, Clone, Copy, Default)]
pub struct LossSum {
    pub nll: f64,
    pub tokens: usize,
}

impl LossSum {
    pub fn add(&mut self, o: LossSum) {
        self.nll += o.nll;
        self.tokens += o.tokens;
    }
    pub fn mean(&self) -> f64 {
        self.nll / self.tokens.max(1) as f64
    }
}

/// Repeats each key/value head `n` times (grouped-query attention).
fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, h, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, h, n, t, d))?
        .reshape((b, h * n, t, d))?)
}

/// What training does with a batch's scored tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    /// Next-token cross-entropy `−log p(target)`: make the text likely.
    Likelihood,
    /// Unlikelihood `−log(1 − p(target))` (Welleck et al., 2020): make the text unlikely.
    /// Bounded below by 0, so it cannot run away the way negated cross-entropy does; its
    /// gradient fades as `p(target)` falls.
    Unlikelihood,
}

/// `1 − p` is floored here so the unlikelihood of a target the model is sure of stays finite.
pub(crate) const MIN_COMPLEMENT: f64 = 1e-6;

/// Gradients from [`head_cross_entropy`].
pub struct HeadGrads {
    /// `d loss / d hidden`, `(tokens, hidden)`.
    pub hidden: Tensor,
    /// `d loss / d head weight`, `(vocab, hidden)`, when asked for.
    pub head: Option<Tensor>,
}

/// Rows of logits computed at once: bounds memory to `CHUNK × vocab` floats.
const CHUNK: usize = 1024;

/// Summed `objective` (cross-entropy or unlikelihood) of `targets` under
/// `hidden · weightᵀ`, computed in row chunks. With `grads = Some((scale, want_head))` also
/// returns `scale ×` its gradients.
pub fn head_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &[TokenId],
    objective: Objective,
    grads: Option<(f64, bool)>,
) -> Result<(f64, Option<HeadGrads>)> {
    let (n, d) = hidden.dims2()?;
    let vocab = weight.dim(0)?;
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::Input(format!(
            "token id {bad} is outside the model's vocabulary of {vocab}"
        )));
    }
    if targets.len() != n {
        return Err(Error::Input(format!(
            "{n} hidden states but {} targets",
            targets.len()
        )));
    }
    let typed = match hidden.dtype() {
        DType::F32 => head_ce_typed::<f32>,
        DType::F64 => head_ce_typed::<f64>,
        dt => {
            return Err(Error::Input(format!(
                "training needs f32 or f64 weights, not {dt:?}"
            )))
        }
    };
    typed((hidden, weight), (n, d, vocab), targets, objective, grads)
}

/// `dst (rows×vocab) = h (rows×d) · Wᵀ` for a head `W` of `vocab` rows of `d`
/// (`Wᵀ[k][j] = W[j·d + k]`): the logits of `rows` states.
pub(crate) fn head_logits<T: Float>(dst: &mut [T], h: &[T], w: &[T], dims: (usize, usize, usize)) {
    head_product(dst, h, w, dims, true)
}

/// `dst (rows×d) = g (rows×vocab) · W (vocab×d)`: the gradient with respect to the states
/// of `rows` logit gradients.
pub(crate) fn head_grad_states<T: Float>(
    dst: &mut [T],
    g: &[T],
    w: &[T],
    dims: (usize, usize, usize),
) {
    head_product(dst, g, w, dims, false)
}

/// `dst = x · Wᵀ` (`transposed`: states to logits) or `dst = x · W` (logit gradients to
/// state gradients) for a head `W` of `vocab` rows of `d`, `x` having `rows` rows.
fn head_product<T: Float>(
    dst: &mut [T],
    x: &[T],
    w: &[T],
    (rows, vocab, d): (usize, usize, usize),
    transposed: bool,
) {
    // (columns of dst, inner length, W's (column, row) strides as the right operand)
    let (n, k, w_strides) = if transposed {
        (vocab, d, (d as isize, 1))
    } else {
        (d, vocab, (1, d as isize))
    };
    gemm_into(
        (rows, n, k),
        dst,
        (1, n as isize),
        false,
        x,
        (1, k as isize),
        w,
        w_strides,
    )
}

/// `dst (m×n) = [dst +] lhs · rhs` with explicit (column, row) strides, on all threads.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into<T: Float>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    dst_strides: (isize, isize),
    accumulate: bool,
    lhs: &[T],
    lhs_strides: (isize, isize),
    rhs: &[T],
    rhs_strides: (isize, isize),
) {
    let span = |(cs, rs): (isize, isize), rows: usize, cols: usize| {
        (rows.max(1) - 1) as isize * rs + (cols.max(1) - 1) as isize * cs + 1
    };
    assert!(dst.len() as isize >= span(dst_strides, m, n));
    assert!(lhs.len() as isize >= span(lhs_strides, m, k));
    assert!(rhs.len() as isize >= span(rhs_strides, k, n));
    // SAFETY: the asserts above keep every strided access inside the three slices, and
    // `dst` is borrowed mutably so it cannot alias `lhs` or `rhs`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_strides.0,
            dst_strides.1,
            accumulate,
            lhs.as_ptr(),
            lhs_strides.0,
            lhs_strides.1,
            rhs.as_ptr(),
            rhs_strides.0,
            rhs_strides.1,
            T::from_f64(if accumulate { 1.0 } else { 0.0 }),
            T::from_f64(1.0),
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
}

/// [`head_cross_entropy`] in one float type, on checked shapes `(n, d, vocab)`.
#[allow(clippy::assign_op_pattern)] // T has no *=, -= bounds
fn head_ce_typed<T: Float>(
    (hidden, weight): (&Tensor, &Tensor),
    (n, d, vocab): (usize, usize, usize),
    targets: &[TokenId],
    objective: Objective,
    grads: Option<(f64, bool)>,
) -> Result<(f64, Option<HeadGrads>)> {
    // Plain copies: these values are fed back by hand and must not join the autograd graph.
    let h: Vec<T> = ops::values(hidden)?;
    let w: Vec<T> = ops::values(weight)?;
    let chunk = CHUNK.min(n.max(1));
    let mut logits: Vec<T> = vec![T::from_f64(0.0); chunk * vocab];
    let mut grad_h: Vec<T> = Vec::new();
    let mut grad_w: Vec<T> = Vec::new();
    if let Some((_, want_head)) = grads {
        grad_h = vec![T::from_f64(0.0); n * d];
        if want_head {
            grad_w = vec![T::from_f64(0.0); vocab * d];
        }
    }
    let mut total = 0.0f64;
    for start in (0..n).step_by(chunk) {
        let rows = chunk.min(n - start);
        let hc = &h[start * d..(start + rows) * d];
        let lg = &mut logits[..rows * vocab];
        head_logits(lg, hc, &w, (rows, vocab, d));
        let tg = &targets[start..start + rows];
        // Per row: log-sum-exp, the target's loss, and (in place) its gradient with respect to
        // the logits. Cross-entropy's is `scale × (softmax − one-hot)`; unlikelihood's is the
        // same vector times `−p / (1 − p)`.
        let losses: Vec<f64> = lg
            .par_chunks_mut(vocab)
            .zip(tg.par_iter())
            .map(|(row, &t)| {
                let max = row
                    .iter()
                    .fold(f64::NEG_INFINITY, |m, &x| m.max(x.to_f64()));
                let m = T::from_f64(max);
                let target = row[t as usize].to_f64() - max;
                let mut sum = 0.0f64;
                for x in row.iter_mut() {
                    *x = (*x - m).exp();
                    sum += x.to_f64();
                }
                let logp = target - sum.ln();
                let (loss, coef) = match objective {
                    Objective::Likelihood => (-logp, 1.0),
                    Objective::Unlikelihood => {
                        let p = logp.exp();
                        let complement = (-logp.exp_m1()).max(MIN_COMPLEMENT);
                        (-complement.ln(), -p / complement)
                    }
                };
                if let Some((scale, _)) = grads {
                    let k = T::from_f64(scale * coef / sum);
                    for x in row.iter_mut() {
                        *x = *x * k;
                    }
                    row[t as usize] = row[t as usize] - T::from_f64(scale * coef);
                }
                loss
            })
            .collect();
        total += losses.iter().sum::<f64>();
        if let Some((_, want_head)) = grads {
            let gh = &mut grad_h[start * d..(start + rows) * d];
            head_grad_states(gh, lg, &w, (rows, vocab, d));
            if want_head {
                // grad_W (V×d) += gᵀ (V×rows) · h (rows×d).
                gemm_into(
                    (vocab, d, rows),
                    &mut grad_w,
                    (1, d as isize),
                    true,
                    lg,
                    (vocab as isize, 1),
                    hc,
                    (1, d as isize),
                );
            }
        }
    }
    let dev = hidden.device();
    let grads = match grads {
        None => None,
        Some((_, want_head)) => Some(HeadGrads {
            hidden: Tensor::from_vec(grad_h, (n, d), dev)?,
            head: if want_head {
                Some(Tensor::from_vec(grad_w, (vocab, d), dev)?)
            } else {
                None
            },
        }),
    };
    Ok((total, grads))
}
