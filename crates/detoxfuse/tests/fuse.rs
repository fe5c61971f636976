//! The fused decoder: cached fused logits equal a full recompute of both models, the
//! cross-tokenizer path feeds the calibration model exactly its own tokenization of the text
//! so far, alpha 0 is the plain target, and mismatches are clear errors.
//!
//! The calibration model here is SmolLM2's first 3 layers at initialisation (the real
//! architecture, untrained: these tests are about the decoding machinery, not detoxification)
//! and A is a seeded random matrix.

mod common;

use std::path::Path;

use candle_core::{Device, Tensor};
use detoxfuse::align::{Alignment, ModelId};
use detoxfuse::fuse::{fuse, load_with_target_vocab, same_tokenizer, FusedDecoder};
use detoxfuse::generate::{generate, Decoder, GenerationConfig, PlainDecoder};
use detoxfuse::lm::export::{hf_llama_from_gguf, write_hf_dir};
use detoxfuse::lm::{self, ids_tensor, CausalLm, LoadOptions};
use detoxfuse::sample::SamplingParams;
use detoxfuse::text::Tokenizer;
use rand::{Rng, SeedableRng};

fn calibration_dir(dir: &Path) -> std::path::PathBuf {
    let out = dir.join("cal");
    let base = hf_llama_from_gguf(&common::model("smollm2"), Some(3)).unwrap();
    write_hf_dir(&base, &out, &[]).unwrap();
    out
}

fn random_a(dc: usize, dt: usize) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let v: Vec<f32> = (0..dc * dt).map(|_| rng.random_range(-0.1..0.1)).collect();
    Tensor::from_vec(v, (dc, dt), &Device::Cpu).unwrap()
}

fn last_hidden(m: &dyn CausalLm, ids: &[u32]) -> Tensor {
    let h = m
        .forward_hidden(&ids_tensor(&[ids.to_vec()]).unwrap(), &mut m.new_cache())
        .unwrap();
    let t = h.dim(1).unwrap();
    h.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap()
}

