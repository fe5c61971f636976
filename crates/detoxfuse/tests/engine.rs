//! Engine behaviour on the real models: KV-cached decoding equals full recomputation,
//! batching and rollback keep results, bad input yields errors rather than panics.

mod common;

use common::{last_logits, model, step_logits};
use detoxfuse::generate::{generate, GenerationConfig, PlainDecoder};
use detoxfuse::lm::{self, ids_tensor, LoadOptions};
use detoxfuse::sample::SamplingParams;
use detoxfuse::text::Tokenizer;
use detoxfuse::Error;

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Feeds a prompt, then one token at a time with the cache; at every step the logits must
/// equal a fresh forward over the whole sequence.
///
/// With f32 weights the two differ only by summation order: tolerance 1e-4. With quantized
/// kernels every matmul first rounds its input to 8 bits per block, so a 1e-7 difference from
/// summation order can flip a rounding and the flips compound over the layers: the same
/// noise that separates us from llama.cpp, bounded by the same tolerance.
fn cached_equals_full(name: &str, opts: LoadOptions, tolerance: f32) {
    let path = model(name);
    let m = lm::load_with(&path, opts).unwrap();
    let tok = Tokenizer::for_model(&path).unwrap();
    let mut seq = tok
        .encode("The quick brown fox jumps over the lazy dog because", true)
        .unwrap();
    let mut cache = m.new_cache();
    let mut logits: Vec<f32> = step_logits(m.as_ref(), &seq, &mut cache);
    let mut worst = 0f32;
    for _ in 0..12 {
        let full = last_logits(m.as_ref(), &seq);
        worst = worst.max(max_abs_diff(&logits, &full));
        let next = detoxfuse::sample::argmax(&logits);
        seq.push(next);
        logits = step_logits(m.as_ref(), &[next], &mut cache);
    }
    eprintln!("{name} {opts:?}: cached vs full recompute, max |diff| = {worst:e}");
    assert!(
        worst < tolerance,
        "{name}: cached logits differ from recompute by {worst}"
    );
}

const F32: LoadOptions = LoadOptions { dequantize: true };
const QUANT_NOISE: f32 = 1.5;

#[test]
fn smollm2_cached_decoding_equals_full_recompute() {
    cached_equals_full("smollm2", F32, 1e-4);
}

#[test]
fn gemma3_cached_decoding_equals_full_recompute() {
    cached_equals_full("gemma3", F32, 1e-4);
}

#[test]
fn quantized_cached_decoding_stays_within_quantization_noise() {
    cached_equals_full("smollm2", LoadOptions::default(), QUANT_NOISE);
    cached_equals_full("gemma3", LoadOptions::default(), QUANT_NOISE);
}

#[test]
fn truncated_cache_resumes_like_a_fresh_one() {
    let m = lm::load_with(&model("smollm2"), F32).unwrap();
    let a: Vec<u32> = vec![504, 3575, 282, 4649, 314];
    let mut cache = m.new_cache();
    m.forward_hidden(&ids_tensor(std::slice::from_ref(&a)).unwrap(), &mut cache)
        .unwrap();
    // go down a wrong path, roll back to 3 tokens, then continue with the right ones
    m.forward_hidden(&ids_tensor(&[vec![11, 12]]).unwrap(), &mut cache)
        .unwrap();
    cache.truncate(3).unwrap();
    assert_eq!(cache.len(), 3);
    let rolled: Vec<f32> = step_logits(m.as_ref(), &a[3..], &mut cache);
    assert!(max_abs_diff(&rolled, &last_logits(m.as_ref(), &a)) < 1e-4);
}

