//! Batch generation, JSONL in and JSONL out (`detoxfuse generate --input/--output`): every
//! prompt line becomes one record with its `n` generations, written whole and flushed, so an
//! interrupted run leaves complete records only and a resumed one skips them.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::Path;

use crate::error::{Error, IoContext, Result};
use crate::eval::harness::parse_prompt_line;
use crate::generate::{generate, Decoder, GenerationConfig};
use crate::jsonl::complete_records;
use crate::text::{ChatMessage, Tokenizer};

/// One prompt of the input, with the line it came from (1-based) and its `"id"`.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptJob {
    pub line: usize,
    pub id: Option<serde_json::Value>,
    pub prompt: String,
}

/// Reads a JSONL prompt file ([`parse_prompt_line`]'s rules; blank lines skipped). A bad
/// line is an error with `fail_fast`, else its message is returned beside the good lines.
pub fn read_jobs(path: &Path, fail_fast: bool) -> Result<(Vec<PromptJob>, Vec<String>)> {
    let f = std::fs::File::open(path).ctx(|| format!("opening {}", path.display()))?;
    let (mut jobs, mut bad) = (Vec::new(), Vec::new());
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|_| {
            Error::Input(format!(
                "{}: line {} is not valid UTF-8 text",
                path.display(),
                i + 1
            ))
        })?;
        if line.trim().is_empty() {
            continue;
        }
        match parse_prompt_line(&line) {
            Ok((id, prompt)) => jobs.push(PromptJob {
                line: i + 1,
                id,
                prompt,
            }),
            Err(e) if fail_fast => {
                return Err(Error::Input(format!("{}:{}: {e}", path.display(), i + 1)))
            }
            Err(e) => bad.push(format!("{}:{}: {e}", path.display(), i + 1)),
        }
    }
    Ok((jobs, bad))
}

/// Line numbers already written to `out` (a torn last record is cut off first).
pub fn completed_lines(out: &Path) -> Result<HashSet<usize>> {
    Ok(complete_records(out)?
        .iter()
        .filter_map(|v| v["line"].as_u64().map(|n| n as usize))
        .collect())
}

/// How the records are made.
pub struct BatchOptions<'a> {
    /// Wrap each prompt as a user message in the model's chat template.
    pub chat: bool,
    /// A failed prompt ends the run (else it is reported and skipped).
    pub fail_fast: bool,
    /// Lines whose records are there already ([`completed_lines`]).
    pub done: &'a HashSet<usize>,
    /// Recorded in every record: the model file's name, and the fusion (or null).
    pub model: Option<String>,
    pub fusion: Option<serde_json::Value>,
}

/// What a batch run reports.
pub trait BatchObserver {
    /// `started` jobs (done ones included) have begun.
    fn progress(&mut self, _started: usize) {}
    /// The prompt on `line` failed and was skipped.
    fn skipped(&mut self, _line: usize, _error: &Error) {}
}

/// Generates every job not yet done into `sink`, one record a line. Returns the number of
/// failed prompts.
pub fn run(
    dec: &mut dyn Decoder,
    tok: &Tokenizer,
    jobs: &[PromptJob],
    cfg: &GenerationConfig,
    opts: &BatchOptions,
    sink: &mut dyn Write,
    obs: &mut dyn BatchObserver,
) -> Result<usize> {
    let mut failed = 0;
    for (k, job) in jobs.iter().enumerate() {
        obs.progress(k + 1);
        if opts.done.contains(&job.line) {
            continue;
        }
        let text = if opts.chat {
            tok.apply_chat(&[ChatMessage::user(&job.prompt)])?
        } else {
            job.prompt.clone()
        };
        let result = tok
            .encode(&text, opts.chat)
            .and_then(|ids| generate(dec, tok, &ids, cfg).map(|g| (ids.len(), g)));
        let record = match result {
            Ok((prompt_tokens, gens)) => serde_json::json!({
                "line": job.line, "id": job.id, "prompt": job.prompt, "prompt_tokens": prompt_tokens,
                "generations": gens, "model": opts.model,
                "sampling": cfg.sampling, "max_tokens": cfg.max_tokens, "fusion": opts.fusion,
            }),
            Err(e) if opts.fail_fast => {
                return Err(Error::Input(format!("prompt on line {}: {e}", job.line)))
            }
            Err(e) => {
                obs.skipped(job.line, &e);
                failed += 1;
                continue;
            }
        };
        // one whole line per write, flushed: an interrupted run leaves complete records only
        // (a torn last line is dropped by a resume)
        sink.write_all(format!("{record}\n").as_bytes())
            .and_then(|_| sink.flush())
            .ctx(|| "writing a record".to_string())?;
    }
    Ok(failed)
}
