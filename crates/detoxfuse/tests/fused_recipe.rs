//! The fusion-aware recipe: the fused loss's gradients are right (finite differences on a tiny
//! f64 model, every trainable tensor: LoRA factors, A, γ, β), α = 0 is exactly the target,
//! toxic tokens are found where the scorer's toxicity jumps, and the leakage guard keeps
//! evaluation prompts out of training.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use detoxfuse::calibrate::fused::{
    self, batch_objective, head_terms, make_batch, Divergence, FusedExample, FusionMap, FusionNorm,
    TeacherLogits, Term, Weights,
};
use detoxfuse::calibrate::guard::LeakageGuard;
use detoxfuse::calibrate::model::{LayerTraining, Trainable};
use detoxfuse::calibrate::selfgen::{self, Lean, Prompt, Sample, SampledPrompt, SelfGenConfig};
use detoxfuse::fuse::FusedDecoder;
use detoxfuse::generate::{Decoder, PlainDecoder};
use detoxfuse::score::{ProfanityCheck, ToxicityScorer};
use detoxfuse::text::Tokenizer;
use rand::{Rng, SeedableRng};

fn rand_tensor(rng: &mut rand::rngs::StdRng, shape: &[usize], centre: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| centre + rng.random_range(-0.5..0.5))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Keep rows and detox rows of the tiny vocabulary (23 tokens).
fn tiny_rows() -> Vec<FusedExample> {
    vec![
        FusedExample {
            ids: vec![1, 5, 9, 2, 22, 7],
            keep: vec![1, 2, 4],
            detox: vec![],
            teach: vec![],
            group: 0,
            cal_ids: vec![],
            cal_of: vec![],
        },
        FusedExample {
            ids: vec![3, 4, 11, 0],
            keep: vec![],
            detox: vec![1, 2],
            teach: vec![0, 2],
            group: 1,
            cal_ids: vec![],
            cal_of: vec![],
        },
        FusedExample {
            ids: vec![8, 13, 6, 19, 20],
            keep: vec![0, 1],
            detox: vec![3],
            teach: vec![3],
            group: 2,
            cal_ids: vec![],
            cal_of: vec![],
        },
    ]
}

/// Central differences of the fused objective (keep, unlikelihood and teacher terms) on every
/// trainable tensor: LoRA factors on the calibration layers, A, γ and β (f64; the target
/// states, the head and the teacher's logits are random fixed tensors).
#[test]
fn fused_loss_gradients_match_finite_differences() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let cal = common::tiny_calibration(false, Trainable::default())
        .with_layer_training(LayerTraining::Lora { rank: 2 }, 3)
        .unwrap();
    // B starts at zero; give it values so that A's factor gets a gradient too.
    for (name, var) in cal.vars() {
        if name.ends_with(".b") {
            var.set(&rand_tensor(&mut rng, var.dims(), 0.0)).unwrap();
        }
    }
    let (dc, dt, vocab) = (8, 6, 23);
    let map = FusionMap {
        a: rand_tensor(&mut rng, &[dc, dt], 0.0),
        gamma: rand_tensor(&mut rng, &[dt], 1.0),
        beta: rand_tensor(&mut rng, &[dt], 0.0),
        norm: FusionNorm::Paper,
    };
    let (a, g, b) = (
        Var::from_tensor(&map.a).unwrap(),
        Var::from_tensor(&map.gamma).unwrap(),
        Var::from_tensor(&map.beta).unwrap(),
    );
    let head = rand_tensor(&mut rng, &[vocab, dt], 0.0);
    let rows = tiny_rows();
    let refs: Vec<&FusedExample> = rows.iter().collect();
    let mut batch = make_batch(&refs, &[0.2, 0.5, 0.35], (0, 0), DType::F64).unwrap();
    batch.teacher = Some(TeacherLogits {
        delta: (rand_tensor(&mut rng, &[3, vocab], 0.0) * 4.0).unwrap(),
        beta: 1.5,
    });
    let n = batch.positions.len();
    let h_t = rand_tensor(&mut rng, &[n, dt], 0.0);
    let weights = Weights {
        keep: 1.0,
        detox: 0.7,
        teach: 0.5,
    };
    let map_of = |norm| FusionMap {
        a: a.as_tensor().clone(),
        gamma: g.as_tensor().clone(),
        beta: b.as_tensor().clone(),
        norm,
    };
    let mut vars: BTreeMap<String, Var> = cal.vars().clone();
    vars.insert("fusion.a".into(), a.clone());
    vars.insert("fusion.gamma".into(), g.clone());
    vars.insert("fusion.beta".into(), b.clone());
    assert_eq!(
        vars.len(),
        2 * 7 * 2 + 3,
        "LoRA on 7 matrices × 2 layers, plus A, γ, β"
    );
    let cases = [
        (Divergence::Forward, FusionNorm::Paper),
        (Divergence::Reverse, FusionNorm::Paper),
        (Divergence::Reverse, FusionNorm::KeepTargetNorm),
    ];
    for (div, norm) in cases {
        let (sums, grads) =
            batch_objective(&cal, &map_of(norm), &h_t, &head, &batch, Some(weights), div).unwrap();
        assert_eq!((sums.keep, sums.detox, sums.teach), (5, 3, 3));
        assert!(sums.kl > 0.0 && sums.reverse_kl > 0.0 && sums.unlikelihood > 0.0);
        assert!(sums.teach_kl > 0.0);
        let grads = grads.unwrap();
        let objective = || {
            let (s, _) =
                batch_objective(&cal, &map_of(norm), &h_t, &head, &batch, None, div).unwrap();
            s.objective(weights, div)
        };
        let checked = common::check_finite_differences(
            &vars,
            &grads,
            objective,
            &format!("fused {div:?} {norm:?}"),
        );
        assert_eq!(checked, 3 * vars.len());
    }
}

