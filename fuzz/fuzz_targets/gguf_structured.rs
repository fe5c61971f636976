//! Structure-aware GGUF: a valid small llama GGUF (architecture, alignment, dimensions, a
//! vocabulary, two tensors) whose header is patched at fuzzer-chosen places with
//! fuzzer-chosen 1-, 2-, 4- or 8-byte values, so that counts, string and array lengths,
//! value types, dimensions, tensor types and offsets take every value while the rest stays
//! well-formed. Then the same path as the `gguf` target.
#![no_main]

#[path = "bodies.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::gguf_structured(data));