fn valid_prefix(bytes: &[u8]) -> &str {
    match std::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap(),
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A target (f32 weights), the 3-layer calibration model (f32) and their tokenizers.
struct F32Pair {
    _dir: tempfile::TempDir,
    target: Box<dyn CausalLm>,
    cal: Box<dyn CausalLm>,
    ttok: Tokenizer,
    ctok: Tokenizer,
}

fn f32_pair(target_name: &str) -> F32Pair {
    let dir = tempfile::tempdir().unwrap();
    let cal_dir = calibration_dir(dir.path());
    let tpath = common::model(target_name);
    F32Pair {
        target: lm::load_with(&tpath, LoadOptions { dequantize: true }).unwrap(),
        cal: lm::load_with(&cal_dir, LoadOptions { dequantize: true }).unwrap(),
        ttok: Tokenizer::for_model(&tpath).unwrap(),
        ctok: Tokenizer::for_model(&cal_dir).unwrap(),
        _dir: dir,
    }
}

/// Greedy fused decoding for 10 steps; at every step the decoder's logits must equal
/// recomputing both models from scratch on the full text.
fn cached_equals_recompute(target_name: &str) {
    let pair = f32_pair(target_name);
    let (target, cal, ttok, ctok) = (&pair.target, &pair.cal, &pair.ttok, &pair.ctok);
    let shared = same_tokenizer(ttok, ctok);
    assert_eq!(shared, target_name == "smollm2");
    let a = random_a(cal.info().hidden_size, target.info().hidden_size);
    let alpha = 0.4;
    let cross = (!shared).then_some((ttok, ctok));
    let mut dec = FusedDecoder::new(target.as_ref(), cal.as_ref(), &a, alpha, cross).unwrap();
    let mut ids = ttok
        .encode("Our village café opened in 1987 —  and", false)
        .unwrap();
    let mut logits = dec.prefill(&ids).unwrap();
    let mut worst = 0.0f32;
    for step in 0..10 {
        let ht = last_hidden(target.as_ref(), &ids);
        let cal_ids = if shared {
            ids.clone()
        } else {
            let bytes: Vec<u8> = ids
                .iter()
                .flat_map(|&t| ttok.token_bytes(t, false))
                .collect();
            ctok.encode(valid_prefix(&bytes), false).unwrap()
        };
        let hc = last_hidden(cal.as_ref(), &cal_ids);
        let full: Vec<f32> = target
            .lm_head(&fuse(&ht, &hc, &a, alpha).unwrap())
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let d = max_diff(&logits, &full);
        assert!(
            d <= 1e-4,
            "{target_name} step {step}: cached vs recomputed differ by {d}"
        );
        worst = worst.max(d);
        let next = detoxfuse::sample::argmax(&logits) as u32;
        ids.push(next);
        logits = dec.step(&[next]).unwrap().remove(0);
    }
    eprintln!("{target_name}: largest difference {worst:e}");
}

#[test]
fn cached_fused_logits_equal_full_recompute_same_tokenizer() {
    cached_equals_recompute("smollm2");
}

#[test]
fn cached_fused_logits_equal_full_recompute_smollm2_calibration_gemma3_target() {
    cached_equals_recompute("gemma3");
}

/// Feeds Gemma-3's tokens of a hard text one at a time; after each, the calibration model
/// must hold exactly SmolLM2's tokenization of the (complete-UTF-8) text so far.
#[test]
fn cross_tokenizer_path_feeds_the_calibration_tokenization_of_the_text_so_far() {
    let dir = tempfile::tempdir().unwrap();
    let cal_dir = calibration_dir(dir.path());
    let tpath = common::model("gemma3");
    let target = lm::load(&tpath).unwrap();
    let cal = lm::load(&cal_dir).unwrap();
    let ttok = Tokenizer::for_model(&tpath).unwrap();
    let ctok = Tokenizer::for_model(&cal_dir).unwrap();
    let a = random_a(576, 640);
    let text = "Prices rose 12345 %   in 2024!\n\n\tTabs,  spaces 🙂👩‍👩‍👧 and 東京の天気は晴れ。 Ünïcödé done 42.";
    let ids = ttok.encode(text, false).unwrap();
    let mut dec =
        FusedDecoder::new(target.as_ref(), cal.as_ref(), &a, 0.5, Some((&ttok, &ctok))).unwrap();
    dec.prefill(&ids[..2]).unwrap();
    let mut checked_partial = false;
    for k in 2..=ids.len() {
        if k > 2 {
            dec.step(&[ids[k - 1]]).unwrap();
        }
        let bytes: Vec<u8> = ids[..k]
            .iter()
            .flat_map(|&t| ttok.token_bytes(t, false))
            .collect();
        checked_partial |= std::str::from_utf8(&bytes).is_err();
        let want = ctok.encode(valid_prefix(&bytes), false).unwrap();
        assert_eq!(dec.calibration_ids()[0], want, "after {k} target tokens");
    }
    let all: Vec<u8> = ids
        .iter()
        .flat_map(|&t| ttok.token_bytes(t, false))
        .collect();
    assert_eq!(String::from_utf8(all).unwrap(), text);
    assert!(ids.len() > 30);
    let _ = checked_partial; // Gemma has whole-character pieces for most of this text
}

/// alpha = 0 gives bit-identical tokens to plain generation (sampled, 3 samples, same seed).
#[test]
fn alpha_zero_is_exactly_the_plain_target() {
    let dir = tempfile::tempdir().unwrap();
    let cal_dir = calibration_dir(dir.path());
    let cal = lm::load(&cal_dir).unwrap();
    for name in ["smollm2", "gemma3"] {
        let tpath = common::model(name);
        let target = lm::load(&tpath).unwrap();
        let ttok = Tokenizer::for_model(&tpath).unwrap();
        let ctok = Tokenizer::for_model(&cal_dir).unwrap();
        let cross = (!same_tokenizer(&ttok, &ctok)).then_some((&ttok, &ctok));
        let a = random_a(576, target.info().hidden_size);
        let cfg = GenerationConfig {
            max_tokens: 24,
            n: 3,
            sampling: SamplingParams {
                temperature: 1.0,
                top_k: 0,
                top_p: 0.95,
                seed: 5,
            },
            ..GenerationConfig::default()
        };
        let prompt = ttok.encode("The neighbours said that", false).unwrap();
        let plain = generate(
            &mut PlainDecoder::new(target.as_ref()),
            &ttok,
            &prompt,
            &cfg,
        )
        .unwrap();
        let mut fused = FusedDecoder::new(target.as_ref(), cal.as_ref(), &a, 0.0, cross).unwrap();
        let fused = generate(&mut fused as &mut dyn Decoder, &ttok, &prompt, &cfg).unwrap();
        for (p, f) in plain.iter().zip(&fused) {
            assert_eq!(p.token_ids, f.token_ids, "{name}");
        }
    }
}

#[test]
fn mismatched_alignment_or_alpha_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cal_dir = calibration_dir(dir.path());
    let cal = lm::load(&cal_dir).unwrap();
    let target = lm::load(&common::model("gemma3")).unwrap();
    // A for a 576-wide target used with Gemma (640).
    let e = FusedDecoder::new(
        target.as_ref(),
        cal.as_ref(),
        &random_a(576, 576),
        0.3,
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("576 x 576") && e.contains("align"), "{e}");
    for alpha in [-0.1, 1.5, f64::NAN] {
        let e = FusedDecoder::new(
            target.as_ref(),
            cal.as_ref(),
            &random_a(576, 640),
            alpha,
            None,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("outside [0, 1]"), "{e}");
    }
    // A saved for SmolLM2 as target, loaded for Gemma: shape and identity both named.
    let cal_id = ModelId::of(&cal_dir, 576).unwrap();
    let smol = ModelId::of(&common::model("smollm2"), 576).unwrap();
    let gemma = ModelId::of(&common::model("gemma3"), 640).unwrap();
    let path = dir.path().join("a.safetensors");
    Alignment::untrained(cal_id.clone(), smol.clone(), 11)
        .unwrap()
        .save(&path)
        .unwrap();
    let e = Alignment::load(&path, &cal_id, &gemma)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("maps width 576 to 576") && e.contains("detoxfuse align"),
        "{e}"
    );
    // Same widths, other model: the manifest's identity check.
    let other = ModelId {
        sha256: "0".repeat(64),
        ..smol.clone()
    };
    let e = Alignment::load(&path, &cal_id, &other)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("another target"), "{e}");
    assert!(Alignment::load(&path, &cal_id, &smol).is_ok());
}

