//! The files of a model or calibration directory, each from arbitrary bytes: a Hugging Face
//! `tokenizer.json`; `config.json` + `model.safetensors` of a Llama directory (the whole
//! load); a fusion map (A and the LayerNorm affine, safetensors); an alignment (safetensors
//! plus its JSON manifest). Input: a mode byte, a little-endian u16 length of the first file,
//! the first file, the second file.
#![no_main]

#[path = "common.rs"]
mod common;

use detoxfuse::align::{Alignment, ModelId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [mode, a, b, rest @ ..] = data else {
        return;
    };
    let cut = usize::from(u16::from_le_bytes([*a, *b])).min(rest.len());
    let (first, second) = rest.split_at(cut);
    match mode % 4 {
        0 => {
            let p = common::file("tokenizer.json", rest);
            if let Ok(t) = detoxfuse::text::Tokenizer::from_tokenizer_json(&p) {
                let ids = t.encode("Hello, world! <|im_start|>", true).unwrap_or_default();
                let _ = t.decode(&ids, true);
            }
        }
        1 => {
            let dir = common::scratch().join("hf");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("config.json"), first).unwrap();
            std::fs::write(dir.join("model.safetensors"), second).unwrap();
            let _ = detoxfuse::lm::load(&dir);
        }
        2 => {
            let p = common::file("map.safetensors", rest);
            let _ = detoxfuse::fuse::FusionMap::load(&p);
        }
        _ => {
            let p = common::file("align.safetensors", first);
            common::file("align.json", second);
            let id = |w| ModelId {
                path: "m".into(),
                sha256: "0".repeat(64),
                width: w,
            };
            let _ = Alignment::load(&p, &id(576), &id(640));
        }
    }
});
