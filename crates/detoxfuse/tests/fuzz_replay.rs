//! Replays every committed fuzz input through the fuzz targets' own bodies, on stable:
//! `tests/fixtures/fuzz/<target>/` holds each target's minimized corpus (`cargo fuzz cmin`)
//! and every input that once crashed it (named `crash-*`), so a fixed bug stays fixed and
//! the parsers keep handling what the fuzzer explored. Needs the real SmolLM2 and Gemma-3
//! (fetched on first use) for the tokenizer and request targets. See docs/RELIABILITY.md.

#[path = "../../../fuzz/fuzz_targets/bodies.rs"]
mod bodies;

use std::path::Path;

fn replay(target: &str, body: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/fuzz")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no inputs in {}", dir.display());
    for f in &files {
        let data = std::fs::read(f).unwrap();
        // a panic names the input that caused it
        let r = std::panic::catch_unwind(|| body(&data));
        assert!(r.is_ok(), "{target}: {} fails", f.display());
    }
}

#[test]
fn gguf() {
    replay("gguf", bodies::gguf)
}

#[test]
fn gguf_structured() {
    replay("gguf_structured", bodies::gguf_structured)
}

#[test]
fn tokenizers() {
    replay("tokenizers", bodies::tokenizers)
}

#[test]
fn cross_text() {
    replay("cross_text", bodies::cross_text)
}

#[test]
fn model_dir() {
    replay("model_dir", bodies::model_dir)
}

#[test]
fn jsonl_line() {
    replay("jsonl_line", bodies::jsonl_line)
}

#[test]
fn openai_request() {
    replay("openai_request", bodies::openai_request)
}

/// What the `tokenizers` target found: SmolLM2's byte-level vocabulary has no token for some
/// bytes, which encoding therefore drops (Hugging Face `tokenizers` does the same with this
/// vocabulary). Gemma-3's SentencePiece has a byte token for every byte.
#[test]
fn smollm2_has_no_token_for_these_bytes() {
    let [smollm2, gemma3] = bodies::real_tokenizers();
    let missing = bodies::missing_bytes(smollm2);
    eprintln!(
        "SmolLM2 lacks {} byte tokens: {missing:02x?}",
        missing.len()
    );
    assert_eq!(&missing[..6], [0x04, 0x06, 0x13, 0x14, 0x16, 0x1d]);
    for &b in &missing {
        let mut ids = Vec::new();
        if let Ok(s) = std::str::from_utf8(&[b]) {
            smollm2.encode_into(s, false, &mut ids).unwrap();
            assert!(ids.is_empty(), "byte {b:02x} encodes to {ids:?}");
        }
    }
    assert!(bodies::unrepresentable_ascii(1).is_empty());
    let mut ids = Vec::new();
    gemma3.encode_into("a\u{4}b", false, &mut ids).unwrap();
    assert_eq!(gemma3.decode(&ids, false), "a\u{4}b");
}
