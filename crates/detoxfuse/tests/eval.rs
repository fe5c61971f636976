//! The evaluation harness on the real models: batched perplexity scoring equals one-by-one
//! scoring, the word filter never lets a banned sequence through, and generation records are
//! reproducible per prompt (what resuming relies on).

mod common;

use common::model;
use detoxfuse::eval::baselines::{BannedSequences, WordFilterDecoder};
use detoxfuse::eval::fluency::{continuation_nll, continuation_nlls};
use detoxfuse::eval::harness::{generate_samples, read_samples, Prompt};
use detoxfuse::generate::{generate, GenerationConfig, PlainDecoder};
use detoxfuse::lm::{self, LoadOptions};
use detoxfuse::sample::SamplingParams;
use detoxfuse::score::ProfanityCheck;
use detoxfuse::text::Tokenizer;

#[test]
fn batched_continuation_scoring_equals_one_by_one() {
    // exact f32 weights: batched and single forwards differ by summation order only
    let path = model("gemma3");
    let m = lm::load_with(&path, LoadOptions { dequantize: true }).unwrap();
    let tok = Tokenizer::for_model(&path).unwrap();
    let prompt = "So I told him that he was";
    let conts = [
        " wrong, and he laughed.",
        "",
        " a complete and utter disappointment to everyone who ever met him",
        "!",
        " 🙂 très bien",
    ];
    let batched = continuation_nlls(m.as_ref(), &tok, prompt, &conts).unwrap();
    assert!(
        batched[1].is_none(),
        "empty continuation has no tokens: {batched:?}"
    );
    for (c, b) in conts.iter().zip(&batched) {
        let single = continuation_nll(m.as_ref(), &tok, prompt, c).unwrap();
        match (single, b) {
            (None, None) => {}
            (Some(s), Some(b)) => {
                assert_eq!(s.tokens, b.tokens);
                assert!(
                    (s.nll - b.nll).abs() < 1e-3 * s.tokens as f64,
                    "{c:?}: single {} vs batched {}",
                    s.nll,
                    b.nll
                );
            }
            other => panic!("{c:?}: {other:?}"),
        }
    }
}

fn contains_seq(hay: &[u32], needle: &[u32]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn word_filter_never_completes_a_banned_sequence() {
    let path = model("smollm2");
    let m = lm::load(&path).unwrap();
    let tok = Tokenizer::for_model(&path).unwrap();
    let words: Vec<String> = ["shit", "fuck", "fucking", "damn", "bitch", "ass"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let banned = BannedSequences::new(&tok, &words).unwrap();
    let forms: Vec<Vec<u32>> = words
        .iter()
        .flat_map(|w| {
            let cap = format!("{}{}", w[..1].to_uppercase(), &w[1..]);
            [w.clone(), format!(" {w}"), cap.clone(), format!(" {cap}")]
        })
        .map(|f| {
            let mut v = Vec::new();
            tok.encode_into(&f, false, &mut v).unwrap();
            v
        })
        .collect();
    let prompt = tok
        .encode("He screamed at the referee: \"You stupid piece of", false)
        .unwrap();
    let cfg = GenerationConfig {
        max_tokens: 12,
        n: 25,
        sampling: SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.95,
            seed: 3,
        },
        ..GenerationConfig::default()
    };
    // the unfiltered model does produce them here (else the test would prove nothing)
    let plain = generate(&mut PlainDecoder::new(m.as_ref()), &tok, &prompt, &cfg).unwrap();
    let hits = plain
        .iter()
        .filter(|g| {
            let all = [prompt.clone(), g.token_ids.clone()].concat();
            forms
                .iter()
                .any(|f| contains_seq(&all[prompt.len().saturating_sub(f.len() - 1)..], f))
        })
        .count();
    assert!(hits > 0, "no banned word in 25 unfiltered samples");
    let mut dec = WordFilterDecoder::new(Box::new(PlainDecoder::new(m.as_ref())), &banned);
    let filtered = generate(&mut dec, &tok, &prompt, &cfg).unwrap();
    for g in &filtered {
        let all = [prompt.clone(), g.token_ids.clone()].concat();
        for f in &forms {
            // any occurrence that ends inside the generated part is a leak
            let tail = &all[prompt.len().saturating_sub(f.len() - 1)..];
            assert!(!contains_seq(tail, f), "{:?} leaked in {:?}", f, g.text);
        }
    }
    eprintln!("unfiltered samples with a banned word: {hits} of 25; filtered: 0");
}

#[test]
fn generation_records_do_not_depend_on_order_or_resumption() {
    let path = model("smollm2");
    let m = lm::load(&path).unwrap();
    let tok = Tokenizer::for_model(&path).unwrap();
    let prompts: Vec<Prompt> = ["The weather is", "My favourite food is", "Yesterday I"]
        .iter()
        .enumerate()
        .map(|(i, t)| Prompt {
            line: i * 7 + 1,
            text: t.to_string(),
        })
        .collect();
    let cfg = GenerationConfig {
        max_tokens: 6,
        n: 3,
        sampling: SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.9,
            seed: 11,
        },
        ..GenerationConfig::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let (all, part) = (dir.path().join("all.jsonl"), dir.path().join("part.jsonl"));
    let scorer = ProfanityCheck::shared();
    let mut dec = PlainDecoder::new(m.as_ref());
    generate_samples(&mut dec, &tok, &prompts, &cfg, scorer, &all, &mut |_, _| {}).unwrap();
    // the last prompt first, then a torn line, then the rest as a resumed run
    generate_samples(
        &mut dec,
        &tok,
        &prompts[2..],
        &cfg,
        scorer,
        &part,
        &mut |_, _| {},
    )
    .unwrap();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&part)
            .unwrap();
        f.write_all(b"{\"line\": 1, \"prompt\": \"The wea").unwrap();
    }
    let mut calls = Vec::new();
    generate_samples(
        &mut dec,
        &tok,
        &prompts,
        &cfg,
        scorer,
        &part,
        &mut |d, n| calls.push((d, n)),
    )
    .unwrap();
    assert_eq!(calls.first(), Some(&(1, 3)), "one prompt was already done");
    let (a, b) = (read_samples(&all).unwrap(), read_samples(&part).unwrap());
    assert_eq!(a.len(), 3);
    for (line, r) in &a {
        let texts = |r: &detoxfuse::eval::harness::PromptSamples| {
            r.samples.iter().map(|s| s.text.clone()).collect::<Vec<_>>()
        };
        assert_eq!(texts(r), texts(&b[line]), "prompt on line {line}");
        assert_eq!(r.samples.len(), 3);
    }
}
