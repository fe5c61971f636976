//! `detoxfuse generate`: one prompt, or a JSONL file of prompts, to JSONL continuations.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use detoxfuse::align::Variant;
use detoxfuse::batch::{self, BatchObserver, BatchOptions, PromptJob};
use detoxfuse::generate::{Decoder, GenerationOptions, PlainDecoder};
use detoxfuse::text::Tokenizer;
use indicatif::ProgressBar;

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: crate::ModelArg,
    /// The prompt text (or use --input).
    #[arg(long, short, conflicts_with = "input")]
    prompt: Option<String>,
    /// JSONL file, one object per line with "prompt": "text" (or {"text": ...}, RealToxicityPrompts style).
    #[arg(long, short)]
    input: Option<PathBuf>,
    /// Where to write JSONL results (default: stdout).
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Continue an interrupted run: keep the records already in --output and skip their prompts.
    #[arg(long, requires = "output")]
    resume: bool,
    /// Wrap each prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[command(flatten)]
    gen: GenerationOptions,
    /// Exact f32 weights instead of the fast quantized kernels (slower; for checks).
    #[arg(long)]
    f32: bool,
    /// Stop at the first invalid input line instead of reporting it and going on.
    #[arg(long)]
    fail_fast: bool,
    /// Detoxify: fuse this calibration: "default" (the shipped fusion-aware calibration, no training), "fused" (the one
    /// `calibrate --recipe fused` trains here, on first use), "paper" (the paper recipe's model,
    /// trained on first use), or a directory.
    #[arg(long)]
    calibration: Option<String>,
    /// Alignment from `detoxfuse align` (default: the one beside the calibration model for
    /// this target and --align-variant, learned on first use).
    #[arg(long, requires = "calibration")]
    alignment: Option<PathBuf>,
    /// Fusion strength in [0, 1]: 0 is the untouched target.
    #[arg(long, default_value_t = 0.2, requires = "calibration")]
    alpha: f64,
    /// Which alignment to use or learn when --alignment is not given.
    #[arg(long, value_enum, default_value_t = Variant::Hidden, requires = "calibration")]
    align_variant: Variant,
}

/// The batch's progress on a bar; skipped prompts as lines above it.
struct Bar<'a>(&'a ProgressBar);

impl BatchObserver for Bar<'_> {
    fn progress(&mut self, started: usize) {
        self.0.set_position(started as u64)
    }
    fn skipped(&mut self, line: usize, e: &detoxfuse::Error) {
        self.0
            .suspend(|| eprintln!("line {line}: {e}; prompt skipped"))
    }
}

pub fn run(cache: &Path, a: GenerateArgs) -> Result<()> {
    let (jobs, bad) = match (&a.prompt, &a.input) {
        (Some(p), None) => (
            vec![PromptJob {
                line: 1,
                id: None,
                prompt: p.clone(),
            }],
            Vec::new(),
        ),
        (None, Some(path)) => batch::read_jobs(path, a.fail_fast)?,
        _ => bail!("give a prompt with --prompt TEXT or a JSONL file with --input FILE"),
    };
    for b in &bad {
        eprintln!("{b}; line skipped");
    }

    let path = a.model.resolve(cache)?;
    let model = detoxfuse::lm::load_with(&path, detoxfuse::lm::LoadOptions { dequantize: a.f32 })?;
    let tok = Tokenizer::for_model(&path)?;
    let fusion = match &a.calibration {
        Some(c) => Some(crate::align::load_fusion(
            cache,
            c,
            a.alignment.as_deref(),
            &path,
            model.as_ref(),
            a.alpha,
            a.align_variant,
        )?),
        None => None,
    };
    let cfg = a.gen.config()?;

    let done = match (&a.output, a.resume) {
        (Some(out), true) if out.exists() => batch::completed_lines(out)?,
        _ => Default::default(),
    };
    let mut sink: Box<dyn Write> = match &a.output {
        Some(p) => Box::new(detoxfuse::jsonl::Appender::open(p, !a.resume)?),
        None => Box::new(std::io::stdout()),
    };
    let bar = if jobs.len() > 1 {
        ProgressBar::new(jobs.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(crate::bar_style(Some("prompts")));
    let mut dec: Box<dyn Decoder + '_> = match &fusion {
        Some(f) => Box::new(f.decoder(model.as_ref(), &tok, a.alpha)?),
        None => Box::new(PlainDecoder::new(model.as_ref())),
    };
    let opts = BatchOptions {
        chat: a.chat,
        fail_fast: a.fail_fast || a.input.is_none(),
        done: &done,
        model: path.file_name().map(|n| n.to_string_lossy().into_owned()),
        fusion: fusion.as_ref().map(|f| {
            serde_json::json!({"alpha": a.alpha, "calibration": f.calibration, "alignment": f.alignment})
        }),
    };
    let failed = batch::run(
        dec.as_mut(),
        &tok,
        &jobs,
        &cfg,
        &opts,
        sink.as_mut(),
        &mut Bar(&bar),
    );
    bar.finish_and_clear();
    let failed = failed?;
    if !bad.is_empty() || failed > 0 {
        bail!(
            "{} invalid input line(s) and {failed} failed prompt(s); the other prompts were written",
            bad.len()
        );
    }
    Ok(())
}