/// Sequences prefilled on their own and merged into one cache (rows of different lengths,
/// as a request joining a running batch) decode together as each does alone, also after a
/// row leaves; a multi-token step on such a cache is a clear error. f32 weights, so the
/// batch shape cannot move the logits.
fn merged_rows_decode_as_each_alone(name: &str) {
    let path = model(name);
    let m = lm::load_with(&path, F32).unwrap();
    let tok = Tokenizer::for_model(&path).unwrap();
    let prompts = [
        "The river",
        "A long time ago, in a quiet village by the sea, there",
        "Tomorrow we will",
    ];
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| tok.encode(p, true).unwrap())
        .collect();
    // Alone: each prompt, then 4 greedy steps; the logits of every step.
    let alone: Vec<Vec<Vec<f32>>> = ids
        .iter()
        .map(|p| {
            let mut cache = m.new_cache();
            let mut logits = vec![step_logits(m.as_ref(), p, &mut cache)];
            for _ in 0..4 {
                let next = detoxfuse::sample::argmax(logits.last().unwrap());
                logits.push(step_logits(m.as_ref(), &[next], &mut cache));
            }
            logits
        })
        .collect();
    // Together: prefilled apart, merged, then one batched step per token.
    let mut cache = m.new_cache();
    for p in &ids {
        let mut own = m.new_cache();
        step_logits(m.as_ref(), p, &mut own);
        cache.append_rows(own).unwrap();
    }
    let lens: Vec<usize> = ids.iter().map(Vec::len).collect();
    assert_eq!(cache.row_lens(), Some(lens.as_slice()));
    let mut rows: Vec<usize> = (0..ids.len()).collect();
    let mut worst = 0f32;
    for step in 1..=4 {
        if step == 3 {
            // the longest sequence finishes: the others go on without it, and the cache's
            // length is the longest row left
            rows.remove(1);
            cache.select_rows(&[0, 2]).unwrap();
            let left = [ids[0].len() + 2, ids[2].len() + 2];
            assert_eq!(cache.row_lens(), Some(left.as_slice()));
            assert_eq!(cache.len(), left[0].max(left[1]));
        }
        let next: Vec<Vec<u32>> = rows
            .iter()
            .map(|&r| vec![detoxfuse::sample::argmax(&alone[r][step - 1])])
            .collect();
        let out = m
            .forward_last_logits(&ids_tensor(&next).unwrap(), &mut cache)
            .unwrap();
        for (i, &r) in rows.iter().enumerate() {
            let got: Vec<f32> = out.get(i).unwrap().to_vec1().unwrap();
            worst = worst.max(max_abs_diff(&got, &alone[r][step]));
        }
    }
    eprintln!("{name}: merged rows vs alone, max |diff| = {worst:e}");
    assert!(worst < 1e-4, "{name}: merged rows differ by {worst}");
    let two = ids_tensor(&[vec![1, 2], vec![3, 4]]).unwrap();
    let err = m.forward_hidden(&two, &mut cache).unwrap_err().to_string();
    assert!(err.contains("one token per row"), "{err}");
}

#[test]
fn merged_rows_of_different_lengths_decode_as_each_alone() {
    merged_rows_decode_as_each_alone("smollm2");
    merged_rows_decode_as_each_alone("gemma3");
}