/// The head terms against values computed directly from full softmaxes.
#[test]
fn head_terms_equal_direct_kl_and_unlikelihood() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let (n, d, vocab) = (6, 3, 7);
    let h = rand_tensor(&mut rng, &[n, d], 0.0);
    let ht = rand_tensor(&mut rng, &[n, d], 0.0);
    let w = rand_tensor(&mut rng, &[vocab, d], 0.0);
    let terms = [
        (Term::Keep, 0),
        (Term::Detox, 3),
        (Term::Teach, 0),
        (Term::Keep, 6),
        (Term::Detox, 1),
        (Term::Teach, 0),
    ];
    let delta = rand_tensor(&mut rng, &[2, vocab], 0.0);
    let teacher = TeacherLogits {
        delta: delta.clone(),
        beta: 2.0,
    };
    let (s, _) = head_terms(
        &h,
        &ht,
        &w,
        &terms,
        Some(&teacher),
        None,
        Divergence::Forward,
    )
    .unwrap();
    let normalise = |l: Vec<Vec<f64>>| -> Vec<Vec<f64>> {
        l.iter()
            .map(|r| {
                let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = r.iter().map(|v| (v - m).exp()).sum();
                r.iter().map(|v| (v - m).exp() / z).collect()
            })
            .collect()
    };
    let logits =
        |x: &Tensor| -> Vec<Vec<f64>> { x.matmul(&w.t().unwrap()).unwrap().to_vec2().unwrap() };
    let (pf, pt) = (normalise(logits(&h)), normalise(logits(&ht)));
    // The teacher of rows 2 and 5: the target's logits plus β·δ (δ rows 0 and 1).
    let dv: Vec<Vec<f64>> = delta.to_vec2().unwrap();
    let teacher_p = normalise(
        [(2, 0), (5, 1)]
            .iter()
            .map(|&(i, k)| {
                logits(&ht)[i]
                    .iter()
                    .zip(&dv[k])
                    .map(|(z, dz)| z + 2.0 * dz)
                    .collect()
            })
            .collect(),
    );
    let teach_kl = |i: usize, k: usize| -> f64 {
        (0..vocab)
            .map(|j| teacher_p[k][j] * (teacher_p[k][j] / pf[i][j]).ln())
            .sum()
    };
    assert_eq!((s.keep, s.detox, s.teach), (2, 2, 2));
    assert!(
        (s.teach_kl - (teach_kl(2, 0) + teach_kl(5, 1))).abs() < 1e-12,
        "{}",
        s.teach_kl
    );
    let kl = |i: usize| -> f64 {
        (0..vocab)
            .map(|j| pt[i][j] * (pt[i][j] / pf[i][j]).ln())
            .sum()
    };
    let ul = |i: usize, t: usize| -(1.0 - pf[i][t]).ln();
    assert!((s.kl - (kl(0) + kl(3))).abs() < 1e-12, "{}", s.kl);
    let rkl = |i: usize| -> f64 {
        (0..vocab)
            .map(|j| pf[i][j] * (pf[i][j] / pt[i][j]).ln())
            .sum()
    };
    assert!(
        (s.reverse_kl - (rkl(0) + rkl(3))).abs() < 1e-12,
        "{}",
        s.reverse_kl
    );
    assert!((s.unlikelihood - (ul(1, 3) + ul(4, 1))).abs() < 1e-12);
    assert!((s.toxic_prob - (pf[1][3] + pf[4][1])).abs() < 1e-12);
    // Teach positions without teacher logits are refused, not read out of bounds.
    let err = head_terms(&h, &ht, &w, &terms, None, None, Divergence::Forward).unwrap_err();
    assert!(err.to_string().contains("teacher logits"), "{err}");
}

