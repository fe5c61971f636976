//! The fuzz targets' bodies, one function each, shared by the libFuzzer binaries in this
//! folder and by the stable replay test (`crates/detoxfuse/tests/fuzz_replay.rs`), which runs
//! every committed input under `tests/fixtures/fuzz/<target>/` through the same code.
//! The real tokenizers and SmolLM2 come from the project's cache (fetched on first use).
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use detoxfuse::align::{Alignment, ModelId};
use detoxfuse::fuse::CrossText;
use detoxfuse::openai::{parse_request, ApiError, Endpoint};
use detoxfuse::serving::{Engine, Limits};
use detoxfuse::text::Tokenizer;

/// A scratch directory per thread (inputs that the library reads from files go here).
pub fn scratch() -> PathBuf {
    thread_local! {
        static DIR: tempfile::TempDir = tempfile::tempdir().expect("a scratch directory");
    }
    DIR.with(|d| d.path().to_path_buf())
}

/// Writes `bytes` to `name` in the scratch directory.
pub fn file(name: &str, bytes: &[u8]) -> PathBuf {
    let p = scratch().join(name);
    std::fs::write(&p, bytes).expect("writing a scratch file");
    p
}

/// A fetched model's file (`smollm2` or `gemma3`), from `$DETOXFUSE_CACHE` or the default
/// cache.
pub fn model_path(name: &str) -> PathBuf {
    let cache = std::env::var_os("DETOXFUSE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(detoxfuse::fetch::default_cache_dir);
    detoxfuse::hub::Hub::new(&cache)
        .model(name, &mut detoxfuse::fetch::Silent)
        .unwrap_or_else(|e| panic!("{name}: {e}; run `detoxfuse fetch` first"))
}

/// SmolLM2's byte-level BPE and Gemma-3's SentencePiece tokenizer, read once.
pub fn real_tokenizers() -> &'static [Tokenizer; 2] {
    static T: OnceLock<[Tokenizer; 2]> = OnceLock::new();
    T.get_or_init(|| {
        ["smollm2", "gemma3"].map(|m| Tokenizer::for_model(&model_path(m)).expect("tokenizer"))
    })
}

// ---- gguf ----

/// Arbitrary bytes as a GGUF file: open (header, metadata, tensor table, bounds), then what
/// loading a model reads from it (tokenizer, tensors, the model itself). Anything may fail
/// with an error; nothing may panic, abort or allocate beyond the file's size.
pub fn gguf(data: &[u8]) {
    let path = file("input.gguf", data);
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
}

// ---- gguf_structured ----

/// The template's bytes and the length of its header (where patches land).
fn template() -> &'static (Vec<u8>, usize) {
    static T: OnceLock<(Vec<u8>, usize)> = OnceLock::new();
    T.get_or_init(|| {
        let s = |x: &str| Value::String(x.into());
        let tokens = Value::Array(["<s>", "</s>", "a", "b", "ab"].map(s).to_vec());
        let meta = [
            ("general.architecture", s("llama")),
            ("general.alignment", Value::U32(32)),
            ("llama.context_length", Value::U32(16)),
            ("llama.embedding_length", Value::U32(4)),
            ("llama.block_count", Value::U32(1)),
            ("llama.attention.head_count", Value::U32(2)),
            ("tokenizer.ggml.model", s("gpt2")),
            ("tokenizer.ggml.tokens", tokens),
            ("tokenizer.ggml.merges", Value::Array(vec![s("a b")])),
        ];
        let t = |r, c| {
            let x = Tensor::zeros((r, c), candle_core::DType::F32, &Device::Cpu).unwrap();
            QTensor::quantize(&x, candle_core::quantized::GgmlDType::F32).unwrap()
        };
        let (emb, norm) = (t(5, 4), t(1, 4));
        let metadata: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        let mut out = std::io::Cursor::new(Vec::new());
        gguf_file::write(
            &mut out,
            &metadata,
            &[("token_embd.weight", &emb), ("output_norm.weight", &norm)],
        )
        .unwrap();
        let bytes = out.into_inner();
        let header = {
            let mut c = std::io::Cursor::new(&bytes);
            gguf_file::Content::read(&mut c).unwrap();
            c.position() as usize
        };
        (bytes, header)
    })
}

