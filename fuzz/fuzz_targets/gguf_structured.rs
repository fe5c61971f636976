//! Structure-aware GGUF: a valid small llama GGUF (architecture, alignment, dimensions, a
//! vocabulary, two tensors) whose header is patched at fuzzer-chosen places with
//! fuzzer-chosen 1-, 2-, 4- or 8-byte values, so that counts, string and array lengths,
//! value types, dimensions, tensor types and offsets take every value while the rest stays
//! well-formed. Then the same path as the `gguf` target.
#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use libfuzzer_sys::fuzz_target;

/// The template's bytes and the length of its header (where patches land).
fn template() -> &'static (Vec<u8>, usize) {
    static T: OnceLock<(Vec<u8>, usize)> = OnceLock::new();
    T.get_or_init(|| {
        let s = |x: &str| Value::String(x.into());
        let tokens = Value::Array(["<s>", "</s>", "a", "b", "ab"].map(s).to_vec());
        let meta = [
            ("general.architecture", s("llama")),
            ("general.alignment", Value::U32(32)),
            ("llama.context_length", Value::U32(16)),
            ("llama.embedding_length", Value::U32(4)),
            ("llama.block_count", Value::U32(1)),
            ("llama.attention.head_count", Value::U32(2)),
            ("tokenizer.ggml.model", s("gpt2")),
            ("tokenizer.ggml.tokens", tokens),
            ("tokenizer.ggml.merges", Value::Array(vec![s("a b")])),
        ];
        let t = |r, c| {
            let x = Tensor::zeros((r, c), candle_core::DType::F32, &Device::Cpu).unwrap();
            QTensor::quantize(&x, candle_core::quantized::GgmlDType::F32).unwrap()
        };
        let (emb, norm) = (t(5, 4), t(1, 4));
        let metadata: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        let mut out = std::io::Cursor::new(Vec::new());
        gguf_file::write(
            &mut out,
            &metadata,
            &[("token_embd.weight", &emb), ("output_norm.weight", &norm)],
        )
        .unwrap();
        let bytes = out.into_inner();
        let header = {
            let mut c = std::io::Cursor::new(&bytes);
            gguf_file::Content::read(&mut c).unwrap();
            c.position() as usize
        };
        (bytes, header)
    })
}

fuzz_target!(|data: &[u8]| {
    let (template, header) = template();
    let mut bytes = template.clone();
    // patches of 4 bytes each: position (2 bytes), width selector, value byte; the value is
    // the byte repeated or one of a few boundary values
    for p in data.chunks_exact(4) {
        let pos = usize::from(u16::from_le_bytes([p[0], p[1]])) % header;
        let width = [1, 2, 4, 8][usize::from(p[2] & 3)];
        let value: u64 = match p[2] >> 2 {
            0 => u64::from(p[3]),
            1 => u64::MAX - u64::from(p[3]),
            2 => 1 << (p[3] % 64),
            3 => (1 << (p[3] % 64)) - 1,
            _ => u64::from_le_bytes([p[3]; 8]),
        };
        let end = (pos + width).min(bytes.len());
        bytes[pos..end].copy_from_slice(&value.to_le_bytes()[..end - pos]);
    }
    let path = common::file("structured.gguf", &bytes);
    let Ok(mut f) = detoxfuse::gguf::GgufFile::open(&path) else {
        return;
    };
    let _ = f.architecture();
    let _ = detoxfuse::text::Tokenizer::from_gguf(&f);
    let names: Vec<String> = f.content.tensor_infos.keys().cloned().collect();
    for n in names {
        let _ = f.tensor(&n);
    }
    let _ = detoxfuse::lm::load(&path);
});
