//! An HTTP request body through the server's parse-and-validate path: the OpenAI wire
//! format ([`detoxfuse::openai::parse_request`]) and the engine's checks
//! ([`detoxfuse::serving::Engine::prepare`]) over the real SmolLM2 (tokenizer, chat
//! template, context length). Every refusal must be a 4xx error; nothing may panic.
#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::OnceLock;
use std::time::Duration;

use detoxfuse::openai::{parse_request, ApiError, Endpoint};
use detoxfuse::serving::{Engine, Limits};
use libfuzzer_sys::fuzz_target;

fn engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        let path = common::model_path("smollm2");
        let model = detoxfuse::lm::load(&path).expect("model");
        let tok = detoxfuse::text::Tokenizer::for_model(&path).expect("tokenizer");
        let limits = Limits {
            queue: 1,
            timeout: Duration::from_secs(1),
            default_alpha: 0.0,
            ..Limits::default()
        };
        let (engine, worker) = Engine::start(model, tok, None, limits).expect("engine");
        std::mem::forget(worker);
        engine
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let e = engine();
    let endpoint = if mode & 1 == 0 {
        Endpoint::Completion
    } else {
        Endpoint::Chat
    };
    let checked = parse_request(endpoint, body, "smollm2", e.tokenizer()).and_then(|r| {
        e.prepare(&r.common.params(), &r.text, endpoint == Endpoint::Chat)
            .map_err(ApiError::from)
    });
    match checked {
        Ok(p) => assert!(p.ids.len() + p.cfg.max_tokens <= 8192 && p.cfg.n >= 1),
        Err(err) => assert!((400..500).contains(&err.status), "{err:?}"),
    }
});
