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

/// One set's probe result (mean log-probability per token, nats).
#[derive(Debug, Clone)]
pub struct ProbeRow {
    /// "hate" or "neutral".
    pub kind: &'static str,
    pub items: usize,
    pub tokens: usize,
    /// Before training: the base's first layers (with the tuned-lens head when the model
    /// was trained from one).
    pub init: f64,
    pub trained: f64,
    /// The whole base model's, when asked for (NaN otherwise).
    pub full_base: f64,
}

impl ProbeRow {
    /// How far training lowered the set's log-probability (positive: less likely).
    pub fn change(&self) -> f64 {
        self.init - self.trained
    }
}

/// The probe of a trained calibration model directory against the model it started from.
pub struct ProbeReport {
    pub layers: usize,
    /// Whether the "before" model carries the run's tuned-lens head.
    pub lens: bool,
    pub rows: Vec<ProbeRow>,
}

/// The probe's table, as `detoxfuse probe` prints it.
impl std::fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "held-back ToxiGen groups: {HELD_BACK_GROUPS:?}; continuation = 6th statement after 5 as context"
        )?;
        let head = if self.lens {
            "its tuned-lens head"
        } else {
            "the base's tied head"
        };
        writeln!(
            f,
            "init = the base's first {} layers, its final norm and {head}, before training",
            self.layers
        )?;
        writeln!(
            f,
            "{:<8} {:>7} {:>8} {:>14} {:>15} {:>10} {:>16}",
            "set",
            "items",
            "tokens",
            "init logprob",
            "trained logprob",
            "change",
            "full base logprob"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<8} {:>7} {:>8} {:>14.4} {:>15.4} {:>+10.4} {:>16.4}",
                r.kind,
                r.items,
                r.tokens,
                r.init,
                r.trained,
                r.change(),
                r.full_base
            )?;
        }
        if let [toxic, neutral, ..] = &self.rows[..] {
            write!(
                f,
                "toxic minus neutral change: {:+.4} nats/token (negative: training moved probability away from toxic continuations more than from neutral ones)",
                toxic.change() - neutral.change()
            )?;
        }
        Ok(())
    }
}

/// Scores the held-back hate and neutral lists under the model in `trained_dir`, under its
/// initialisation from `base_path` and (with `full_base`) under the whole base.
pub fn compare(
    trained_dir: &Path,
    base_path: &Path,
    toxigen_dir: &Path,
    per_group: usize,
    full_base: bool,
) -> Result<ProbeReport> {
    use super::model::Trainable;
    use super::train::{Base, LENS_FILE};
    let (trained, tok) = CalibrationModel::load_dir(trained_dir)?;
    let layers = trained.config.num_hidden_layers;
    let base = Base::load(base_path, layers)?;
    let mut init = base.init(layers, Trainable::default())?;
    // A model trained from a tuned-lens head started with that head: rebuild it.
    let lens_path = trained_dir.join(LENS_FILE);
    let lens = lens_path.exists();
    if lens {
        init = super::lens::apply(init, &super::lens::read(&lens_path)?)?;
    }
    drop(base);
    let full = if full_base {
        Some(Base::load_full(base_path)?)
    } else {
        None
    };
    let mut rows = Vec::new();
    for kind in ["hate", "neutral"] {
        let items = items(toxigen_dir, kind, per_group)?;
        let before = mean_nll(&init, &tok, &items)?;
        let after = mean_nll(&trained, &tok, &items)?;
        let full_base = match &full {
            Some(m) => -mean_nll(m, &tok, &items)?.mean(),
            None => f64::NAN,
        };
        rows.push(ProbeRow {
            kind,
            items: items.len(),
            tokens: before.tokens,
            init: -before.mean(),
            trained: -after.mean(),
            full_base,
        });
    }
    Ok(ProbeReport { layers, lens, rows })
}