/// The common vocabulary compares decoded bytes: `Ġthe` (byte-level BPE) meets `▁the`
/// (SentencePiece), newlines meet, and no special token is in it.
#[test]
fn common_vocabulary_normalises_both_tokenizer_families() {
    use detoxfuse::text::vocab::CommonVocab;
    let s = Tokenizer::for_model(&common::model("smollm2")).unwrap();
    let g = Tokenizer::for_model(&common::model("gemma3")).unwrap();
    let ss = CommonVocab::new(&s, &s);
    let ordinary = (0..s.vocab_size() as u32)
        .filter(|&i| !s.is_control(i))
        .count();
    assert_eq!(ss.len(), ordinary);
    assert!(ss.pairs.iter().all(|&(a, b)| a == b));
    let sg = CommonVocab::new(&s, &g);
    eprintln!(
        "common vocabulary: smollm2-smollm2 {}, smollm2-gemma3 {}",
        ss.len(),
        sg.len()
    );
    assert!(sg.len() > 40_000, "{}", sg.len());
    for &(a, b) in &sg.pairs {
        assert!(!s.is_control(a) && !g.is_control(b));
        assert_eq!(s.token_bytes(a, false), g.token_bytes(b, false));
    }
    for text in [" the", "\n", " world", "1"] {
        let a = s.encode(text, false).unwrap();
        assert_eq!(a.len(), 1, "{text:?}");
        assert!(sg.pairs.iter().any(|p| p.0 == a[0]), "{text:?} not common");
    }
}

