//! One line of a JSONL input file, as generate/eval read a prompt and score reads texts.
#![no_main]

#[path = "bodies.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::jsonl_line(data));
