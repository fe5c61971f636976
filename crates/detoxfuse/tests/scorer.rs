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
