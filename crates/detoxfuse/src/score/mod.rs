//! Toxicity scorers behind one trait.
//!
//! [`ProfanityCheck`] is an exact port of PyPI `alt-profanity-check==1.9.1`: TF-IDF over
//! 15,442 unigrams (lowercased text, tokens = runs of ≥ 2 word characters), L2-normalised,
//! then five sigmoid-calibrated linear SVMs whose probabilities are averaged. It is lexical:
//! it catches explicit toxicity, not implicit hate. Its weights ship in
//! `assets/profanity_check_1.9.1.json`, exported by `scripts/export_profanity_model.py`.

use std::collections::HashMap;
use std::sync::OnceLock;

use crate::error::{Error, Result};

pub mod toxblock;
pub use toxblock::ToxBlock;

/// Scores texts: probability in [0, 1] that each is toxic.
pub trait ToxicityScorer: Send + Sync {
    fn name(&self) -> &str;
    fn score(&self, texts: &[&str]) -> Vec<f64>;
}

#[derive(serde::Deserialize)]
struct Fold {
    coef: Vec<f64>,
    intercept: f64,
    a: f64,
    b: f64,
}

#[derive(serde::Deserialize)]
struct Exported {
    vocabulary: Vec<String>,
    idf: Vec<f64>,
    folds: Vec<Fold>,
}

pub struct ProfanityCheck {
    index: HashMap<String, usize>,
    idf: Vec<f64>,
    folds: Vec<Fold>,
}

const MODEL_JSON: &str = include_str!("../../../../assets/profanity_check_1.9.1.json");

impl ProfanityCheck {
    /// The shipped model (parsed once per process).
    pub fn shared() -> &'static ProfanityCheck {
        static MODEL: OnceLock<ProfanityCheck> = OnceLock::new();
        MODEL.get_or_init(|| Self::from_json(MODEL_JSON).expect("the shipped scorer model parses"))
    }

    pub fn from_json(json: &str) -> Result<Self> {
        let e: Exported = serde_json::from_str(json)?;
        let n = e.vocabulary.len();
        if e.idf.len() != n || e.folds.iter().any(|f| f.coef.len() != n) {
            return Err(Error::Input(format!(
                "scorer model: {n} terms but idf/coef lengths differ"
            )));
        }
        let index = e
            .vocabulary
            .into_iter()
            .enumerate()
            .map(|(i, w)| (w, i))
            .collect();
        Ok(Self {
            index,
            idf: e.idf,
            folds: e.folds,
        })
    }

    /// Probability that `text` is offensive, as the package's `predict_prob`.
    pub fn prob(&self, text: &str) -> f64 {
        // term counts -> tf·idf -> L2 norm (a sparse vector)
        let mut counts: HashMap<usize, f64> = HashMap::new();
        for tok in tokens(&text.to_lowercase()) {
            if let Some(&i) = self.index.get(tok) {
                *counts.entry(i).or_insert(0.0) += 1.0;
            }
        }
        let mut x: Vec<(usize, f64)> = counts
            .into_iter()
            .map(|(i, c)| (i, c * self.idf[i]))
            .collect();
        x.sort_by_key(|&(i, _)| i); // fixed summation order
        let norm = x.iter().map(|(_, v)| v * v).sum::<f64>().sqrt();
        if norm > 0.0 {
            for (_, v) in x.iter_mut() {
                *v /= norm;
            }
        }
        let total: f64 = self
            .folds
            .iter()
            .map(|f| {
                let df = x.iter().map(|&(i, v)| v * f.coef[i]).sum::<f64>() + f.intercept;
                1.0 / (1.0 + (f.a * df + f.b).exp())
            })
            .sum();
        total / self.folds.len() as f64
    }
}

impl ToxicityScorer for ProfanityCheck {
    fn name(&self) -> &str {
        "alt-profanity-check-1.9.1"
    }

    fn score(&self, texts: &[&str]) -> Vec<f64> {
        texts.iter().map(|t| self.prob(t)).collect()
    }
}