/// At α = 0 a decoder with a trained-looking map gives the plain target's logits exactly, on
/// the real SmolLM2 (f32 weights), at the prompt and at every sampled step.
#[test]
fn alpha_zero_fused_decoding_is_exactly_the_target() {
    let path = common::model("smollm2");
    let opts = detoxfuse::lm::LoadOptions { dequantize: true };
    let target = detoxfuse::lm::load_with(&path, opts).unwrap();
    let cal = detoxfuse::lm::load_with(&path, opts).unwrap();
    let tok = Tokenizer::for_model(&path).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let map = FusionMap {
        a: rand_tensor(&mut rng, &[576, 576], 0.0)
            .to_dtype(DType::F32)
            .unwrap(),
        gamma: rand_tensor(&mut rng, &[576], 1.0)
            .to_dtype(DType::F32)
            .unwrap(),
        beta: rand_tensor(&mut rng, &[576], 0.0)
            .to_dtype(DType::F32)
            .unwrap(),
        norm: FusionNorm::Paper,
    };
    let prompt = tok.encode("The weather today is", false).unwrap();
    for norm in [FusionNorm::Paper, FusionNorm::KeepTargetNorm] {
        let map = FusionMap {
            norm,
            ..map.clone()
        };
        let mut fused =
            FusedDecoder::with_map(target.as_ref(), cal.as_ref(), map.clone(), 0.0, None).unwrap();
        let mut plain = PlainDecoder::new(target.as_ref());
        assert_eq!(
            fused.prefill(&prompt).unwrap(),
            plain.prefill(&prompt).unwrap(),
            "{norm:?}"
        );
        fused.fork(2).unwrap();
        plain.fork(2).unwrap();
        for step in [[260u32, 1596], [436, 253], [1109, 284]] {
            assert_eq!(fused.step(&step).unwrap(), plain.step(&step).unwrap());
        }
        // And at α > 0 the same map does change the logits (the test is not vacuous).
        let mut on = FusedDecoder::with_map(target.as_ref(), cal.as_ref(), map, 0.3, None).unwrap();
        assert_ne!(
            on.prefill(&prompt).unwrap(),
            plain.prefill(&prompt).unwrap()
        );
    }
}

#[test]
fn toxic_tokens_are_the_word_where_the_score_jumps() {
    let path = common::model("smollm2");
    let tok = Tokenizer::for_model(&path).unwrap();
    let scorer = ProfanityCheck::shared();
    let text = " and then you stupid fucking idiot went home";
    let ids = tok.encode(text, false).unwrap();
    let marks = fused::toxic_tokens(&tok, scorer, &ids, 0.5, 0.1);
    assert!(!marks.is_empty(), "no toxic token found in {text:?}");
    let first = marks[0];
    let before = tok.decode(&ids[..first], false);
    assert!(
        scorer.score(&[before.as_str()])[0] < 0.5,
        "text before the first toxic token already scores toxic: {before:?}"
    );
    let word = tok.decode(&ids[first..=first], false);
    assert!(word.starts_with(' '), "the mark starts a word: {word:?}");
    let clean = tok
        .encode(" and then we walked home together", false)
        .unwrap();
    assert!(fused::toxic_tokens(&tok, scorer, &clean, 0.5, 0.1).is_empty());
}

/// The RealToxicityPrompts evaluation files, which the guard reads.
fn rtp_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/rtp")
}

