//! Arbitrary bytes as a GGUF file: open (header, metadata, tensor table, bounds), then what
//! loading a model reads from it (tokenizer, tensors, the model itself). Anything may fail
//! with an error; nothing may panic, abort or allocate beyond the file's size.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = common::file("input.gguf", data);
    let Ok(mut f) = detoxfuse::gguf::GgufFile::open(&path) else {
        return;
    };
    let _ = f.architecture();
    let _ = detoxfuse::text::Tokenizer::from_gguf(&f);
    let names: Vec<String> = f.content.tensor_infos.keys().take(8).cloned().collect();
    for n in names {
        let _ = f.tensor(&n);
    }
    let _ = detoxfuse::lm::load(&path);
});
