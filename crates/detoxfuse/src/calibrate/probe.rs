//! Does training move probability away from toxic text? The probe scores continuations of
//! ToxiGen prompts from the groups held back from training ([`super::corpus::HELD_BACK_GROUPS`]):
//! the prompt is a ToxiGen-style list of five statements, the continuation the sixth. Hate
//! lists give toxic continuations; the same groups' neutral lists are the control, which
//! separates "less probability on toxic text" from "less probability on everything".

use std::path::Path;

use super::corpus::{read_lossy, sorted_files, HELD_BACK_GROUPS};
use super::data::{self, Record};
use super::model::{CalibrationModel, LossSum};
use super::train::make_batch;
use crate::error::{Error, Result};
use crate::text::Tokenizer;

/// Probe items (prompt, continuation) from the first `per_group` lines of each held-back
/// group's `{kind}_{group}_1k.txt`.
pub fn items(toxigen_dir: &Path, kind: &str, per_group: usize) -> Result<Vec<Record>> {
    list_pairs(
        toxigen_dir,
        kind,
        |g| HELD_BACK_GROUPS.contains(&g),
        per_group,
    )
}

/// ToxiGen lists as (prompt, continuation) pairs: from the first `per_group` lines of each
/// `{kind}_{group}_1k.txt` whose group `want` accepts, in group order, the prompt is the
/// line's statements but the last as a `- ` list and the continuation is the last one.
pub fn list_pairs(
    toxigen_dir: &Path,
    kind: &str,
    want: impl Fn(&str) -> bool,
    per_group: usize,
) -> Result<Vec<Record>> {
    let prefix = format!("{kind}_");
    let mut out = Vec::new();
    let files = sorted_files(toxigen_dir, |n| {
        n.starts_with(&prefix) && n.ends_with("_1k.txt")
    })?;
    for p in files {
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        let g = &name[prefix.len()..name.len() - "_1k.txt".len()];
        if !want(g) {
            continue;
        }
        for line in read_lossy(&p)?.lines().take(per_group) {
            let st: Vec<&str> = line
                .split("\\n")
                .map(|s| s.trim().trim_start_matches('-').trim())
                .filter(|s| !s.is_empty())
                .collect();
            if st.len() < 2 {
                continue;
            }
            let (last, ctx) = st.split_last().expect("two or more");
            let prompt: String = ctx.iter().map(|s| format!("- {s}\n")).collect::<String>() + "-";
            out.push(Record::Pair {
                prompt,
                completion: format!(" {last}"),
                source: format!("toxigen/{kind}_{g}"),
            });
        }
    }
    if out.is_empty() {
        return Err(Error::Input(format!(
            "no ToxiGen {kind} lists in {}",
            toxigen_dir.display()
        )));
    }
    Ok(out)
}

/// Mean negative log-likelihood per continuation token of `records` under `model`.
pub fn mean_nll(model: &CalibrationModel, tok: &Tokenizer, records: &[Record]) -> Result<LossSum> {
    let ex = data::tokenize(records, tok, 256)?;
    let pad = tok.eos.unwrap_or(0);
    let mut sum = LossSum::default();
    for b in data::ordered_batches(&ex, 4096) {
        sum.add(model.loss(&make_batch(&ex, &b, pad)?)?);
    }
    Ok(sum)
}
