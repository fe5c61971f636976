//! Llama-family decoder (SmolLM2 and friends): config, weights, block, model.
//!
//! Loads from GGUF (quantized weights kept quantized; slow block formats requantized to Q8_0,
//! see `Linear`) or from a Hugging Face directory
//! (config.json + *.safetensors, f32/f16/bf16).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::attention::{attend, rms_norm, split_heads, KvCache, Rope, RopeStyle};
use super::q8::{self, Q8Tiles};
use super::{CausalLm, LoadOptions, ModelInfo};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub head_dim: Option<usize>,
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
}

/// A linear layer that is either quantized or plain.
///
/// Quantized weights are held in a format with a fast CPU kernel: Q4_1/Q5_0/Q5_1 (scalar dot
/// products in candle 0.11) become Q8_0; Q8_0 matrices go to our tiled kernel
/// ([`super::q8`], AVX-512 VNNI or AVX2) wherever candle has no faster kernel of its own
/// ([`q8::takes`]: widths that are not a multiple of 256, and every width on CPUs without
/// VNNI); everything else goes through candle's `QMatMul`.
#[derive(Debug, Clone)]
pub(crate) enum Linear {
    Candle(QMatMul),
    Tiles(std::sync::Arc<Q8Tiles>),
}

impl Linear {
    pub(crate) fn load(opts: LoadOptions, t: QTensor) -> Result<Self> {
        if opts.dequantize {
            return Ok(Self::dense(t.dequantize(&Device::Cpu)?));
        }
        Self::quantized(t)
    }

    pub(crate) fn quantized(t: QTensor) -> Result<Self> {
        let t = crate::gguf::requantize_for_speed(t)?;
        let (_, k) = t.shape().dims2()?;
        if t.dtype() == GgmlDType::Q8_0 && q8::takes(k) {
            if let Some(tiles) = Q8Tiles::pack(&t)? {
                return Ok(Self::Tiles(std::sync::Arc::new(tiles)));
            }
        }
        Ok(Self::Candle(QMatMul::from_qtensor(t)?))
    }

    /// `w`: `(out, in)`.
    pub(crate) fn dense(w: Tensor) -> Self {
        Self::Candle(QMatMul::Tensor(w))
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(mm) => Ok(mm.forward(x)?),
            Self::Tiles(t) => t.forward(x),
        }
    }
}

/// Several projections of the same input (q/k/v; gate/up) as one matmul when their weights
/// tile together: one activation quantization and one dispatch instead of three or two.
#[derive(Debug, Clone)]
pub(crate) enum Projections {
    Fused(std::sync::Arc<Q8Tiles>, Vec<usize>),
    Separate(Vec<Linear>),
}

impl Projections {
    pub(crate) fn load(opts: LoadOptions, parts: Vec<QTensor>) -> Result<Self> {
        if opts.dequantize || !q8::available() {
            return Ok(Self::Separate(
                parts
                    .into_iter()
                    .map(|p| Linear::load(opts, p))
                    .collect::<Result<_>>()?,
            ));
        }
        let parts = parts
            .into_iter()
            .map(crate::gguf::requantize_for_speed)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let k = parts[0].shape().dims2()?.1;
        let same = parts.iter().all(|p| {
            p.dtype() == GgmlDType::Q8_0 && p.shape().dims2().is_ok_and(|(_, pk)| pk == k)
        });
        if same && q8::takes(k) {
            // Q8_0 rows are stored one after another: stacking matrices is concatenating bytes
            let mut bytes = Vec::new();
            let mut sizes = Vec::new();
            for p in &parts {
                bytes.extend_from_slice(&p.data()?);
                sizes.push(p.shape().dims2()?.0);
            }
            let storage = QStorage::from_data(
                std::borrow::Cow::Owned(bytes),
                &Device::Cpu,
                GgmlDType::Q8_0,
            )?;
            let stacked = QTensor::new(storage, (sizes.iter().sum::<usize>(), k))?;
            if let Some(t) = Q8Tiles::pack(&stacked)? {
                return Ok(Self::Fused(std::sync::Arc::new(t), sizes));
            }
        }
        Ok(Self::Separate(
            parts
                .into_iter()
                .map(Linear::quantized)
                .collect::<Result<_>>()?,
        ))
    }

