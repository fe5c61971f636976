//! The trainable calibration model: gradients reach every trainable tensor, analytic
//! gradients agree with finite differences, and its forward pass equals the inference model's.

mod common;

use candle_core::{DType, Device};
use detoxfuse::calibrate::model::{Batch, CalibrationModel, Objective, Trainable};
use detoxfuse::calibrate::optim::missing_grads;
use detoxfuse::lm::export::hf_llama_from_gguf;
use detoxfuse::lm::{self, ids_tensor, LoadOptions};

fn tiny(tied: bool, trainable: Trainable) -> CalibrationModel {
    common::tiny_calibration(tied, trainable)
}

fn tiny_batch() -> Batch {
    let a: Vec<u32> = vec![1, 5, 9, 2, 22, 7];
    let b: Vec<u32> = vec![3, 4, 11, 0];
    let ma = vec![false, true, true, false, true, true];
    let mb = vec![false, false, true, true];
    Batch::new(&[(&a, &ma), (&b, &mb)], 0, &Device::Cpu).unwrap()
}

const ALL: Trainable = Trainable {
    embeddings: true,
    head: true,
};

#[test]
fn every_trainable_tensor_gets_a_nonzero_gradient_tiny() {
    for tied in [true, false] {
        let m = tiny(tied, ALL);
        let expected = 2 + 9 * 2 + usize::from(!tied);
        assert_eq!(m.vars().len(), expected);
        let (loss, grads) = m.loss_and_grads(&tiny_batch()).unwrap();
        assert!(loss.is_finite() && loss > 0.0);
        let missing = missing_grads(m.vars(), &grads).unwrap();
        assert!(
            missing.is_empty(),
            "tied={tied}: no gradient for {missing:?}"
        );
    }
}

fn check_against_finite_differences(
    m: &CalibrationModel,
    grads: &candle_core::backprop::GradStore,
    objective: impl Fn(&CalibrationModel) -> f64,
    what: &str,
) {
    let checked = common::check_finite_differences(m.vars(), grads, || objective(m), what);
    assert!(checked >= 60);
}

/// Central differences on every parameter tensor (3 coordinates each) in f64.
#[test]
fn analytic_gradients_match_finite_differences() {
    for tied in [true, false] {
        let m = tiny(tied, ALL);
        let batch = tiny_batch();
        let (_, grads) = m.loss_and_grads(&batch).unwrap();
        let mean_loss = |m: &CalibrationModel| m.loss(&batch).unwrap().mean();
        check_against_finite_differences(&m, &grads, mean_loss, &format!("tied={tied}"));
    }
}

fn other_batch() -> Batch {
    let a: Vec<u32> = vec![4, 8, 15, 16, 2];
    let b: Vec<u32> = vec![19, 6, 3];
    let ma = vec![false, false, true, true, true];
    let mb = vec![false, true, true];
    Batch::new(&[(&a, &ma), (&b, &mb)], 0, &Device::Cpu).unwrap()
}

/// The unlikelihood term and a weighted sum of objectives (as training with
/// `--unlikelihood` takes them): values against softmax probabilities computed directly,
/// gradients against central differences, on every parameter tensor.
#[test]
fn unlikelihood_and_combined_objectives_match_direct_values_and_finite_differences() {
    for tied in [true, false] {
        let m = tiny(tied, ALL);
        let (clean, toxic) = (tiny_batch(), other_batch());
        // Direct: p(target) from full logits, then mean −log(1 − p).
        let hs = m.scored_hidden(&toxic).unwrap();
        let head = if tied {
            m.get("model.embed_tokens.weight").unwrap()
        } else {
            m.get("lm_head.weight").unwrap()
        };
        let probs = candle_nn::ops::softmax(&hs.matmul(&head.t().unwrap()).unwrap(), 1).unwrap();
        let probs: Vec<Vec<f64>> = probs.to_vec2().unwrap();
        let direct: f64 = toxic
            .targets
            .iter()
            .zip(&probs)
            .map(|(&t, row)| -(1.0 - row[t as usize]).ln())
            .sum::<f64>()
            / toxic.scored() as f64;
        let ul = m.objective(&toxic, Objective::Unlikelihood).unwrap().mean();
        assert!((ul - direct).abs() < 1e-12, "tied={tied}: {ul} vs {direct}");
        assert!(ul > 0.0);

        let w = 0.7;
        let parts = [
            (&clean, Objective::Likelihood, 1.0),
            (&toxic, Objective::Unlikelihood, w),
        ];
        let (means, grads) = m.objectives_and_grads(&parts).unwrap();
        assert!((means[1] - ul).abs() < 1e-12);
        assert!((means[0] - m.loss(&clean).unwrap().mean()).abs() < 1e-12);
        let missing = missing_grads(m.vars(), &grads).unwrap();
        assert!(
            missing.is_empty(),
            "tied={tied}: no gradient for {missing:?}"
        );
        let total = |m: &CalibrationModel| {
            m.loss(&clean).unwrap().mean()
                + w * m.objective(&toxic, Objective::Unlikelihood).unwrap().mean()
        };
        check_against_finite_differences(&m, &grads, total, &format!("tied={tied} combined"));
    }
}

fn smollm_ids(text: &str) -> Vec<u32> {
    let tok = detoxfuse::text::Tokenizer::for_model(&common::model("smollm2")).unwrap();
    tok.encode(text, false).unwrap()
}

/// On the real base (SmolLM2, 3 layers, f32): the default (frozen embeddings and head) and the
/// fully trainable configuration both reach every trainable tensor.
#[test]
fn every_trainable_tensor_gets_a_nonzero_gradient_smollm2() {
    let base = hf_llama_from_gguf(&common::model("smollm2"), Some(3)).unwrap();
    let ids =
        smollm_ids("The quiet harbour town woke slowly, and the fishermen mended their nets.");
    let mask = vec![true; ids.len()];
    let batch = Batch::new(&[(&ids, &mask)], 0, &Device::Cpu).unwrap();
    for trainable in [Trainable::default(), ALL] {
        let m = CalibrationModel::from_base(&base, 3, trainable, DType::F32).unwrap();
        let (loss, grads) = m.loss_and_grads(&batch).unwrap();
        assert!(loss.is_finite());
        let missing = missing_grads(m.vars(), &grads).unwrap();
        assert!(
            missing.is_empty(),
            "{trainable:?}: no gradient for {missing:?}"
        );
        let expect = 1 + 27 + usize::from(trainable.embeddings);
        assert_eq!(m.vars().len(), expect, "{trainable:?}");
    }
}

/// With all 30 layers the trainable model is the whole SmolLM2: its hidden states must equal
/// the inference engine's (dequantized weights) — RoPE layout, GQA and norms included.
#[test]
fn trainable_forward_equals_inference_model() {
    let path = common::model("smollm2");
    let base = hf_llama_from_gguf(&path, None).unwrap();
    let m = CalibrationModel::from_base(&base, 30, Trainable::default(), DType::F32).unwrap();
    let ids = smollm_ids("Rivers carry 42 tonnes of silt\n  each year, say the reports.");
    let ours: Vec<f32> = m
        .forward_hidden(&ids_tensor(std::slice::from_ref(&ids)).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let engine = lm::load_with(&path, LoadOptions { dequantize: true }).unwrap();
    let theirs: Vec<f32> = engine
        .forward_hidden(&ids_tensor(&[ids]).unwrap(), &mut engine.new_cache())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let max = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(max < 1e-3, "hidden states differ by {max}");
}