/// Structure-aware GGUF: a valid small llama GGUF (architecture, alignment, dimensions, a
/// vocabulary, two tensors) whose header is patched at fuzzer-chosen places with
/// fuzzer-chosen 1-, 2-, 4- or 8-byte values, so that counts, string and array lengths,
/// value types, dimensions, tensor types and offsets take every value while the rest stays
/// well-formed. Then the same path as the `gguf` target.
pub fn gguf_structured(data: &[u8]) {
    let (template, header) = template();
    let mut bytes = template.clone();
    // patches of 4 bytes each: position (2 bytes), width selector, value byte; the value is
    // the byte repeated or one of a few boundary values
    for p in data.chunks_exact(4) {
        let pos = usize::from(u16::from_le_bytes([p[0], p[1]])) % header;
        let width = [1, 2, 4, 8][usize::from(p[2] & 3)];
        let value: u64 = match p[2] >> 2 {
            0 => u64::from(p[3]),
            1 => u64::MAX - u64::from(p[3]),
            2 => 1 << (p[3] % 64),
            3 => (1 << (p[3] % 64)) - 1,
            _ => u64::from_le_bytes([p[3]; 8]),
        };
        let end = (pos + width).min(bytes.len());
        bytes[pos..end].copy_from_slice(&value.to_le_bytes()[..end - pos]);
    }
    let path = file("structured.gguf", &bytes);
    let Ok(mut f) = detoxfuse::gguf::GgufFile::open(&path) else {
        return;
    };
    let _ = f.architecture();
    let _ = detoxfuse::text::Tokenizer::from_gguf(&f);
    let names: Vec<String> = f.content.tensor_infos.keys().cloned().collect();
    for n in names {
        let _ = f.tensor(&n);
    }
    let _ = detoxfuse::lm::load(&path);
}

// ---- tokenizers ----

/// Both real tokenizers (SmolLM2's byte-level BPE, Gemma-3's SentencePiece) on arbitrary
/// text, with and without special-token parsing, and arbitrary ids to decode.
/// Properties: no panic; `decode(encode(s)) == s` (both tokenizers are lossless on valid
/// UTF-8, except that SentencePiece writes a space as U+2581, so a literal U+2581 comes back
/// as a space).
pub fn tokenizers(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let tok = &real_tokenizers()[usize::from(mode & 1)];
    let specials = mode & 2 != 0;
    if mode & 4 != 0 {
        // arbitrary ids, some beyond the vocabulary
        let ids: Vec<u32> = rest
            .chunks(3)
            .map(|c| c.iter().fold(0u32, |a, &b| a << 8 | u32::from(b)))
            .collect();
        let _ = tok.decode(&ids, specials);
        for &i in &ids {
            let _ = (
                tok.piece(i),
                tok.token_bytes(i, specials),
                tok.is_control(i),
            );
        }
        return;
    }
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    // without the BOS that `encode` adds for Gemma (decode would render it with specials)
    let mut ids = Vec::new();
    tok.encode_into(text, specials, &mut ids)
        .expect("encoding valid UTF-8 never fails");
    assert!(ids.iter().all(|&i| (i as usize) < tok.vocab_size()));
    let back = tok.decode(&ids, specials);
    let want = if mode & 1 == 1 {
        // SentencePiece with byte fallback: every byte has a token; a space is U+2581
        let lost = unrepresentable_ascii(1);
        let kept: String = text.chars().filter(|c| !lost.contains(c)).collect();
        kept.replace('\u{2581}', " ")
    } else {
        // byte-level BPE: bytes without a token of their own are dropped (so a character
        // holding one comes back broken)
        static LOST: OnceLock<Vec<u8>> = OnceLock::new();
        let lost = LOST.get_or_init(|| missing_bytes(&real_tokenizers()[0]));
        let kept: Vec<u8> = text.bytes().filter(|b| !lost.contains(b)).collect();
        String::from_utf8_lossy(&kept).into_owned()
    };
    assert_eq!(back, want, "decode(encode(s)) != s");
}

/// The bytes a byte-level BPE vocabulary has no single-byte token for. Hugging Face
/// `tokenizers` (which encodes here) drops them silently: SmolLM2's vocabulary lacks 0x04,
/// 0x06, 0x13, 0x14, 0x16, 0x1D and some bytes at or above 0x80 (`fuzz_replay` lists them).
pub fn missing_bytes(tok: &Tokenizer) -> Vec<u8> {
    let mut have = [false; 256];
    for id in 0..tok.vocab_size() as u32 {
        if let [b] = tok.token_bytes(id, false)[..] {
            have[usize::from(b)] = true;
        }
    }
    (0..=255u8).filter(|&b| !have[usize::from(b)]).collect()
}

