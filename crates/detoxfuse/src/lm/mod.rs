//! Causal language models behind one trait.
//!
//! The method needs the target's *final post-norm hidden state* separately from its LM head
//! (fusion happens between the two), so every model exposes [`CausalLm::forward_hidden`] and
//! [`CausalLm::lm_head`]. Caches live outside the model ([`KvCache`]), so one loaded model can
//! serve many sequences, be rolled back (cross-tokenizer fusion) and be batched (k samples of
//! one prompt share its prefix: [`KvCache::repeat_batch`]).

mod attention;
pub mod export;
pub mod gemma3;
pub mod llama;
pub mod q8;

use std::path::Path;

use candle_core::{Device, Tensor};

pub use attention::{take_rows, KvCache, Positions};

use crate::error::{Error, Result};
use crate::gguf::GgufFile;

pub use crate::text::TokenId;

/// What a caller needs to know about a loaded model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    /// Architecture family, e.g. `llama`, `gemma3`.
    pub arch: String,
    /// Human name from the file's metadata.
    pub name: String,
    /// Width of the hidden state that `forward_hidden` returns.
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub n_layers: usize,
    /// Longest sequence (prompt + generation) the model accepts.
    pub context_length: usize,
}

impl ModelInfo {
    /// Where `ids` (shape `(batch, seq)`) start after what `cache` holds: an error when the
    /// cache and the new tokens together exceed the context, or when a cache whose rows
    /// differ in length is given more than one token per row.
    pub fn start(&self, ids: &Tensor, cache: &KvCache) -> Result<attention::Positions> {
        let t = ids.dims2()?.1;
        if cache.row_lens().is_some() && t != 1 {
            return Err(Error::Input(format!(
                "a cache whose rows have different lengths takes one token per row a step, not {t}; prefill each sequence on its own and merge (KvCache::append_rows)"
            )));
        }
        let (offset, tokens) = (cache.len(), cache.len() + t);
        if tokens > self.context_length {
            return Err(Error::ContextOverflow {
                tokens,
                requested: 0,
                context: self.context_length,
            });
        }
        Ok(attention::Positions {
            offset,
            rows: cache.row_lens().map(<[usize]>::to_vec),
        })
    }
}

/// A causal LM split at the point where output-layer fusion happens.
pub trait CausalLm: Send + Sync {
    fn info(&self) -> &ModelInfo;

    /// An empty cache for this model.
    fn new_cache(&self) -> KvCache {
        KvCache::new(self.info().n_layers)
    }

    /// Runs `ids` (shape `(batch, seq)`, u32) after what `cache` already holds and returns the
    /// final normalised hidden states `(batch, seq, hidden_size)`; appends to the cache.
    fn forward_hidden(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor>;

    /// Maps hidden states `(.., hidden_size)` to logits `(.., vocab_size)`.
    fn lm_head(&self, hidden: &Tensor) -> Result<Tensor>;

    /// Convenience: logits of the last position of each sequence, `(batch, vocab)`.
    fn forward_last_logits(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let h = self.forward_hidden(ids, cache)?;
        let t = h.dim(1)?;
        let last = h.narrow(1, t - 1, 1)?.squeeze(1)?;
        self.lm_head(&last)
    }
}

/// How to hold the weights in memory.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Dequantize every weight to f32: slower, but free of the 8-bit activation quantization
    /// that quantized kernels apply, whose rounding makes logits depend slightly (up to ~1 on
    /// this repo's models) on how the same positions are batched. Tests of exact equalities
    /// use it.
    pub dequantize: bool,
}

/// Loads a model from a `.gguf` file or a Hugging Face directory (config.json +
/// *.safetensors), choosing the implementation from the architecture it declares.
pub fn load(path: &Path) -> Result<Box<dyn CausalLm>> {
    load_with(path, LoadOptions::default())
}

pub fn load_with(path: &Path, opts: LoadOptions) -> Result<Box<dyn CausalLm>> {
    if path.is_dir() {
        return Ok(Box::new(llama::Llama::from_hf_dir(path, opts)?));
    }
    let mut file = GgufFile::open(path)?;
    let arch = file.architecture()?;
    match arch.as_str() {
        "llama" => Ok(Box::new(llama::Llama::from_gguf(&mut file, opts)?)),
        "gemma3" => Ok(Box::new(gemma3::Gemma3::from_gguf(&mut file, opts)?)),
        other => Err(Error::UnsupportedArch {
            path: path.to_path_buf(),
            arch: other.to_string(),
            supported: "llama, gemma3",
        }),
    }
}

/// The LM head weight `(vocab, hidden)` of a model file, dequantized to f32 (what training
/// through a frozen head multiplies by).
pub fn head_weight(path: &Path) -> Result<Tensor> {
    if path.is_dir() {
        let (cfg, mut w) = llama::read_hf_weights(path)?;
        let name = match w.contains_key("lm_head.weight") {
            true => "lm_head.weight",
            false if cfg.tie_word_embeddings => "model.embed_tokens.weight",
            false => "lm_head.weight",
        };
        return w.remove(name).ok_or_else(|| Error::BadModelDir {
            path: path.to_path_buf(),
            reason: format!("tensor {name} is missing"),
        });
    }
    let mut file = GgufFile::open(path)?;
    Ok(file.lm_head_tensor()?.dequantize(&Device::Cpu)?)
}

/// Puts token ids on the CPU as a `(batch, seq)` tensor.
pub fn ids_tensor(rows: &[Vec<TokenId>]) -> Result<Tensor> {
    let b = rows.len();
    let t = rows.first().map_or(0, |r| r.len());
    if rows.iter().any(|r| r.len() != t) || t == 0 {
        return Err(Error::Input(
            "every sequence of a batch step must have the same, non-zero length".into(),
        ));
    }
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (b, t), &Device::Cpu)?)
}
