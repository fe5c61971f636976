//! Both real tokenizers (SmolLM2's byte-level BPE, Gemma-3's SentencePiece) on arbitrary
//! text, with and without special-token parsing, and arbitrary ids to decode.
//! Properties: no panic; `decode(encode(s)) == s` (both tokenizers are lossless on valid
//! UTF-8, except that SentencePiece writes a space as U+2581, so a literal U+2581 comes back
//! as a space).
#![no_main]

#[path = "bodies.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::tokenizers(data));