    /// `ws`: plain `(out, in)` matrices.
    pub(crate) fn dense(ws: Vec<Tensor>) -> Self {
        Self::Separate(ws.into_iter().map(Linear::dense).collect())
    }

    /// The `N` projections of `x`, in load order.
    pub(crate) fn forward<const N: usize>(&self, x: &Tensor) -> Result<[Tensor; N]> {
        let parts = match self {
            Self::Fused(t, sizes) => t.forward_split(x, sizes)?,
            Self::Separate(ls) => ls.iter().map(|l| l.forward(x)).collect::<Result<_>>()?,
        };
        let got = parts.len();
        parts.try_into().map_err(|_| {
            crate::Error::Candle(candle_core::Error::Msg(format!(
                "{got} projections where the layer needs {N}"
            )))
        })
    }
}

/// The matrices every llama-style GGUF layer `prefix` (`blk.N`) has, named as llama.cpp
/// names them: (q/k/v, attention output, gate/up, down).
pub(crate) fn load_gguf_layer_matrices(
    f: &mut GgufFile,
    opts: LoadOptions,
    prefix: &str,
) -> Result<(Projections, Linear, Projections, Linear)> {
    let mut raw = |n: &str| f.tensor(&format!("{prefix}.{n}.weight"));
    let qkv = Projections::load(opts, vec![raw("attn_q")?, raw("attn_k")?, raw("attn_v")?])?;
    let gate_up = Projections::load(opts, vec![raw("ffn_gate")?, raw("ffn_up")?])?;
    let wo = Linear::load(opts, raw("attn_output")?)?;
    let w_down = Linear::load(opts, raw("ffn_down")?)?;
    Ok((qkv, wo, gate_up, w_down))
}

/// Token embedding table, quantized or plain.
#[derive(Debug, Clone)]
pub(crate) enum Embedding {
    Quantized(std::sync::Arc<QTensor>),
    Dense(Tensor),
}

impl Embedding {
    pub(crate) fn load(opts: LoadOptions, t: QTensor) -> Result<Self> {
        Ok(if opts.dequantize {
            Embedding::Dense(t.dequantize(&Device::Cpu)?)
        } else {
            Embedding::Quantized(std::sync::Arc::new(t))
        })
    }

    pub(crate) fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Embedding::Quantized(q) => q.embedding(ids)?,
            Embedding::Dense(w) => {
                let (b, t) = ids.dims2()?;
                w.index_select(&ids.flatten_all()?, 0)?
                    .reshape((b, t, w.dim(1)?))?
            }
        })
    }
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: Tensor,
    /// q, k, v
    qkv: Projections,
    wo: Linear,
    ffn_norm: Tensor,
    /// gate, up
    gate_up: Projections,
    w_down: Linear,
}

pub struct Llama {
    info: ModelInfo,
    cfg: LlamaConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: Tensor,
    head: Linear,
    rope: Rope,
}

