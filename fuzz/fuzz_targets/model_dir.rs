//! The files of a model or calibration directory, each from arbitrary bytes: a Hugging Face
//! `tokenizer.json`; `config.json` + `model.safetensors` of a Llama directory (the whole
//! load); a fusion map (A and the LayerNorm affine, safetensors); an alignment (safetensors
//! plus its JSON manifest). Input: a mode byte, a little-endian u16 length of the first file,
//! the first file, the second file.
#![no_main]

#[path = "bodies.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::model_dir(data));
