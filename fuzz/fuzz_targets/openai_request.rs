//! An HTTP request body through the server's parse-and-validate path: the OpenAI wire
//! format ([`detoxfuse::openai::parse_request`]) and the engine's checks
//! ([`detoxfuse::serving::Engine::prepare`]) over the real SmolLM2 (tokenizer, chat
//! template, context length). Every refusal must be a 4xx error; nothing may panic.
#![no_main]

#[path = "bodies.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::openai_request(data));
