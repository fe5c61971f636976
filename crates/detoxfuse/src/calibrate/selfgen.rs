//! Self-generated training data for the fusion-aware recipe: the target's own continuations
//! of toxic-leaning and neutral prompts, scored by the toxicity scorer.
//!
//! Prompts are sentence halves, the shape of RealToxicityPrompts prompts, cut from data that
//! is not an evaluation set: every turn of the HH-RLHF harmlessness pairs (split into
//! sentences; a sentence the scorer rejects gives a toxic-leaning prompt, one it clearly
//! passes a neutral prompt) and the ToxiGen statements of the groups that are not held back
//! (hate statements: toxic-leaning, implicit; neutral statements: neutral). The leakage guard
//! drops any prompt that matches an evaluation prompt.
//!
//! Each prompt is continued `samples` times by the target (nucleus sampling, as the
//! evaluation does) and every continuation is scored. The output is one JSONL record per
//! prompt, written as it goes and resumable: an interrupted run keeps its complete records.

use std::collections::BTreeSet;
use std::io::{BufRead, Read};
use std::path::Path;

use super::corpus::{self, HELD_BACK_GROUPS};
use super::data::stable_hash;
use super::guard::LeakageGuard;
use crate::error::{Error, IoContext, Result};
use crate::lm::{CausalLm, TokenId};
use crate::score::ToxicityScorer;
use crate::text::Tokenizer;

/// Whether a prompt leans toxic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lean {
    Toxic,
    Neutral,
}

/// A training prompt and where it was cut from.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Prompt {
    pub text: String,
    pub lean: Lean,
    pub source: String,
}

/// How prompts are chosen and continued.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct SelfGenConfig {
    /// At most this many toxic-leaning prompts.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = SelfGenConfig::default().toxic_prompts))]
    pub toxic_prompts: usize,
    /// At most this many neutral prompts.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = SelfGenConfig::default().neutral_prompts))]
    pub neutral_prompts: usize,
    /// Continuations per prompt.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = SelfGenConfig::default().samples))]
    pub samples: usize,
    /// Most tokens of each continuation.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = SelfGenConfig::default().max_tokens))]
    pub max_tokens: usize,
    /// Nucleus sampling of the continuations.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = SelfGenConfig::default().top_p))]
    pub top_p: f32,
    /// A sentence at or above this score gives a toxic-leaning prompt.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = SelfGenConfig::default().toxic_threshold))]
    pub toxic_threshold: f64,
    /// A sentence below this score gives a neutral prompt.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = SelfGenConfig::default().neutral_threshold))]
    pub neutral_threshold: f64,
    /// Seed of the prompt choice and the sampling.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = SelfGenConfig::default().seed))]
    pub seed: u64,
}

impl Default for SelfGenConfig {
    fn default() -> Self {
        Self {
            toxic_prompts: 1200,
            neutral_prompts: 400,
            samples: 8,
            max_tokens: 20,
            top_p: 0.9,
            toxic_threshold: 0.5,
            neutral_threshold: 0.1,
            seed: 0,
        }
    }
}

/// The turns (human and assistant) of an HH-RLHF dialogue `\n\nHuman: ...\n\nAssistant: ...`.
pub fn hh_turns(dialogue: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for part in dialogue.split("\n\nHuman:") {
        for turn in part.split("\n\nAssistant:") {
            let t = turn.trim();
            if !t.is_empty() {
                out.push(t);
            }
        }
    }
    out
}

/// The first half of a sentence's words (at least 3, and at least 2 left to continue), or
/// `None` for sentences too short or too long to make a prompt.
pub fn sentence_half(sentence: &str) -> Option<String> {
    let words: Vec<&str> = sentence.split_whitespace().collect();
    if !(6..=60).contains(&words.len()) {
        return None;
    }
    let k = words.len().div_ceil(2).max(3);
    Some(words[..k].join(" "))
}

/// A toxic-leaning prompt from a sentence the scorer rejects: the shortest word prefix (at
/// least 3 words, at least 2 left to continue) that the scorer already rejects, so the
/// prompt ends in a toxic context the way RealToxicityPrompts' challenging prompts do; the
/// sentence's first half when no prefix is rejected on its own.
pub fn toxic_prefix(sentence: &str, scorer: &dyn ToxicityScorer, threshold: f64) -> Option<String> {
    let words: Vec<&str> = sentence.split_whitespace().collect();
    if !(6..=60).contains(&words.len()) {
        return None;
    }
    let prefixes: Vec<String> = (3..=words.len() - 2)
        .map(|k| words[..k].join(" "))
        .collect();
    let scores = scorer.score(&prefixes.iter().map(String::as_str).collect::<Vec<_>>());
    match prefixes.iter().zip(scores).find(|(_, s)| *s >= threshold) {
        Some((p, _)) => Some(p.clone()),
        None => sentence_half(sentence),
    }
}

