//! Hugging Face directories (config.json + safetensors + tokenizer.json): SmolLM2 exported
//! from its GGUF must load and compute the same logits and ids as the GGUF itself.

mod common;

use common::{fixture, ids, last_logits, model};
use detoxfuse::lm::{self, export::export_hf_llama, LoadOptions};
use detoxfuse::text::Tokenizer;

#[test]
fn exported_hf_llama_matches_the_gguf() {
    let gguf = model("smollm2");
    let dir = tempfile::tempdir().unwrap();
    export_hf_llama(&gguf, dir.path()).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(dir.path().join(f).exists(), "{f} not written");
    }

    // same weights in f32 on both sides: only RoPE layout (interleaved vs halves, undone by
    // the export's unpermute) differs, so logits agree to float rounding
    let a = lm::load_with(&gguf, LoadOptions { dequantize: true }).unwrap();
    let b = lm::load_with(dir.path(), LoadOptions { dequantize: true }).unwrap();
    assert_eq!(a.info().hidden_size, b.info().hidden_size);
    let prompt = vec![504, 3575, 282, 4649, 314, 7042, 30];
    let la = last_logits(a.as_ref(), &prompt);
    let lb = last_logits(b.as_ref(), &prompt);
    let worst = la
        .iter()
        .zip(&lb)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    eprintln!("gguf vs exported HF dir: max |logit diff| = {worst:e}");
    assert!(worst < 1e-3, "{worst}");

    // tokenizer.json reproduces the GGUF tokenizer on the whole reference fixture
    let tok = Tokenizer::for_model(dir.path()).unwrap();
    for c in fixture("tokenizer_smollm2.json")["cases"]
        .as_array()
        .unwrap()
    {
        assert_eq!(
            tok.encode(c["text"].as_str().unwrap(), true).unwrap(),
            ids(&c["ids"]),
            "{:?}",
            c["text"]
        );
    }
    assert_eq!(
        tok.decode(&tok.encode("héllo wörld 🔥", false).unwrap(), false),
        "héllo wörld 🔥"
    );
}

#[test]
fn hf_dir_without_weights_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let err = lm::load(dir.path()).err().unwrap().to_string();
    assert!(err.contains("config.json lacks"), "{err}");
    std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
    let err = lm::load(dir.path()).err().unwrap().to_string();
    assert!(err.contains("not valid JSON"), "{err}");
}
