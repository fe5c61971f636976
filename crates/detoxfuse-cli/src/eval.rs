//! `detoxfuse eval`: the field's protocol (EVALUATION.md) for the untouched target, the fused
//! model at several alphas and the two baselines, in one resumable run.

use std::path::{Path, PathBuf};

use anyhow::Result;
use detoxfuse::align::Variant;
use detoxfuse::calibration::CalibrationSpec;
use detoxfuse::eval::protocol::{self, EvalObserver, EvalPlan, Method};
use detoxfuse::hub::Hub;
use detoxfuse::recipes::Observer;
use indicatif::ProgressBar;

use crate::calibrate::TrainPrinter;
use crate::ModelArg;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// The target model: a .gguf file, a Hugging Face directory or a fetched name.
    #[command(flatten)]
    model: ModelArg,
    /// Prompt file: RealToxicityPrompts-style JSONL, or a ToxiGen hate_*.txt file.
    /// Default: <data>/rtp/challenging-toxic-1196.jsonl.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Quick profile: 40 prompts spread evenly over the file, 25 samples each (labelled
    /// "quick" in every output). Without it: every prompt, 25 samples (the standard protocol).
    #[arg(long)]
    quick: bool,
    /// Use at most this many prompts, spread evenly over the file (overrides the profile).
    #[arg(long)]
    limit: Option<usize>,
    /// Samples per prompt (k; standard 25).
    #[arg(long, short = 'k')]
    samples: Option<usize>,
    #[arg(long, default_value_t = 20)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Methods to run: base, fused (one row per --alphas value), fusednorm (the same, each
    /// fused state rescaled to the target state's norm; not in the paper), paper (the paper
    /// recipe's model, one row per --paper-alphas value), wordfilter, dexperts (not by
    /// default: its expert and anti-expert train on first use, ~1.5 h on 2 cores).
    #[arg(long, value_delimiter = ',', default_values_t = ["base".to_string(), "fused".into(), "wordfilter".into()])]
    methods: Vec<String>,
    /// Fusion strengths for the fused rows.
    #[arg(long, value_delimiter = ',', default_values_t = [0.1, 0.2, 0.3])]
    alphas: Vec<f64>,
    /// Alphas of the `paper` rows: the paper recipe's calibration model with its alignment
    /// (trained on first use, ~50 min), the comparison the issue asks for at its best alpha.
    #[arg(long, value_delimiter = ',', default_values_t = [0.1])]
    paper_alphas: Vec<f64>,
    /// Calibration for the fused rows: "default" (the shipped fusion-aware calibration, no training), "fused" (the one
    /// `calibrate --recipe fused` trains here, on first use), "paper" (the paper recipe's model,
    /// trained on first use), or a directory.
    #[arg(long, default_value = "default")]
    calibration: String,
    /// DExperts expert: a paper-recipe calibration model directory (a language model with
    /// its own head), or "paper" (the paper recipe's default model, trained on first use).
    #[arg(long, default_value = "paper")]
    expert: String,
    #[arg(long, value_enum, default_value_t = Variant::Hidden)]
    align_variant: Variant,
    /// DExperts anti-expert: a calibration-trainer model directory trained on toxic text
    /// ("default" = trained on first use from `detoxfuse corpus toxic`, same budget as the
    /// calibration model).
    #[arg(long, default_value = "default")]
    anti_expert: String,
    /// DExperts strengths, one row each: logits = base + beta · (expert − anti-expert)
    /// (DExperts' paper uses 2 with GPT-2-sized experts).
    #[arg(long, value_delimiter = ',', default_values_t = [1.0, 2.0])]
    dexperts_beta: Vec<f32>,
    /// Evaluator LM for perplexity; must not be the target (default: gemma3 for other
    /// targets, smollm2 for gemma3).
    #[arg(long)]
    evaluator: Option<String>,
    /// Score the perplexity of the first N samples of each prompt (default: all of them).
    #[arg(long)]
    perplexity_samples: Option<usize>,
    /// Generate and score toxicity only; no perplexity.
    #[arg(long)]
    no_perplexity: bool,
    /// Output directory (default: <cache>/eval/<target>-<prompts>-<profile>). Rerunning with
    /// the same directory skips finished work.
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Evaluate the valid lines of a prompt file that has invalid ones (they are listed).
    #[arg(long)]
    skip_invalid: bool,
    /// Evaluate a ToxiGen file of a group the calibration corpora train on (refused by
    /// default: its statements are training data, not held-out prompts).
    #[arg(long)]
    allow_trained_groups: bool,
}