/// Reads the HH-RLHF pairs file (`.jsonl.gz` or `.jsonl`): every dialogue of both sides.
pub fn read_hh_dialogues(path: &Path) -> Result<Vec<String>> {
    let raw = std::fs::read(path).ctx(|| format!("reading {}", path.display()))?;
    let mut text = String::new();
    if path.extension().is_some_and(|e| e == "gz") {
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_string(&mut text)
            .map_err(|e| {
                Error::Input(format!(
                    "{} is not a readable gzip file of UTF-8 text ({e}); restore it",
                    path.display()
                ))
            })?;
    } else {
        text = String::from_utf8(raw)
            .map_err(|e| Error::Input(format!("{} is not UTF-8 text: {e}", path.display())))?;
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            Error::Input(format!("{}:{}: invalid JSON: {e}", path.display(), i + 1))
        })?;
        for side in ["chosen", "rejected"] {
            if let Some(d) = v[side].as_str() {
                out.push(d.to_string());
            }
        }
    }
    Ok(out)
}

/// What building the prompts found, for the manifest.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PromptStats {
    pub hh_sentences: usize,
    pub toxigen_statements: usize,
    pub toxic_candidates: usize,
    pub neutral_candidates: usize,
    pub dropped_by_guard: usize,
}

/// The prompts: toxic-leaning and neutral candidates from HH-RLHF and ToxiGen, guarded,
/// deduplicated, then the first `toxic_prompts` / `neutral_prompts` in a seeded order.
pub fn build_prompts(
    hh: &Path,
    toxigen_dir: &Path,
    guard: &LeakageGuard,
    scorer: &dyn ToxicityScorer,
    cfg: &SelfGenConfig,
) -> Result<(Vec<Prompt>, PromptStats)> {
    let mut stats = PromptStats::default();
    let mut seen = BTreeSet::new();
    let (mut toxic, mut neutral) = (Vec::new(), Vec::new());
    let mut add = |text: String, lean: Lean, source: String, stats: &mut PromptStats| {
        if !seen.insert(text.clone()) {
            return;
        }
        match lean {
            Lean::Toxic => stats.toxic_candidates += 1,
            Lean::Neutral => stats.neutral_candidates += 1,
        }
        let p = Prompt { text, lean, source };
        match lean {
            Lean::Toxic => toxic.push(p),
            Lean::Neutral => neutral.push(p),
        }
    };
    let mut sentences = BTreeSet::new();
    for d in read_hh_dialogues(hh)? {
        for turn in hh_turns(&d) {
            sentences.extend(corpus::sentences(turn));
        }
    }
    stats.hh_sentences = sentences.len();
    let list: Vec<String> = sentences.into_iter().collect();
    let scores = scorer.score(&list.iter().map(String::as_str).collect::<Vec<_>>());
    for (s, score) in list.iter().zip(scores) {
        let lean = if score >= cfg.toxic_threshold {
            Lean::Toxic
        } else if score < cfg.neutral_threshold {
            Lean::Neutral
        } else {
            continue;
        };
        let cut = match lean {
            Lean::Toxic => toxic_prefix(s, scorer, cfg.toxic_threshold),
            Lean::Neutral => sentence_half(s),
        };
        let Some(half) = cut else { continue };
        if guard.leaked(s).is_some() || guard.leaked(&half).is_some() {
            stats.dropped_by_guard += 1;
            continue;
        }
        add(half, lean, "hh-rlhf/harmless-base-test".into(), &mut stats);
    }
    for (kind, lean) in [("hate", Lean::Toxic), ("neutral", Lean::Neutral)] {
        let groups =
            corpus::toxigen_statements(toxigen_dir, kind, |g| !HELD_BACK_GROUPS.contains(&g))?;
        for (group, statements) in groups {
            for st in statements {
                stats.toxigen_statements += 1;
                let Some(half) = sentence_half(&st) else {
                    continue;
                };
                if guard.leaked(&st).is_some() || guard.leaked(&half).is_some() {
                    stats.dropped_by_guard += 1;
                    continue;
                }
                add(half, lean, format!("toxigen/{kind}_{group}"), &mut stats);
            }
        }
    }
    let order = |v: &mut Vec<Prompt>, n: usize| {
        v.sort_by_key(|p| stable_hash(format!("{}:{}", cfg.seed, p.text).as_bytes()));
        v.truncate(n);
    };
    order(&mut toxic, cfg.toxic_prompts);
    order(&mut neutral, cfg.neutral_prompts);
    toxic.extend(neutral);
    Ok((toxic, stats))
}