/// Continuous batching: prompts read apart join a running batch at different steps, each
/// with its own α (0 among them), and one row leaves; every row's logits at every step equal
/// that prompt decoded alone at its α (f32 weights; greedy tokens from the alone run).
fn joined_rows_decode_as_each_alone(target_name: &str) {
    let pair = f32_pair(target_name);
    let (target, cal, ttok, ctok) = (&pair.target, &pair.cal, &pair.ttok, &pair.ctok);
    let cross = (!same_tokenizer(ttok, ctok)).then_some((ttok, ctok));
    let a = random_a(cal.info().hidden_size, target.info().hidden_size);
    // (prompt, α, step at which it joins)
    let requests = [
        ("The committee met on Tuesday to", 0.4, 0),
        ("Über 3 Städte — and then", 0.0, 2),
        ("Honestly, I think people who", 0.7, 3),
    ];
    const STEPS: usize = 8;
    // Each prompt alone: its greedy tokens and the logits of every step.
    let alone: Vec<(Vec<u32>, Vec<Vec<f32>>)> = requests
        .iter()
        .map(|&(text, alpha, _)| {
            let mut dec =
                FusedDecoder::new(target.as_ref(), cal.as_ref(), &a, alpha, cross).unwrap();
            let mut logits = vec![dec.prefill(&ttok.encode(text, false).unwrap()).unwrap()];
            let mut tokens = Vec::new();
            for _ in 0..STEPS {
                let t = detoxfuse::sample::argmax(logits.last().unwrap()) as u32;
                tokens.push(t);
                logits.push(dec.step(&[t]).unwrap().remove(0));
            }
            (tokens, logits)
        })
        .collect();
    let mut batch = FusedDecoder::new(target.as_ref(), cal.as_ref(), &a, 0.0, cross).unwrap();
    // rows: (request, how many of its steps done)
    let mut rows: Vec<(usize, usize)> = Vec::new();
    let mut worst = 0.0f32;
    for step in 0..STEPS + 3 {
        for (i, &(text, alpha, at)) in requests.iter().enumerate() {
            if at == step {
                let mut p = batch
                    .begin(&ttok.encode(text, false).unwrap(), alpha)
                    .unwrap();
                while p.remaining() > 0 {
                    batch.prefill_some(&mut p, 3).unwrap(); // chunks of 3 tokens
                }
                let first = batch.join(p, 1).unwrap();
                worst = worst.max(max_diff(&first, &alone[i].1[0]));
                rows.push((i, 0));
            }
        }
        if step == 5 {
            // the first request leaves
            let keep: Vec<usize> = (0..rows.len()).filter(|&r| rows[r].0 != 0).collect();
            batch.retain_rows(&keep).unwrap();
            rows = keep.iter().map(|&r| rows[r]).collect();
        }
        assert_eq!(batch.rows(), rows.len());
        if rows.is_empty() {
            break;
        }
        let tokens: Vec<u32> = rows.iter().map(|&(i, d)| alone[i].0[d]).collect();
        let logits = batch.step(&tokens).unwrap();
        for ((i, d), l) in rows.iter_mut().zip(&logits) {
            *d += 1;
            let diff = max_diff(l, &alone[*i].1[*d]);
            assert!(
                diff <= 1e-4,
                "{target_name}: request {i} step {d} in the batch differs from alone by {diff}"
            );
            worst = worst.max(diff);
        }
        let finished: Vec<usize> = (0..rows.len()).filter(|&r| rows[r].1 < STEPS).collect();
        if finished.len() < rows.len() {
            batch.retain_rows(&finished).unwrap();
            rows = finished.iter().map(|&r| rows[r]).collect();
        }
    }
    eprintln!("{target_name}: joined rows vs alone, largest difference {worst:e}");
}

#[test]
fn joined_rows_with_their_own_alpha_decode_as_each_alone_same_tokenizer() {
    joined_rows_decode_as_each_alone("smollm2");
}

#[test]
fn joined_rows_with_their_own_alpha_decode_as_each_alone_cross_tokenizer() {
    joined_rows_decode_as_each_alone("gemma3");
}

/// A model that reads the target's token ids (a DExperts expert or anti-expert, a teacher's)
/// is refused, with its role, its path and what to do, when its vocabulary is another one;
/// with the target's own vocabulary it loads.
#[test]
fn a_model_on_the_targets_ids_with_another_vocabulary_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let smollm2_layers = calibration_dir(dir.path());
    let gemma = common::model("gemma3");
    let gemma_tok = Tokenizer::for_model(&gemma).unwrap();
    let err = load_with_target_vocab(
        &smollm2_layers,
        &gemma_tok,
        &gemma,
        "the DExperts baseline's anti-expert",
        "Leave the baseline out.",
    )
    .err()
    .expect("SmolLM2's vocabulary on Gemma's ids must be refused")
    .to_string();
    for part in [
        "the DExperts baseline's anti-expert",
        &smollm2_layers.display().to_string(),
        "another vocabulary",
        "Leave the baseline out.",
    ] {
        assert!(err.contains(part), "the error lacks {part:?}: {err}");
    }
    let smollm2 = common::model("smollm2");
    let smollm2_tok = Tokenizer::for_model(&smollm2).unwrap();
    let m = load_with_target_vocab(&smollm2_layers, &smollm2_tok, &smollm2, "expert", "")
        .expect("the target's own vocabulary loads");
    assert_eq!(m.info().vocab_size, smollm2_tok.vocab_size());
}
