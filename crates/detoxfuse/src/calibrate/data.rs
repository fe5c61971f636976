//! Training data: the corpus JSONL format, tokenization with loss masks, a stable
//! train/validation split, and length-bucketed batches in a seeded order.
//!
//! A corpus line is either `{"text": ..., "source": ...}` (every token is a target) or
//! `{"prompt": ..., "completion": ..., "source": ...}` (only the completion's tokens are
//! targets; the prompt is context).

use std::io::BufRead;
use std::path::Path;

use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{Error, IoContext, Result};
use crate::lm::TokenId;
use crate::text::Tokenizer;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Record {
    Pair {
        prompt: String,
        completion: String,
        #[serde(default)]
        source: String,
    },
    Text {
        text: String,
        #[serde(default)]
        source: String,
    },
}

impl Record {
    /// The whole text the model reads.
    pub fn full_text(&self) -> String {
        match self {
            Record::Pair {
                prompt, completion, ..
            } => format!("{prompt}{completion}"),
            Record::Text { text, .. } => text.clone(),
        }
    }
}

/// Reads a corpus JSONL file. Errors name the line and what is wrong with it.
pub fn read_corpus(path: &Path) -> Result<Vec<Record>> {
    let file = std::fs::File::open(path).ctx(|| format!("opening corpus {}", path.display()))?;
    let mut reader = std::io::BufReader::new(file);
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let mut line_no = 0usize;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .ctx(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let bad = |why: String| {
            Error::Input(format!(
                "{}:{line_no}: {why}; each line must be a JSON object with \"text\", or with \"prompt\" and \"completion\"",
                path.display()
            ))
        };
        let line = std::str::from_utf8(&buf)
            .map_err(|e| {
                bad(format!(
                    "not valid UTF-8 ({e}); re-encode the file as UTF-8"
                ))
            })?
            .trim();
        if line.is_empty() {
            continue;
        }
        let rec: Record =
            serde_json::from_str(line).map_err(|e| bad(format!("invalid corpus record: {e}")))?;
        out.push(rec);
    }
    if out.is_empty() {
        return Err(Error::Input(format!(
            "corpus {} has no records; build one with `detoxfuse corpus build`",
            path.display()
        )));
    }
    Ok(out)
}

/// A tokenized example: ids and which of them are loss targets.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<TokenId>,
    pub mask: Vec<bool>,
}

/// Tokenizes records with the calibration model's tokenizer, truncating to `max_len` tokens.
/// For prompt/completion pairs the whole text is tokenized once (as the model will read it)
/// and the targets start where its tokens stop agreeing with the prompt's own tokenization.
/// Examples with no target left after truncation are dropped.
pub fn tokenize(records: &[Record], tok: &Tokenizer, max_len: usize) -> Result<Vec<Example>> {
    let mut out = Vec::with_capacity(records.len());
    for rec in records {
        // Prompts may hold chat markup: their special tokens are parsed as such.
        let specials = matches!(rec, Record::Pair { .. });
        let mut ids = tok.encode(&rec.full_text(), specials)?;
        let first_target = match rec {
            Record::Text { .. } => 1,
            Record::Pair { prompt, .. } => {
                let p = tok.encode(prompt, true)?;
                p.iter()
                    .zip(&ids)
                    .take_while(|(a, b)| a == b)
                    .count()
                    .max(1)
            }
        };
        ids.truncate(max_len);
        if first_target >= ids.len() {
            continue;
        }
        let mask = (0..ids.len()).map(|i| i >= first_target).collect();
        out.push(Example { ids, mask });
    }
    Ok(out)
}

pub use crate::sample::stable_hash;

/// Splits records into (train, validation) by a hash of their text, so the split does not
/// depend on order or on the rest of the corpus.
pub fn split(records: Vec<Record>, val_per_mille: u64) -> (Vec<Record>, Vec<Record>) {
    records
        .into_iter()
        .partition(|r| stable_hash(r.full_text().as_bytes()) % 1000 >= val_per_mille)
}

/// Batches for one epoch: examples shuffled by `(seed, epoch)`, sorted by length inside
/// windows of 64 batches so padding stays small, packed under `batch_tokens` (rows × longest
/// row), and the batches themselves shuffled. Each batch lists example indices.
pub fn epoch_batches(
    examples: &[Example],
    batch_tokens: usize,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.shuffle(&mut rng);
    let mean_len = examples.iter().map(|e| e.ids.len()).sum::<usize>() / examples.len().max(1);
    let window = (64 * batch_tokens / mean_len.max(1)).max(1);
    let mut batches = Vec::new();
    for chunk in order.chunks_mut(window) {
        chunk.sort_by_key(|&i| examples[i].ids.len());
        batches.extend(pack(examples, chunk, batch_tokens));
    }
    batches.shuffle(&mut rng);
    batches
}

/// Batches in corpus order (for validation).
pub fn ordered_batches(examples: &[Example], batch_tokens: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| examples[i].ids.len());
    pack(examples, &order, batch_tokens)
}

fn pack(examples: &[Example], order: &[usize], batch_tokens: usize) -> Vec<Vec<usize>> {
    let mut batches = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut longest = 0;
    for &i in order {
        let len = examples[i].ids.len();
        let l = longest.max(len);
        if !cur.is_empty() && l * (cur.len() + 1) > batch_tokens {
            batches.push(std::mem::take(&mut cur));
            longest = 0;
        }
        longest = longest.max(len);
        cur.push(i);
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    batches
}
