//! Arbitrary bytes as a GGUF file: open (header, metadata, tensor table, bounds), then what
//! loading a model reads from it (tokenizer, tensors, the model itself). Anything may fail
//! with an error; nothing may panic, abort or allocate beyond the file's size.
#![no_main]

#[path = "bodies.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::gguf(data));
