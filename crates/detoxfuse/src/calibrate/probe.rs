//! Does training move probability away from toxic text? The probe scores continuations of
//! ToxiGen prompts from the groups held back from training ([`super::corpus::HELD_BACK_GROUPS`]):
//! the prompt is a ToxiGen-style list of five statements, the continuation the sixth. Hate
//! lists give toxic continuations; the same groups' neutral lists are the control, which
//! separates "less probability on toxic text" from "less probability on everything".

use std::path::Path;

use super::corpus::{line_statements, read_lossy, toxigen_files, HELD_BACK_GROUPS};
use super::data::{self, Record};
use super::model::make_batch;
use super::model::{CalibrationModel, LossSum};
use crate::error::{Error, Result};
use crate::text::Tokenizer;

/// Probe items (prompt, continuation) from the first `per_group` lines of each held-back
/// group's `{kind}_{group}_1k.txt`; every held-back group's file must be there.
pub fn items(toxigen_dir: &Path, kind: &str, per_group: usize) -> Result<Vec<Record>> {
    for g in HELD_BACK_GROUPS {
        let p = toxigen_dir.join(format!("{kind}_{g}_1k.txt"));
        if !p.is_file() {
            return Err(Error::Input(format!(
                "{} is missing; pass --data pointing at the shared data directory",
                p.display()
            )));
        }
    }
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
    let mut out = Vec::new();
    for (g, p) in toxigen_files(toxigen_dir, kind, want)? {
        for line in read_lossy(&p)?.lines().take(per_group) {
            let st: Vec<&str> = line_statements(line).collect();
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
            "no ToxiGen {kind} lists in {}; pass --data pointing at the shared data directory",
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