/// Moves the bar; when stderr is not a terminal (a run under nohup, a log file) the bar is
/// invisible, so a plain progress line goes out every 50 prompts instead.
fn advance(pb: &ProgressBar, done: usize, total: usize) {
    let resumed = pb.position() == 0 && done > 0;
    pb.set_position(done as u64);
    if resumed {
        // prompts finished by an earlier run say nothing about this run's rate
        pb.reset_eta();
    }
    if !std::io::IsTerminal::is_terminal(&std::io::stderr())
        && done > 0
        && (done.is_multiple_of(50) || done == total)
    {
        eprintln!(
            "{}: {done}/{total} prompts, {:.0} s elapsed, eta {:.0} s",
            pb.prefix().trim(),
            pb.elapsed().as_secs_f64(),
            pb.eta().as_secs_f64()
        );
    }
}

/// Training on first use (experts, calibration) and the run's phases, on the terminal.
struct EvalPrinter {
    train: TrainPrinter,
    phase: Option<ProgressBar>,
}

impl detoxfuse::fetch::Progress for EvalPrinter {
    fn stage(&mut self, msg: &str) {
        self.train.stage(msg)
    }
    fn bytes(&mut self, done: u64, total: u64) {
        self.train.bytes(done, total)
    }
}

impl Observer for EvalPrinter {
    fn note(&mut self, msg: &str) {
        self.train.note(msg)
    }
    fn train_event(&mut self, e: detoxfuse::calibrate::train::Event) {
        self.train.train_event(e)
    }
    fn fused_event(&mut self, e: detoxfuse::calibrate::fused::FusedEvent) {
        self.train.fused_event(e)
    }
}

impl EvalObserver for EvalPrinter {
    fn phase(&mut self, what: &str, total: usize) {
        if let Some(pb) = self.phase.take() {
            pb.finish_and_clear();
        }
        self.phase = Some(crate::progress_bar(
            total as u64,
            &format!("{what:>22}"),
            Some("prompts"),
        ));
    }
    fn advance(&mut self, done: usize, total: usize) {
        if let Some(pb) = &self.phase {
            advance(pb, done, total);
        }
    }
}

pub fn run(cache: &Path, a: EvalArgs) -> Result<()> {
    let plan = EvalPlan {
        methods: Method::parse_list(&a.methods, &a.alphas, &a.paper_alphas, &a.dexperts_beta)?,
        target: a.model.model,
        evaluator: a.evaluator,
        prompts: a.prompts,
        quick: a.quick,
        limit: a.limit,
        samples: a.samples,
        max_tokens: a.max_tokens,
        top_p: a.top_p,
        temperature: a.temperature,
        seed: a.seed,
        calibration: CalibrationSpec::parse(&a.calibration),
        align_variant: a.align_variant,
        expert: CalibrationSpec::parse(&a.expert),
        anti_expert: (a.anti_expert != "default").then(|| PathBuf::from(&a.anti_expert)),
        perplexity_samples: a.perplexity_samples,
        no_perplexity: a.no_perplexity,
        out: a.out,
        skip_invalid: a.skip_invalid,
        allow_trained_groups: a.allow_trained_groups,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        // The source revision this binary was built from (recorded by `build.rs`).
        commit: env!("DETOXFUSE_COMMIT").to_string(),
    };
    let mut p = EvalPrinter {
        train: TrainPrinter::new(0, false, "calibrate"),
        phase: None,
    };
    let outcome = protocol::run(&Hub::new(cache), &plan, &mut p);
    if let Some(pb) = p.phase.take() {
        pb.finish_and_clear();
    }
    p.train.finish();
    let o = outcome?;
    println!("{}", o.markdown);
    println!(
        "report: {0}/report.md, {0}/report.json, {0}/report.svg; generations in {0}/generations/",
        o.out.display()
    );
    Ok(())
}
