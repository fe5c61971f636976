//! The cross-tokenizer step of the fused decoder: the calibration tokenizer re-reads a byte
//! stream that grows by arbitrary chunks (UTF-8 characters split anywhere) and says how many
//! of its previous ids still stand. Properties: no panic; the kept ids are a prefix of both
//! readings; something new follows them; and after the last chunk the ids equal a one-shot
//! encoding of the stream's complete-UTF-8 prefix (the KV cache rollback is exact).
#![no_main]

#[path = "bodies.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::cross_text(data));