impl Llama {
    pub fn from_gguf(f: &mut GgufFile, opts: LoadOptions) -> Result<Self> {
        let n_head = f.u32("llama.attention.head_count")? as usize;
        let hidden = f.u32("llama.embedding_length")? as usize;
        let n_layers = f.u32("llama.block_count")? as usize;
        let vocab = match f.u32("llama.vocab_size") {
            Ok(v) => v as usize,
            Err(_) => f.strings("tokenizer.ggml.tokens")?.len(),
        };
        let cfg = LlamaConfig {
            hidden_size: hidden,
            intermediate_size: f.u32("llama.feed_forward_length")? as usize,
            num_hidden_layers: n_layers,
            num_attention_heads: n_head,
            num_key_value_heads: f
                .u32("llama.attention.head_count_kv")
                .unwrap_or(n_head as u32) as usize,
            vocab_size: vocab,
            rms_norm_eps: f.f32("llama.attention.layer_norm_rms_epsilon")? as f64,
            rope_theta: f.f32("llama.rope.freq_base").unwrap_or(10_000.0) as f64,
            max_position_embeddings: f.u32("llama.context_length")? as usize,
            tie_word_embeddings: !f.has_tensor("output.weight"),
            head_dim: f.u32("llama.rope.dimension_count").ok().map(|d| d as usize),
        };
        let embed_q = f.tensor("token_embd.weight")?;
        let head = Linear::load(opts, f.lm_head_tensor()?)?;
        let mut blocks = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let p = format!("blk.{i}");
            let (qkv, wo, gate_up, w_down) = load_gguf_layer_matrices(f, opts, &p)?;
            blocks.push(Block {
                attn_norm: f
                    .tensor(&format!("{p}.attn_norm.weight"))?
                    .dequantize(&Device::Cpu)?,
                ffn_norm: f
                    .tensor(&format!("{p}.ffn_norm.weight"))?
                    .dequantize(&Device::Cpu)?,
                qkv,
                wo,
                gate_up,
                w_down,
            });
        }
        let norm = f.tensor("output_norm.weight")?.dequantize(&Device::Cpu)?;
        let name = f.string("general.name").unwrap_or_else(|_| "llama".into());
        Self::assemble(
            cfg,
            name,
            Embedding::load(opts, embed_q)?,
            blocks,
            norm,
            head,
            RopeStyle::Interleaved,
        )
    }

    /// Loads a Hugging Face Llama checkpoint directory. Matrices are quantized to Q8_0 (the
    /// fast kernels) unless `opts.dequantize` asks for the exact f32 weights.
    pub fn from_hf_dir(dir: &Path, opts: LoadOptions) -> Result<Self> {
        let (cfg, weights) = read_hf_weights(dir)?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "llama".into());
        Self::from_hf_weights(cfg, weights, &name, dir, opts)
    }

    /// Builds the model from Hugging Face-named f32 weights already in memory (`origin` names
    /// where they came from, for errors).
    pub fn from_hf_weights(
        cfg: LlamaConfig,
        mut weights: std::collections::HashMap<String, Tensor>,
        name: &str,
        origin: &Path,
        opts: LoadOptions,
    ) -> Result<Self> {
        let dir = origin;
        let bad = |reason: String| Error::BadModelDir {
            path: dir.to_path_buf(),
            reason,
        };
        let mut take = |name: &str| -> Result<Tensor> {
            let t = weights
                .remove(name)
                .ok_or_else(|| bad(format!("tensor {name} is missing")))?;
            Ok(t)
        };
        let embed_w = take("model.embed_tokens.weight")?;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut w = |n: &str| take(&format!("{p}.{n}.weight"));
            let (qkv, wo, gate_up, w_down) = if opts.dequantize {
                (
                    Projections::dense(vec![
                        w("self_attn.q_proj")?,
                        w("self_attn.k_proj")?,
                        w("self_attn.v_proj")?,
                    ]),
                    Linear::dense(w("self_attn.o_proj")?),
                    Projections::dense(vec![w("mlp.gate_proj")?, w("mlp.up_proj")?]),
                    Linear::dense(w("mlp.down_proj")?),
                )
            } else {
                let mut q = |n: &str| -> Result<QTensor> {
                    Ok(QTensor::quantize(&w(n)?, GgmlDType::Q8_0)?)
                };
                (
                    Projections::load(
                        opts,
                        vec![
                            q("self_attn.q_proj")?,
                            q("self_attn.k_proj")?,
                            q("self_attn.v_proj")?,
                        ],
                    )?,
                    Linear::load(opts, q("self_attn.o_proj")?)?,
                    Projections::load(opts, vec![q("mlp.gate_proj")?, q("mlp.up_proj")?])?,
                    Linear::load(opts, q("mlp.down_proj")?)?,
                )
            };
            blocks.push(Block {
                attn_norm: take(&format!("{p}.input_layernorm.weight"))?,
                ffn_norm: take(&format!("{p}.post_attention_layernorm.weight"))?,
                qkv,
                wo,
                gate_up,
                w_down,
            });
        }
        let norm = take("model.norm.weight")?;
        let head_w = match take("lm_head.weight") {
            Ok(w) => w,
            Err(_) if cfg.tie_word_embeddings => embed_w.clone(),
            Err(e) => return Err(e),
        };
        let head = if opts.dequantize {
            Linear::dense(head_w)
        } else {
            Linear::load(opts, QTensor::quantize(&head_w, GgmlDType::Q8_0)?)?
        };
        Self::assemble(
            cfg,
            name.to_string(),
            Embedding::Dense(embed_w),
            blocks,
            norm,
            head,
            RopeStyle::Halves,
        )
    }

    fn assemble(
        cfg: LlamaConfig,
        name: String,
        embed: Embedding,
        blocks: Vec<Block>,
        norm: Tensor,
        head: Linear,
        style: RopeStyle,
    ) -> Result<Self> {
        let rope = Rope::new(
            cfg.head_dim(),
            cfg.rope_theta as f32,
            cfg.max_position_embeddings,
            style,
        )?;
        let info = ModelInfo {
            arch: "llama".into(),
            name,
            hidden_size: cfg.hidden_size,
            vocab_size: cfg.vocab_size,
            n_layers: cfg.num_hidden_layers,
            context_length: cfg.max_position_embeddings,
        };
        Ok(Self {
            info,
            cfg,
            embed,
            blocks,
            norm,
            head,
            rope,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }
}

impl CausalLm for Llama {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn forward_hidden(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let at = self.info.start(ids, cache)?;
        let eps = self.cfg.rms_norm_eps as f32;
        let (nh, nkv, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim(),
        );
        let scale = 1.0 / (hd as f64).sqrt();
        let mut x = self.embed.forward(ids)?;
        for (i, blk) in self.blocks.iter().enumerate() {
            let h = rms_norm(&x, &blk.attn_norm, eps)?;
            let [q, k, v] = blk.qkv.forward(&h)?;
            let q = split_heads(&q, nh, hd)?;
            let q = self.rope.apply_at(&q, &at)?;
            let k = split_heads(&k, nkv, hd)?;
            let k = self.rope.apply_at(&k, &at)?;
            let v = split_heads(&v, nkv, hd)?.contiguous()?;
            let (k, v) = cache.append(i, k, v)?;
            let a = attend(&q, &k, &v, scale, None, at.rows.as_deref())?;
            x = (x + blk.wo.forward(&a)?)?;
            let h = rms_norm(&x, &blk.ffn_norm, eps)?;
            let [gate, up] = blk.gate_up.forward(&h)?;
            let m = silu_mul(&gate, &up)?;
            x = (x + blk.w_down.forward(&m)?)?;
        }
        cache.advance(ids.dim(1)?);
        rms_norm(&x, &self.norm, eps)
    }

    fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        self.head.forward(hidden)
    }
}