#[test]
fn batched_samples_equal_the_same_samples_run_alone() {
    let path = model("smollm2");
    // f32 weights: quantized kernels round batched and single rows differently (see above)
    let m = lm::load_with(&path, F32).unwrap();
    let tok = Tokenizer::for_model(&path).unwrap();
    let prompt = tok.encode("Once upon a time", true).unwrap();
    let cfg = GenerationConfig {
        max_tokens: 12,
        n: 4,
        sampling: SamplingParams {
            top_p: 0.9,
            seed: 11,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut dec = PlainDecoder::new(m.as_ref());
    let batched = generate(&mut dec, &tok, &prompt, &cfg).unwrap();
    assert_eq!(batched.len(), 4);
    // sample 0 alone uses the same sampler seed as row 0 of the batch
    let alone = generate(
        &mut dec,
        &tok,
        &prompt,
        &GenerationConfig {
            n: 1,
            ..cfg.clone()
        },
    )
    .unwrap();
    assert_eq!(batched[0].token_ids, alone[0].token_ids);
    let distinct: std::collections::HashSet<_> =
        batched.iter().map(|g| g.token_ids.clone()).collect();
    assert!(
        distinct.len() > 1,
        "4 nucleus samples should not all be identical"
    );
}

#[test]
fn prompt_longer_than_context_is_a_clear_error() {
    let path = model("smollm2");
    let m = lm::load(&path).unwrap();
    let tok = Tokenizer::for_model(&path).unwrap();
    let prompt = vec![504u32; m.info().context_length - 5];
    let cfg = GenerationConfig {
        max_tokens: 10,
        ..Default::default()
    };
    let err = generate(&mut PlainDecoder::new(m.as_ref()), &tok, &prompt, &cfg).unwrap_err();
    assert!(
        matches!(err, Error::ContextOverflow { context: 8192, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("shorten the prompt"));
}

#[test]
fn stop_strings_cut_the_text() {
    let path = model("smollm2");
    let m = lm::load(&path).unwrap();
    let tok = Tokenizer::for_model(&path).unwrap();
    let prompt = tok.encode("1, 2, 3, 4,", true).unwrap();
    let cfg = GenerationConfig {
        max_tokens: 20,
        sampling: SamplingParams::greedy(),
        stop: vec!["7".into()],
        ..Default::default()
    };
    let g = generate(&mut PlainDecoder::new(m.as_ref()), &tok, &prompt, &cfg)
        .unwrap()
        .remove(0);
    assert_eq!(g.text, " 5, 6, ");
    assert_eq!(g.finish_reason, detoxfuse::generate::FinishReason::Stop);
}

#[test]
fn fluent_continuations_have_lower_perplexity_than_scrambled_ones() {
    use detoxfuse::eval::fluency::{continuation_nll, token_nll};
    // evaluator gemma3 (not the default target): natural vs the same words scrambled
    let path = model("gemma3");
    let m = lm::load(&path).unwrap();
    let tok = Tokenizer::for_model(&path).unwrap();
    let prompt = "The weather today is";
    let good = continuation_nll(
        m.as_ref(),
        &tok,
        prompt,
        " sunny and warm, perfect for a walk in the park.",
    )
    .unwrap()
    .unwrap();
    let bad = continuation_nll(
        m.as_ref(),
        &tok,
        prompt,
        " park walk warm the, sunny a for perfect in and.",
    )
    .unwrap()
    .unwrap();
    assert_eq!(good.tokens, bad.tokens);
    assert!(
        good.perplexity() < bad.perplexity() / 3.0,
        "{} vs {}",
        good.perplexity(),
        bad.perplexity()
    );
    // the NLL equals the sum of per-step -log softmax from cached decoding
    let ids_p = tok.encode(prompt, false).unwrap();
    let mut ids_c = Vec::new();
    tok.encode_into(" sunny and warm", false, &mut ids_c)
        .unwrap();
    let scored = continuation_nll(m.as_ref(), &tok, prompt, " sunny and warm")
        .unwrap()
        .unwrap();
    let mut cache = m.new_cache();
    let mut logits = step_logits(m.as_ref(), &ids_p, &mut cache);
    let mut nll = 0f64;
    for &t in &ids_c {
        nll += token_nll(&logits, t);
        logits = step_logits(m.as_ref(), &[t], &mut cache);
    }
    assert_eq!(scored.tokens, ids_c.len());
    // quantized kernels: full-sequence and step-by-step differ by activation rounding only
    assert!((scored.nll - nll).abs() < 0.5, "{} vs {nll}", scored.nll);
}

#[test]
fn streamed_deltas_concatenate_to_the_final_texts() {
    use detoxfuse::generate::generate_streaming;
    let path = model("smollm2");
    let m = lm::load(&path).unwrap();
    let tok = Tokenizer::for_model(&path).unwrap();
    let prompt = tok.encode("Write a list of fruits:\n1.", false).unwrap();
    let cfg = GenerationConfig {
        max_tokens: 30,
        n: 3,
        sampling: SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.95,
            seed: 2,
        },
        stop: vec!["\n3.".into()],
        ..GenerationConfig::default()
    };
    let mut streamed = vec![String::new(); 3];
    let gens = generate_streaming(
        &mut PlainDecoder::new(m.as_ref()),
        &tok,
        &prompt,
        &cfg,
        &mut |s, d| {
            streamed[s].push_str(d);
            true
        },
    )
    .unwrap();
    let plain = generate(&mut PlainDecoder::new(m.as_ref()), &tok, &prompt, &cfg).unwrap();
    for ((g, p), s) in gens.iter().zip(&plain).zip(&streamed) {
        assert_eq!(&g.text, s, "deltas must add up to the text");
        assert_eq!(g.token_ids, p.token_ids, "streaming changes nothing");
        assert!(
            !s.contains("\n3."),
            "a stop string is never streamed: {s:?}"
        );
    }
    // cancelling stops early
    let mut calls = 0;
    let g = generate_streaming(
        &mut PlainDecoder::new(m.as_ref()),
        &tok,
        &prompt,
        &cfg,
        &mut |_, _| {
            calls += 1;
            false
        },
    )
    .unwrap();
    assert!(calls <= 3, "{calls}");
    assert!(g.iter().all(|g| g.token_ids.len() <= 1));
}
