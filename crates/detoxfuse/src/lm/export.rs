//! Hugging Face Llama directories (config.json, model.safetensors in f32, tokenizer.json):
//! building one from a llama-family GGUF, reading one, writing one atomically. What is written
//! loads with `transformers.LlamaForCausalLM.from_pretrained` and with
//! [`super::llama::Llama::from_hf_dir`].
//!
//! llama.cpp's converter permutes the rows of Q and K so that RoPE rotates adjacent pairs;
//! Hugging Face checkpoints rotate halves. Reading a GGUF here undoes that permutation.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::llama::LlamaConfig;
use crate::error::{Error, IoContext, Result};
use crate::gguf::GgufFile;
use crate::text::Tokenizer;

/// A Llama model in Hugging Face naming, f32, in memory.
pub struct HfLlama {
    pub config: LlamaConfig,
    /// `model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`, ...
    pub tensors: HashMap<String, Tensor>,
    pub tokenizer: Tokenizer,
}

/// Inverse of llama.cpp's `permute`: rows `(head, pair, 2)` back to `(head, 2, pair)`.
fn unpermute(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / n_head;
    Ok(w.reshape((n_head, hd / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

/// The names of one decoder layer's tensors: (GGUF suffix, Hugging Face suffix).
pub const LAYER_TENSORS: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Dequantizes a llama-family GGUF into Hugging Face naming. `max_layers` keeps only the first
/// layers (the calibration model is a base LM's embeddings and first L layers).
pub fn hf_llama_from_gguf(gguf: &Path, max_layers: Option<usize>) -> Result<HfLlama> {
    let mut f = GgufFile::open(gguf)?;
    if f.architecture()? != "llama" {
        return Err(Error::UnsupportedArch {
            path: gguf.to_path_buf(),
            arch: f.architecture()?,
            supported: "llama",
        });
    }
    let tokenizer = Tokenizer::from_gguf(&f)?;
    let n_head = f.u32("llama.attention.head_count")? as usize;
    let n_kv = f
        .u32("llama.attention.head_count_kv")
        .unwrap_or(n_head as u32) as usize;
    let n_layers = f.u32("llama.block_count")? as usize;
    let n_keep = max_layers.map_or(n_layers, |l| l.min(n_layers));
    let hidden = f.u32("llama.embedding_length")? as usize;
    let tied = !f.has_tensor("output.weight");
    let mut get = |name: &str| -> Result<Tensor> { Ok(f.tensor(name)?.dequantize(&Device::Cpu)?) };
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert(
        "model.embed_tokens.weight".into(),
        get("token_embd.weight")?,
    );
    t.insert("model.norm.weight".into(), get("output_norm.weight")?);
    if !tied {
        t.insert("lm_head.weight".into(), get("output.weight")?);
    }
    for i in 0..n_keep {
        for (a, b) in LAYER_TENSORS {
            let w = get(&format!("blk.{i}.{a}.weight"))?;
            let w = match a {
                "attn_q" => unpermute(&w, n_head)?,
                "attn_k" => unpermute(&w, n_kv)?,
                _ => w,
            };
            t.insert(format!("model.layers.{i}.{b}.weight"), w);
        }
    }
    let vocab = t["model.embed_tokens.weight"].dim(0)?;
    let config = LlamaConfig {
        hidden_size: hidden,
        intermediate_size: f.u32("llama.feed_forward_length")? as usize,
        num_hidden_layers: n_keep,
        num_attention_heads: n_head,
        num_key_value_heads: n_kv,
        vocab_size: vocab,
        rms_norm_eps: f.f32("llama.attention.layer_norm_rms_epsilon")? as f64,
        rope_theta: f.f32("llama.rope.freq_base").unwrap_or(10_000.0) as f64,
        max_position_embeddings: f.u32("llama.context_length")? as usize,
        tie_word_embeddings: tied,
        head_dim: Some(hidden / n_head),
    };
    Ok(HfLlama {
        config,
        tensors: t,
        tokenizer,
    })
}

/// Reads a Hugging Face Llama directory (with its tokenizer.json) into f32 tensors.
pub fn read_hf_dir(dir: &Path) -> Result<HfLlama> {
    let (config, tensors) = super::llama::read_hf_weights(dir)?;
    let tokenizer = Tokenizer::from_tokenizer_json(&dir.join("tokenizer.json"))?;
    Ok(HfLlama {
        config,
        tensors,
        tokenizer,
    })
}

/// Writes `model` to `out_dir` atomically: everything goes to a sibling temporary directory
/// that is renamed into place once complete, so a crash never leaves a directory that looks
/// finished. An existing `out_dir` is replaced. `extra` files (name, contents) are added.
pub fn write_hf_dir(model: &HfLlama, out_dir: &Path, extra: &[(&str, String)]) -> Result<()> {
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).ctx(|| format!("creating {}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".detoxfuse-export-")
        .tempdir_in(&parent)
        .ctx(|| format!("creating a temporary directory in {}", parent.display()))?;
    let c = &model.config;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim(),
        "vocab_size": c.vocab_size,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": model.tokenizer.bos,
        "eos_token_id": model.tokenizer.eos,
        "torch_dtype": "float32",
    });
    let write = |name: &str, text: &str| -> Result<()> {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).ctx(|| format!("writing {}", p.display()))
    };
    write("config.json", &serde_json::to_string_pretty(&config)?)?;
    write("tokenizer.json", &model.tokenizer.to_tokenizer_json()?)?;
    for (name, text) in extra {
        write(name, text)?;
    }
    let tensors: HashMap<String, Tensor> = model
        .tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_dtype(DType::F32)?.contiguous()?)))
        .collect::<Result<_>>()?;
    crate::atomic::save_safetensors(&tensors, &tmp.path().join("model.safetensors"))?;
    let tmp = tmp.keep();
    crate::atomic::move_into_place(&tmp, out_dir)
}

/// Writes a llama-family GGUF as a Hugging Face Llama directory.
pub fn export_hf_llama(gguf: &Path, out_dir: &Path) -> Result<()> {
    write_hf_dir(&hf_llama_from_gguf(gguf, None)?, out_dir, &[])
}
