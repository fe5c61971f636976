//! Gemma 3 decoder (text part): config, weights, block, model.
//!
//! Differences from llama that matter here: embeddings scaled by √width, RMS-normalised
//! queries and keys per head, norms after attention and after the MLP as well as before,
//! GELU(tanh) MLP, five sliding-window layers (window 512, RoPE base 10 000) for every global
//! layer (RoPE base from the file), queries scaled by 1/√head_dim, LM head tied to the
//! embeddings. GGUF norm weights already include Gemma's `1 +` offset (the converter adds it).

use candle_core::{Device, Tensor};

use super::attention::{attend, rms_norm, split_heads, KvCache, Rope, RopeStyle};
use super::llama::{load_gguf_layer_matrices, Embedding, Linear, Projections};
use super::{CausalLm, LoadOptions, ModelInfo};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;

/// Gemma 3 alternates five local (sliding-window) layers with one global layer.
const SLIDING_PATTERN: usize = 6;
const LOCAL_ROPE_BASE: f32 = 10_000.0;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Gemma3Config {
    pub hidden_size: usize,
    pub n_layers: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_base: f32,
    pub sliding_window: usize,
    pub context_length: usize,
    pub vocab_size: usize,
}

struct Block {
    attn_norm: Tensor,
    /// q, k, v
    qkv: Projections,
    wo: Linear,
    q_norm: Tensor,
    k_norm: Tensor,
    post_attn_norm: Tensor,
    ffn_norm: Tensor,
    /// gate, up
    gate_up: Projections,
    w_down: Linear,
    post_ffn_norm: Tensor,
    /// `Some(w)` for local layers.
    window: Option<usize>,
}

pub struct Gemma3 {
    info: ModelInfo,
    cfg: Gemma3Config,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: Tensor,
    head: Linear,
    rope_local: Rope,
    rope_global: Rope,
}

impl Gemma3 {
    pub fn from_gguf(f: &mut GgufFile, opts: LoadOptions) -> Result<Self> {
        let n_head = f.u32("gemma3.attention.head_count")? as usize;
        let cfg = Gemma3Config {
            hidden_size: f.u32("gemma3.embedding_length")? as usize,
            n_layers: f.u32("gemma3.block_count")? as usize,
            n_head,
            n_kv_head: f
                .u32("gemma3.attention.head_count_kv")
                .unwrap_or(n_head as u32) as usize,
            head_dim: f.u32("gemma3.attention.key_length")? as usize,
            rms_norm_eps: f.f32("gemma3.attention.layer_norm_rms_epsilon")?,
            rope_base: f.f32("gemma3.rope.freq_base").unwrap_or(1_000_000.0),
            sliding_window: f.u32("gemma3.attention.sliding_window")? as usize,
            context_length: f.u32("gemma3.context_length")? as usize,
            vocab_size: f.strings("tokenizer.ggml.tokens")?.len(),
        };
        if !cfg.n_head.is_multiple_of(cfg.n_kv_head) {
            return Err(Error::Metadata {
                path: f.path.clone(),
                key: "gemma3.attention.head_count_kv".into(),
                problem: format!(
                    "({}) does not divide head_count ({})",
                    cfg.n_kv_head, cfg.n_head
                ),
            });
        }
        let dense = |f: &mut GgufFile, n: &str| -> Result<Tensor> {
            Ok(f.tensor(n)?.dequantize(&Device::Cpu)?)
        };
        let embed_q = f.tensor("token_embd.weight")?;
        let head = Linear::load(opts, f.lm_head_tensor()?)?;
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = format!("blk.{i}");
            let (qkv, wo, gate_up, w_down) = load_gguf_layer_matrices(f, opts, &p)?;
            let local = (i + 1) % SLIDING_PATTERN != 0;
            blocks.push(Block {
                attn_norm: dense(f, &format!("{p}.attn_norm.weight"))?,
                q_norm: dense(f, &format!("{p}.attn_q_norm.weight"))?,
                k_norm: dense(f, &format!("{p}.attn_k_norm.weight"))?,
                post_attn_norm: dense(f, &format!("{p}.post_attention_norm.weight"))?,
                ffn_norm: dense(f, &format!("{p}.ffn_norm.weight"))?,
                post_ffn_norm: dense(f, &format!("{p}.post_ffw_norm.weight"))?,
                qkv,
                wo,
                gate_up,
                w_down,
                window: local.then_some(cfg.sliding_window),
            });
        }
        let norm = dense(f, "output_norm.weight")?;
        let rope_local = Rope::new(
            cfg.head_dim,
            LOCAL_ROPE_BASE,
            cfg.context_length,
            RopeStyle::Halves,
        )?;
        let rope_global = Rope::new(
            cfg.head_dim,
            cfg.rope_base,
            cfg.context_length,
            RopeStyle::Halves,
        )?;
        let info = ModelInfo {
            arch: "gemma3".into(),
            name: f.string("general.name").unwrap_or_else(|_| "gemma3".into()),
            hidden_size: cfg.hidden_size,
            vocab_size: cfg.vocab_size,
            n_layers: cfg.n_layers,
            context_length: cfg.context_length,
        };
        Ok(Self {
            info,
            cfg,
            embed: Embedding::load(opts, embed_q)?,
            blocks,
            norm,
            head,
            rope_local,
            rope_global,
        })
    }
}

impl CausalLm for Gemma3 {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn forward_hidden(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let at = self.info.start(ids, cache)?;
        let c = &self.cfg;
        let eps = c.rms_norm_eps;
        let mut x = (self.embed.forward(ids)? * (c.hidden_size as f64).sqrt())?;
        for (i, blk) in self.blocks.iter().enumerate() {
            let rope = if blk.window.is_some() {
                &self.rope_local
            } else {
                &self.rope_global
            };
            let h = rms_norm(&x, &blk.attn_norm, eps)?;
            let [q, k, v] = blk.qkv.forward(&h)?;
            let q = rms_norm(&split_heads(&q, c.n_head, c.head_dim)?, &blk.q_norm, eps)?;
            let k = rms_norm(&split_heads(&k, c.n_kv_head, c.head_dim)?, &blk.k_norm, eps)?;
            let v = split_heads(&v, c.n_kv_head, c.head_dim)?.contiguous()?;
            let q = rope.apply_at(&q, &at)?;
            let k = rope.apply_at(&k, &at)?;
            let (k, v) = cache.append(i, k, v)?;
            let scale = 1.0 / (c.head_dim as f64).sqrt();
            let a = attend(&q, &k, &v, scale, blk.window, at.rows.as_deref())?;
            let a = rms_norm(&blk.wo.forward(&a)?, &blk.post_attn_norm, eps)?;
            x = (x + a)?;
            let h = rms_norm(&x, &blk.ffn_norm, eps)?;
            let [gate, up] = blk.gate_up.forward(&h)?;
            let m = blk.w_down.forward(&(gate.gelu()? * up)?)?;
            x = (x + rms_norm(&m, &blk.post_ffn_norm, eps)?)?;
        }
        cache.advance(ids.dim(1)?);
        rms_norm(&x, &self.norm, eps)
    }

    fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        self.head.forward(hidden)
    }
}