/// The ASCII characters that encode to nothing (none for Gemma-3's SentencePiece, which
/// falls back to byte tokens).
pub fn unrepresentable_ascii(which: usize) -> &'static [char] {
    static L: OnceLock<[Vec<char>; 2]> = OnceLock::new();
    &L.get_or_init(|| {
        [0, 1].map(|i| {
            let tok = &real_tokenizers()[i];
            (1u8..128)
                .map(char::from)
                .filter(|c| {
                    let mut ids = Vec::new();
                    tok.encode_into(&c.to_string(), false, &mut ids).unwrap();
                    ids.is_empty()
                })
                .collect()
        })
    })[which]
}

// ---- cross_text ----

/// The cross-tokenizer step of the fused decoder: the calibration tokenizer re-reads a byte
/// stream that grows by arbitrary chunks (UTF-8 characters split anywhere) and says how many
/// of its previous ids still stand. Properties: no panic; the kept ids are a prefix of both
/// readings; something new follows them; and after the last chunk the ids equal a one-shot
/// encoding of the stream's complete-UTF-8 prefix (the KV cache rollback is exact).
pub fn cross_text(data: &[u8]) {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let tok = &real_tokenizers()[usize::from(mode & 1)];
    let mut x = CrossText::default();
    let mut pushed = false;
    // chunks: a length byte (0..=15), then that many bytes
    while let Some((&n, tail)) = rest.split_first() {
        let n = usize::from(n & 15).min(tail.len());
        let (chunk, tail) = tail.split_at(n);
        rest = tail;
        let before = x.ids().to_vec();
        pushed = true;
        if let Some(keep) = x
            .push(tok, chunk)
            .expect("encoding valid UTF-8 never fails")
        {
            assert!(keep <= before.len() && keep < x.ids().len());
            assert_eq!(before[..keep], x.ids()[..keep]);
        } else {
            assert_eq!(before, x.ids());
        }
    }
    if !pushed {
        return;
    }
    let valid = match std::str::from_utf8(x.bytes()) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&x.bytes()[..e.valid_up_to()]).unwrap(),
    };
    assert_eq!(x.ids(), tok.encode(valid, false).unwrap());
}

// ---- model_dir ----

/// The files of a model or calibration directory, each from arbitrary bytes: a Hugging Face
/// `tokenizer.json`; `config.json` + `model.safetensors` of a Llama directory (the whole
/// load); a fusion map (A and the LayerNorm affine, safetensors); an alignment (safetensors
/// plus its JSON manifest). Input: a mode byte, a little-endian u16 length of the first file,
/// the first file, the second file.
pub fn model_dir(data: &[u8]) {
    let [mode, a, b, rest @ ..] = data else {
        return;
    };
    let cut = usize::from(u16::from_le_bytes([*a, *b])).min(rest.len());
    let (first, second) = rest.split_at(cut);
    match mode % 4 {
        0 => {
            let p = file("tokenizer.json", rest);
            if let Ok(t) = detoxfuse::text::Tokenizer::from_tokenizer_json(&p) {
                let ids = t
                    .encode("Hello, world! <|im_start|>", true)
                    .unwrap_or_default();
                let _ = t.decode(&ids, true);
            }
        }
        1 => {
            let dir = scratch().join("hf");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("config.json"), first).unwrap();
            std::fs::write(dir.join("model.safetensors"), second).unwrap();
            let _ = detoxfuse::lm::load(&dir);
        }
        2 => {
            let p = file("map.safetensors", rest);
            let _ = detoxfuse::fuse::FusionMap::load(&p);
        }
        _ => {
            let p = file("align.safetensors", first);
            file("align.json", second);
            let id = |w| ModelId {
                path: "m".into(),
                sha256: "0".repeat(64),
                width: w,
            };
            let _ = Alignment::load(&p, &id(576), &id(640));
        }
    }
}

// ---- jsonl_line ----

/// One line of a JSONL input file, as generate/eval read a prompt and score reads texts.
pub fn jsonl_line(data: &[u8]) {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok((_, prompt)) = detoxfuse::eval::harness::parse_prompt_line(line) {
        // the prompt is a string that was in the line (escapes decoded)
        assert!(prompt.len() <= line.len());
    }
    let _ = detoxfuse::score::line_texts(line, "text");
}

// ---- openai_request ----

fn engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        let path = model_path("smollm2");
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

/// An HTTP request body through the server's parse-and-validate path: the OpenAI wire
/// format ([`detoxfuse::openai::parse_request`]) and the engine's checks
/// ([`detoxfuse::serving::Engine::prepare`]) over the real SmolLM2 (tokenizer, chat
/// template, context length). Every refusal must be a 4xx error; nothing may panic.
pub fn openai_request(data: &[u8]) {
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
}
