//! The Rust port of alt-profanity-check equals the Python package (fixture written by
//! scripts/export_profanity_model.py: 240 generated sentences, non-ASCII included).

mod common;

use detoxfuse::score::{ProfanityCheck, ToxicityScorer};

#[test]
fn profanity_check_port_matches_predict_prob_to_1e_6() {
    let fx = common::fixture("profanity_check.json");
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 200);
    let scorer = ProfanityCheck::shared();
    let mut worst = 0f64;
    let mut bad = Vec::new();
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want = c["prob"].as_f64().unwrap();
        let got = scorer.score(&[text])[0];
        worst = worst.max((got - want).abs());
        if (got - want).abs() > 1e-6 {
            bad.push(format!("{text:?}: {got} vs {want}"));
        }
    }
    eprintln!(
        "max |rust - python| = {worst:e} over {} sentences",
        cases.len()
    );
    assert!(bad.is_empty(), "{} differ:\n{}", bad.len(), bad.join("\n"));
    let high = cases
        .iter()
        .filter(|c| c["prob"].as_f64().unwrap() >= 0.5)
        .count();
    assert!(
        high > 20 && high < cases.len() - 20,
        "fixture should cover both classes"
    );
}

/// The second judge (tox-block's BiLSTM) equals the package running on Keras/TensorFlow
/// (fixture written by scripts/export_toxblock_model.py: hand-written texts and 240 generated
/// continuations), on all six classes; the empty text it cannot score is scored as padding.
#[test]
fn tox_block_port_matches_the_keras_model_to_1e_5() {
    use detoxfuse::score::ToxBlock;
    let fx = common::fixture("tox_block.json");
    let rows = fx["rows"].as_array().unwrap();
    assert!(rows.len() >= 200);
    let judge = ToxBlock::shared();
    let mut worst = 0f64;
    let mut bad = Vec::new();
    for r in rows {
        let text = r["text"].as_str().unwrap();
        let got = judge.probabilities(text);
        for (c, want) in r["probabilities"].as_array().unwrap().iter().enumerate() {
            let d = (got[c] - want.as_f64().unwrap()).abs();
            worst = worst.max(d);
            if d > 1e-5 {
                bad.push(format!("{text:?} class {c}: {} vs {want}", got[c]));
            }
        }
    }
    eprintln!(
        "max |rust - keras| = {worst:e} over {} texts × 6 classes",
        rows.len()
    );
    assert!(bad.is_empty(), "{} differ:\n{}", bad.len(), bad.join("\n"));
    let toxic = |r: &serde_json::Value| r["probabilities"][0].as_f64().unwrap() >= 0.5;
    let high = rows.iter().filter(|r| toxic(r)).count();
    assert!(
        high > 20 && high < rows.len() - 20,
        "fixture should cover both classes"
    );
    // the trait's score is the `toxic` class; an empty text is all padding, like one of
    // unknown words only
    let s = judge.score(&["", "qqqzzzxx wwwvvvyy", "you stupid idiot"]);
    assert_eq!(s[0], s[1]);
    assert!(s[0] < 0.1 && s[2] > 0.5, "{s:?}");
}