/// Python's `re` `\w` on str: `_` or `str.isalnum()`, i.e. a letter (L*) or a number (N*).
/// (Rust's `char::is_alphanumeric` also admits combining marks that are Other_Alphabetic.)
fn is_word(c: char) -> bool {
    use unicode_general_category::{get_general_category, GeneralCategory as G};
    c == '_'
        || matches!(
            get_general_category(c),
            G::UppercaseLetter
                | G::LowercaseLetter
                | G::TitlecaseLetter
                | G::ModifierLetter
                | G::OtherLetter
                | G::DecimalNumber
                | G::LetterNumber
                | G::OtherNumber
        )
}

/// sklearn's `(?u)\b\w\w+\b`: maximal runs of word characters, at least two long.
fn tokens(text: &str) -> impl Iterator<Item = &str> {
    let mut out = Vec::new();
    let mut start: Option<(usize, usize)> = None; // (byte offset, chars so far)
    for (i, c) in text.char_indices() {
        match (is_word(c), start) {
            (true, None) => start = Some((i, 1)),
            (true, Some((s, n))) => start = Some((s, n + 1)),
            (false, Some((s, n))) => {
                if n >= 2 {
                    out.push(&text[s..i]);
                }
                start = None;
            }
            (false, None) => {}
        }
    }
    if let Some((s, n)) = start {
        if n >= 2 {
            out.push(&text[s..]);
        }
    }
    out.into_iter()
}

/// The texts of one line of a JSONL file to score: each generation's `text` of a
/// `detoxfuse generate` record (`{"generations": [{"text": ...}, ...]}`) or each sample's of a
/// `detoxfuse eval` generations record (`{"samples": [{"text": ...}, ...]}`), else the string
/// at `field`. An error says what the line lacks.
pub fn line_texts(line: &str, field: &str) -> std::result::Result<Vec<String>, String> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    if let Some(gens) = v["generations"].as_array().or(v["samples"].as_array()) {
        return Ok(gens
            .iter()
            .filter_map(|g| g["text"].as_str().map(String::from))
            .collect());
    }
    match v[field].as_str() {
        Some(t) => Ok(vec![t.to_string()]),
        None => Err(format!("no {field:?} string")),
    }
}

/// Scores each non-blank line of the JSONL file at `path` ([`line_texts`]), handing
/// `(line number, scores)` to `scored` as it goes. A bad line is skipped; the messages of
/// the skipped lines are returned.
pub fn score_jsonl(
    path: &std::path::Path,
    field: &str,
    scorer: &dyn ToxicityScorer,
    scored: &mut dyn FnMut(usize, Vec<f64>),
) -> Result<Vec<String>> {
    use std::io::BufRead;
    let f = std::fs::File::open(path)
        .map_err(|e| Error::Input(format!("opening {}: {e}", path.display())))?;
    let mut bad = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let at = || format!("{}:{}", path.display(), i + 1);
        let line = line.map_err(|e| Error::Input(format!("{}: {e}", at())))?;
        if line.trim().is_empty() {
            continue;
        }
        match line_texts(&line, field) {
            Ok(texts) => {
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                scored(i + 1, scorer.score(&refs));
            }
            Err(e) => bad.push(format!("{}: {e}", at())),
        }
    }
    Ok(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_lines_give_their_texts_or_say_what_they_lack() {
        let gen = r#"{"line": 1, "generations": [{"text": "a"}, {"text": "b"}]}"#;
        assert_eq!(line_texts(gen, "text").unwrap(), ["a", "b"]);
        let eval = r#"{"line": 4, "prompt": "p", "samples": [{"text": "c", "tokens": 1, "toxicity": 0.1}]}"#;
        assert_eq!(line_texts(eval, "text").unwrap(), ["c"]);
        assert_eq!(line_texts(r#"{"body": "x"}"#, "body").unwrap(), ["x"]);
        assert!(line_texts(r#"{"text": 3}"#, "text")
            .unwrap_err()
            .contains("no \"text\" string"));
        assert!(line_texts("{", "text")
            .unwrap_err()
            .starts_with("invalid JSON"));
    }

    #[test]
    fn tokens_follow_sklearn_pattern() {
        let t: Vec<_> = tokens("it's a foo_bar, x² 12 ½ naïve").collect();
        assert_eq!(t, vec!["it", "foo_bar", "x²", "12", "naïve"]);
    }
}
