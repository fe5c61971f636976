//! The leakage guard: training never reads an evaluation prompt.
//!
//! Both RealToxicityPrompts files (`rtp/*.jsonl`: the challenging set and the non-toxic set)
//! are evaluation data. The guard holds every prompt text of those files, normalised
//! (lowercase, whitespace collapsed, surrounding quotes and spaces trimmed), and answers
//! whether a training text *is* one of them, contains one, or is contained in one (for
//! texts long enough that containment is not a coincidence). Training data builders drop
//! what it flags; trainers refuse data that still holds a flagged prompt.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Shorter normalised texts are only matched exactly (containment of a few common words
/// would flag ordinary text).
const MIN_CONTAINMENT_CHARS: usize = 24;

/// Normalised RealToxicityPrompts prompt texts.
pub struct LeakageGuard {
    exact: HashSet<String>,
    /// Long prompts, for containment checks.
    long: Vec<String>,
    /// The files the prompts came from.
    pub files: Vec<PathBuf>,
}

/// Lowercase, whitespace runs to one space, trimmed of spaces and quote marks.
pub fn normalise(text: &str) -> String {
    let joined = text.split_whitespace().collect::<Vec<_>>().join(" ");
    joined
        .trim_matches(|c: char| c.is_whitespace() || "\"'“”‘’".contains(c))
        .to_lowercase()
}

impl LeakageGuard {
    /// Every `prompt.text` of every `*.jsonl` file in `rtp_dir`. A missing or empty directory
    /// is an error: a guard that guards nothing must not pass silently.
    pub fn from_rtp_dir(rtp_dir: &Path) -> Result<Self> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(rtp_dir)
            .map_err(|e| {
                Error::Input(format!(
                    "the leakage guard needs the RealToxicityPrompts evaluation files in {} ({e}); pass --data pointing at the data directory",
                    rtp_dir.display()
                ))
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .collect();
        files.sort();
        let mut texts = Vec::new();
        for f in &files {
            let body = std::fs::read_to_string(f).ctx(|| format!("reading {}", f.display()))?;
            for (i, line) in body.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                    Error::Input(format!("{}:{}: invalid JSON: {e}", f.display(), i + 1))
                })?;
                let p = &v["prompt"];
                if let Some(t) = p.as_str().or_else(|| p["text"].as_str()) {
                    texts.push(t.to_string());
                }
            }
        }
        if texts.is_empty() {
            return Err(Error::Input(format!(
                "no RealToxicityPrompts prompt in {}: the leakage guard has nothing to guard against",
                rtp_dir.display()
            )));
        }
        let mut guard = Self::from_texts(texts.iter().map(String::as_str));
        guard.files = files;
        Ok(guard)
    }

    /// A guard over the given evaluation prompts.
    pub fn from_texts<'a>(texts: impl IntoIterator<Item = &'a str>) -> Self {
        let exact: HashSet<String> = texts
            .into_iter()
            .map(normalise)
            .filter(|t| !t.is_empty())
            .collect();
        let long = exact
            .iter()
            .filter(|t| t.chars().count() >= MIN_CONTAINMENT_CHARS)
            .cloned()
            .collect();
        Self {
            exact,
            long,
            files: Vec::new(),
        }
    }

    /// Number of distinct evaluation prompts held.
    pub fn len(&self) -> usize {
        self.exact.len()
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty()
    }

    /// The evaluation prompt `text` leaks, if any: equal to it, containing it, or (when
    /// `text` is long enough) contained in it.
    pub fn leaked(&self, text: &str) -> Option<&str> {
        let t = normalise(text);
        if let Some(hit) = self.exact.get(&t) {
            return Some(hit);
        }
        let t_long = t.chars().count() >= MIN_CONTAINMENT_CHARS;
        self.long
            .iter()
            .find(|p| t.contains(p.as_str()) || (t_long && p.contains(t.as_str())))
            .map(String::as_str)
    }

    /// An error naming the first of `texts` that leaks an evaluation prompt.
    pub fn refuse<'a>(&self, what: &str, texts: impl IntoIterator<Item = &'a str>) -> Result<()> {
        for t in texts {
            if let Some(hit) = self.leaked(t) {
                return Err(Error::Input(format!(
                    "{what} holds the training prompt {t:?}, which matches the RealToxicityPrompts evaluation prompt {hit:?}: training on evaluation prompts is refused; remove it from the data"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_containing_and_contained_texts_are_flagged_and_others_pass() {
        let g =
            LeakageGuard::from_texts(["“It’s because of you little motherfuckers", "Hello there"]);
        assert!(g
            .leaked("it’s because of you   little MOTHERFUCKERS")
            .is_some());
        assert!(g
            .leaked("and he said it's because of you little motherfuckers that we lost")
            .is_none()); // different apostrophe: not the same text
        assert!(g
            .leaked("and he said “It’s because of you little motherfuckers, that we lost")
            .is_some());
        assert!(g.leaked("It’s because of you little mother").is_some());
        // short prompts only match exactly
        assert!(g.leaked("hello there").is_some());
        assert!(g.leaked("well hello there, friend").is_none());
        assert!(g
            .leaked("an unrelated sentence about the weather")
            .is_none());
    }
}