/// One continuation of a prompt by the target.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Sample {
    pub ids: Vec<TokenId>,
    pub text: String,
    pub toxicity: f64,
}

/// A prompt with its tokens and the target's continuations.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SampledPrompt {
    pub prompt: Prompt,
    pub prompt_ids: Vec<TokenId>,
    pub samples: Vec<Sample>,
}

/// Reads the complete records of a samples file (a torn last line, from an interrupted run,
/// is dropped).
pub fn read_samples(path: &Path) -> Result<Vec<SampledPrompt>> {
    let f = std::fs::File::open(path).ctx(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.ctx(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(&line) {
            Ok(r) => out.push(r),
            // A torn final record is what an interrupted run leaves; anything else is damage.
            Err(_) if line.ends_with('}') => {
                return Err(Error::Input(format!(
                    "{}:{}: not a samples record; delete the file to regenerate it",
                    path.display(),
                    i + 1
                )))
            }
            Err(_) => break,
        }
    }
    Ok(out)
}

/// Continues every prompt `cfg.samples` times with `target`, appending records to `out`
/// (resuming after the records it already holds, which must be the same prompts in the same
/// order). `progress(done, total)` after each prompt.
pub fn sample_prompts(
    target: &dyn CausalLm,
    tok: &Tokenizer,
    prompts: &[Prompt],
    scorer: &dyn ToxicityScorer,
    cfg: &SelfGenConfig,
    out: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<SampledPrompt>> {
    use crate::generate::{generate, GenerationConfig, PlainDecoder};
    use crate::sample::SamplingParams;

    let mut done = if out.exists() {
        read_samples(out)?
    } else {
        Vec::new()
    };
    for (i, (have, want)) in done.iter().zip(prompts).enumerate() {
        if have.prompt != *want {
            return Err(Error::Input(format!(
                "{} record {} is for another prompt ({:?}, expected {:?}): the prompt set changed; delete the file to regenerate it",
                out.display(),
                i + 1,
                have.prompt.text,
                want.text
            )));
        }
    }
    if done.len() > prompts.len() {
        return Err(Error::Input(format!(
            "{} holds {} records but there are {} prompts; delete the file to regenerate it",
            out.display(),
            done.len(),
            prompts.len()
        )));
    }
    // Rewrite the complete records (drops a torn tail), then append.
    let mut text = String::new();
    for r in &done {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    crate::atomic::write(out, text.as_bytes())?;
    let mut sink = crate::jsonl::Appender::open(out, false)?;
    let mut dec = PlainDecoder::new(target);
    for p in &prompts[done.len()..] {
        let ids = tok.encode(&p.text, false)?;
        let gen_cfg = GenerationConfig {
            max_tokens: cfg.max_tokens,
            n: cfg.samples,
            sampling: SamplingParams {
                temperature: 1.0,
                top_k: 0,
                top_p: cfg.top_p,
                seed: cfg.seed ^ stable_hash(p.text.as_bytes()),
            },
            ..GenerationConfig::default()
        };
        let gens = generate(&mut dec, tok, &ids, &gen_cfg)?;
        let texts: Vec<&str> = gens.iter().map(|g| g.text.as_str()).collect();
        let scores = scorer.score(&texts);
        let rec = SampledPrompt {
            prompt: p.clone(),
            prompt_ids: ids,
            samples: gens
                .iter()
                .zip(scores)
                .map(|(g, s)| Sample {
                    ids: g.token_ids.clone(),
                    text: g.text.clone(),
                    toxicity: s,
                })
                .collect(),
        };
        sink.append(&rec)?;
        done.push(rec);
        progress(done.len(), prompts.len());
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hh_dialogues_split_into_turns() {
        let d =
            "\n\nHuman: what is up?\n\nAssistant: Not much.\n\nHuman: ok\n\nAssistant: Bye now.";
        assert_eq!(
            hh_turns(d),
            vec!["what is up?", "Not much.", "ok", "Bye now."]
        );
    }

    #[test]
    fn a_prompt_is_the_first_half_of_a_sentence() {
        assert_eq!(
            sentence_half("one two three four five six seven").as_deref(),
            Some("one two three four")
        );
        assert_eq!(sentence_half("too short to use"), None);
    }
}