/// A prompt builder fed an HH dialogue that contains an evaluation prompt drops it, and the
/// trainer refuses a samples file that holds one.
#[test]
fn leakage_guard_drops_and_refuses_evaluation_prompts() {
    let guard = LeakageGuard::from_rtp_dir(&rtp_dir()).unwrap();
    assert!(guard.len() > 2000, "both RTP files: {}", guard.len());
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(rtp_dir().join("challenging-toxic-1196.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let rtp_prompt = first["prompt"]["text"].as_str().unwrap().to_string();
    assert!(guard.leaked(&rtp_prompt).is_some());

    let dir = tempfile::tempdir().unwrap();
    let hh = dir.path().join("hh.jsonl");
    let dialogue = format!(
        "\n\nHuman: {rtp_prompt} and the rest of it was a long story about nothing.\n\nAssistant: Tell me more about the garden and the river near your house."
    );
    std::fs::write(
        &hh,
        serde_json::json!({"chosen": dialogue, "rejected": dialogue}).to_string() + "\n",
    )
    .unwrap();
    let toxigen =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/toxigen");
    let (prompts, stats) = selfgen::build_prompts(
        &hh,
        &toxigen,
        &guard,
        ProfanityCheck::shared(),
        &SelfGenConfig::default(),
    )
    .unwrap();
    assert!(stats.dropped_by_guard >= 1, "{stats:?}");
    for p in &prompts {
        assert!(guard.leaked(&p.text).is_none(), "{:?} leaked", p.text);
    }

    // A samples file holding the evaluation prompt is refused before any training.
    let samples = dir.path().join("samples.jsonl");
    let rec = SampledPrompt {
        prompt: Prompt {
            text: rtp_prompt.clone(),
            lean: Lean::Toxic,
            source: "test".into(),
        },
        prompt_ids: vec![1, 2, 3],
        samples: vec![Sample {
            ids: vec![4, 5],
            text: "x".into(),
            toxicity: 0.0,
        }],
    };
    std::fs::write(&samples, serde_json::to_string(&rec).unwrap() + "\n").unwrap();
    let path = common::model("smollm2");
    let base = detoxfuse::calibrate::train::Base::load(&path, 1).unwrap();
    let target = detoxfuse::lm::load(&path).unwrap();
    let inputs = fused::FusedInputs {
        base: &base,
        target: target.as_ref(),
        target_path: &path,
        target_sha256: "unused".into(),
        samples: &samples,
        guard: &guard,
        scorer: ProfanityCheck::shared(),
        target_tok: &base.model.tokenizer,
        shared: None,
        artifact: dir.path().join("run/artifact"),
    };
    let out = dir.path().join("run");
    let cfg = fused::FusedConfig {
        layers: 1,
        ..Default::default()
    };
    let err = fused::train(&inputs, &out, &cfg, false, &mut |_| {})
        .expect_err("training on an evaluation prompt must be refused")
        .to_string();
    assert!(
        err.contains("RealToxicityPrompts evaluation prompt"),
        "{err}"
    );
    assert!(!out.join("checkpoint.json").exists());
}

/// Gemma-3 target, SmolLM2 calibration model: each scored target position is paired with the
/// calibration position whose text is the longest calibration-token prefix of the target's
/// text so far, and toxic tokens are found in the target's own tokens.
#[test]
fn cross_tokenizer_rows_pair_each_target_position_with_the_text_read_so_far() {
    let ctok = Tokenizer::for_model(&common::model("smollm2")).unwrap();
    let ttok = Tokenizer::for_model(&common::model("gemma3")).unwrap();
    let sample = |text: &str| Sample {
        ids: vec![],
        text: text.into(),
        toxicity: 0.0,
    };
    let rec = SampledPrompt {
        prompt: Prompt {
            text: "They told me that you are such a".into(),
            lean: Lean::Toxic,
            source: "test".into(),
        },
        prompt_ids: vec![],
        samples: vec![
            sample(" stupid fucking idiot, and everyone knows it"),
            sample(" kind person who always helps the neighbours"),
        ],
    };
    let (ex, stats) =
        fused::examples_cross(&[rec], &ttok, &ctok, ProfanityCheck::shared(), 0.5, 0.1).unwrap();
    assert_eq!(ex.len(), 2, "{stats:?}");
    assert!(!ex[0].detox.is_empty() && ex[1].detox.is_empty());
    let bytes = |tok: &Tokenizer, ids: &[u32]| -> Vec<u8> {
        ids.iter()
            .flat_map(|&t| tok.token_bytes(t, false))
            .collect()
    };
    for e in &ex {
        assert!(!e.cal_ids.is_empty() && e.cal_of.len() == e.ids.len());
        for &p in e.keep.iter().chain(&e.detox) {
            let target_text = bytes(&ttok, &e.ids[..=p as usize]);
            let c = e.cal_of[p as usize] as usize;
            let cal_text = bytes(&ctok, &e.cal_ids[..=c]);
            assert!(target_text.starts_with(&cal_text), "position {p}");
            if c + 1 < e.cal_ids.len() {
                let next = bytes(&ctok, &e.cal_ids[..=c + 1]);
                assert!(
                    next.len() > target_text.len(),
                    "position {p}: a later calibration token also fits"
                );
            }
        }
    }
}

/// A model whose hidden state at `(row, pos)` is `(id, pos)` and whose head is linear with
/// slope `k`: test-only, so that which row and position the teacher read is visible in its
/// logits.
struct Echo {
    info: detoxfuse::lm::ModelInfo,
    k: f64,
}

impl detoxfuse::lm::CausalLm for Echo {
    fn info(&self) -> &detoxfuse::lm::ModelInfo {
        &self.info
    }
    fn forward_hidden(
        &self,
        ids: &Tensor,
        _cache: &mut detoxfuse::lm::KvCache,
    ) -> detoxfuse::Result<Tensor> {
        let rows: Vec<Vec<u32>> = ids.to_vec2()?;
        let t = rows[0].len();
        let v: Vec<f32> = rows
            .iter()
            .flat_map(|r| {
                r.iter()
                    .enumerate()
                    .flat_map(|(p, &id)| [id as f32, p as f32])
            })
            .collect();
        Ok(Tensor::from_vec(v, (rows.len(), t, 2), &Device::Cpu)?)
    }
    fn lm_head(&self, hidden: &Tensor) -> detoxfuse::Result<Tensor> {
        let h: Vec<Vec<f32>> = hidden.to_vec2()?;
        let vocab = self.info.vocab_size;
        let v: Vec<f32> = h
            .iter()
            .flat_map(|r| {
                (0..vocab)
                    .map(move |j| (self.k * (r[0] as f64 * 100.0 + r[1] as f64) * j as f64) as f32)
            })
            .collect();
        Ok(Tensor::from_vec(v, (h.len(), vocab), &Device::Cpu)?)
    }
}

/// The teacher's logits are read at exactly the teach positions of the rows that have them
/// (keep rows are left out of the experts' batch, and positions are remapped into it).
#[test]
fn teacher_logits_are_read_at_the_teach_positions() {
    let info = detoxfuse::lm::ModelInfo {
        arch: "echo".into(),
        name: "echo".into(),
        hidden_size: 2,
        vocab_size: 23,
        n_layers: 0,
        context_length: 64,
    };
    let (e, a) = (
        Echo {
            info: info.clone(),
            k: 3.0,
        },
        Echo { info, k: 1.0 },
    );
    let teacher = fused::Teacher {
        expert: &e,
        anti_expert: &a,
        beta: 2.0,
    };
    let rows = tiny_rows();
    let refs: Vec<&FusedExample> = rows.iter().collect();
    let batch = make_batch(&refs, &[0.1, 0.2, 0.3], (0, 0), DType::F32).unwrap();
    let t = fused::teacher_logits(&teacher, &batch).unwrap().unwrap();
    assert_eq!(t.beta, 2.0);
    let got: Vec<Vec<f32>> = t.delta.to_vec2().unwrap();
    // Teach positions in batch order: row 1 at 0 and 2, row 2 at 3.
    let want: Vec<(u32, u32)> = vec![
        (rows[1].ids[0], 0),
        (rows[1].ids[2], 2),
        (rows[2].ids[3], 3),
    ];
    assert_eq!(got.len(), want.len());
    for (g, (id, p)) in got.iter().zip(want) {
        for (j, x) in g.iter().enumerate() {
            let expect = (3.0 - 1.0) * (id as f64 * 100.0 + p as f64) * j as f64;
            assert!(
                (*x as f64 - expect).abs() < 1e-3 * expect.max(1.0),
                "{x} vs {expect}"
            );
        }
    }
    // A batch without teach positions needs no teacher.
    let plain: Vec<FusedExample> = rows.iter().map(|r| r.keep_only()).collect();
    let refs: Vec<&FusedExample> = plain.iter().collect();
    let batch = make_batch(&refs, &[0.1, 0.2, 0.3], (0, 0), DType::F32).unwrap();
    assert!(fused::teacher_logits(&teacher, &batch).unwrap().is_none());
}

/// Under a teacher a detox row keeps its toxic tokens and is taught at every scored position.
#[test]
fn a_detox_row_under_a_teacher_is_taught_along_its_continuation() {
    let row = FusedExample {
        ids: vec![1, 2, 3, 4, 5, 6],
        keep: vec![1, 2],
        detox: vec![3, 4],
        teach: vec![],
        group: 0,
        cal_ids: vec![],
        cal_of: vec![],
    };
    let t = row.with_teacher();
    assert_eq!(
        (t.keep, t.detox, t.teach),
        (vec![], vec![3, 4], vec![1, 2, 3, 4])
    );
}
