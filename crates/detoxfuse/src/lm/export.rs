//! Writing a llama-family GGUF as a Hugging Face Llama directory (config.json,
//! model.safetensors in f32, tokenizer.json), loadable by `transformers.LlamaForCausalLM` and
//! by [`super::llama::Llama::from_hf_dir`].
//!
//! llama.cpp's converter permutes the rows of Q and K so that RoPE rotates adjacent pairs;
//! Hugging Face checkpoints rotate halves. Export undoes that permutation.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::{Error, IoContext, Result};
use crate::gguf::GgufFile;
use crate::text::Tokenizer;

/// Inverse of llama.cpp's `permute`: rows `(head, pair, 2)` back to `(head, 2, pair)`.
fn unpermute(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / n_head;
    Ok(w.reshape((n_head, hd / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

pub fn export_hf_llama(gguf: &Path, out_dir: &Path) -> Result<()> {
    let mut f = GgufFile::open(gguf)?;
    if f.architecture()? != "llama" {
        return Err(Error::UnsupportedArch {
            path: gguf.to_path_buf(),
            arch: f.architecture()?,
            supported: "llama (export)",
        });
    }
    let tok = Tokenizer::from_gguf(&f)?;
    let n_head = f.u32("llama.attention.head_count")? as usize;
    let n_kv = f
        .u32("llama.attention.head_count_kv")
        .unwrap_or(n_head as u32) as usize;
    let n_layers = f.u32("llama.block_count")? as usize;
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
    for i in 0..n_layers {
        let (g, h) = (format!("blk.{i}"), format!("model.layers.{i}"));
        let names = [
            ("attn_norm", "input_layernorm"),
            ("ffn_norm", "post_attention_layernorm"),
            ("attn_v", "self_attn.v_proj"),
            ("attn_output", "self_attn.o_proj"),
            ("ffn_gate", "mlp.gate_proj"),
            ("ffn_up", "mlp.up_proj"),
            ("ffn_down", "mlp.down_proj"),
        ];
        for (a, b) in names {
            t.insert(format!("{h}.{b}.weight"), get(&format!("{g}.{a}.weight"))?);
        }
        t.insert(
            format!("{h}.self_attn.q_proj.weight"),
            unpermute(&get(&format!("{g}.attn_q.weight"))?, n_head)?,
        );
        t.insert(
            format!("{h}.self_attn.k_proj.weight"),
            unpermute(&get(&format!("{g}.attn_k.weight"))?, n_kv)?,
        );
    }
    let vocab = t["model.embed_tokens.weight"].dim(0)?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": f.u32("llama.feed_forward_length")?,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": hidden / n_head,
        "vocab_size": vocab,
        "rms_norm_eps": f.f32("llama.attention.layer_norm_rms_epsilon")?,
        "rope_theta": f.f32("llama.rope.freq_base").unwrap_or(10_000.0),
        "max_position_embeddings": f.u32("llama.context_length")?,
        "tie_word_embeddings": tied,
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": tok.bos,
        "eos_token_id": tok.eos,
        "torch_dtype": "float32",
    });
    std::fs::create_dir_all(out_dir).ctx(|| format!("creating {}", out_dir.display()))?;
    let write = |name: &str, text: String| -> Result<()> {
        let p = out_dir.join(name);
        std::fs::write(&p, text).ctx(|| format!("writing {}", p.display()))
    };
    write("config.json", serde_json::to_string_pretty(&config)?)?;
    write("tokenizer.json", tok.to_tokenizer_json()?)?;
    let st = out_dir.join("model.safetensors");
    candle_core::safetensors::save(&t, &st)?;
    Ok(())
}