/// `silu(gate) · up` in one pass with the vectorized `expf`: the same values as candle's
/// `silu(gate)? * up` (tested in [`crate::expf`]).
pub(crate) fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let g: Vec<f32> = gate.flatten_all()?.to_vec1()?;
    let u: Vec<f32> = up.flatten_all()?.to_vec1()?;
    if g.len() != u.len() {
        return Err(Error::Input(format!(
            "gate {:?} and up {:?} differ in shape",
            gate.dims(),
            up.dims()
        )));
    }
    let mut out = vec![0f32; g.len()];
    crate::expf::silu_mul(&g, &u, &mut out);
    Ok(Tensor::from_vec(out, gate.dims(), &Device::Cpu)?)
}

/// Reads a Hugging Face Llama directory's config.json and safetensors (as f32).
pub fn read_hf_weights(dir: &Path) -> Result<(LlamaConfig, HashMap<String, Tensor>)> {
    let bad = |reason: String| Error::BadModelDir {
        path: dir.to_path_buf(),
        reason,
    };
    let cfg_path = dir.join("config.json");
    let cfg_text = std::fs::read_to_string(&cfg_path)
        .map_err(|e| bad(format!("cannot read config.json: {e}")))?;
    let cfg_json: serde_json::Value = serde_json::from_str(&cfg_text)
        .map_err(|e| bad(format!("config.json is not valid JSON: {e}")))?;
    let model_type = cfg_json["model_type"].as_str().unwrap_or("");
    if model_type != "llama" {
        return Err(Error::UnsupportedArch {
            path: cfg_path,
            arch: model_type.to_string(),
            supported: "llama (Hugging Face directories)",
        });
    }
    let config: LlamaConfig = serde_json::from_value(cfg_json)
        .map_err(|e| bad(format!("config.json lacks a Llama field: {e}")))?;
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| bad(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(bad("no *.safetensors file".into()));
    }
    let mut tensors = HashMap::new();
    for file in &files {
        let ts = candle_core::safetensors::load(file, &Device::Cpu)
            .map_err(|e| bad(format!("{}: {e}", file.display())))?;
        for (k, v) in ts {
            tensors.insert(k, v.to_dtype(DType::F32)?);
        }
    }
    Ok((config, tensors))
}
