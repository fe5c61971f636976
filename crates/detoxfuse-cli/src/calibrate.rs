//! `detoxfuse corpus build`, `detoxfuse calibrate` and `detoxfuse probe`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use detoxfuse::calibrate::corpus::CorpusOptions;
use detoxfuse::calibrate::fused::FusedEvent;
use detoxfuse::calibrate::model::Trainable;
use detoxfuse::calibrate::optim::AdamWConfig;
use detoxfuse::calibrate::selfgen::SelfGenConfig;
use detoxfuse::calibrate::train::{Event, HeadInit, TrainConfig};
use detoxfuse::calibrate::{prepare, probe};
use detoxfuse::hub::Hub;
use detoxfuse::recipes::{self, Observer, PaperJob, Recipe};
use indicatif::ProgressBar;

use crate::Bar;

/// `--data`: the data directory.
#[derive(clap::Args)]
pub struct DataArg {
    /// Directory with hh-rlhf/, toxigen/ and rtp/ (default: $DETOXFUSE_DATA, else the vendored
    /// data installed into <cache>/data).
    #[arg(long)]
    data: Option<PathBuf>,
}

impl DataArg {
    pub fn dir(&self, cache: &Path) -> Result<PathBuf> {
        match &self.data {
            Some(d) => Ok(d.clone()),
            None => Ok(Hub::new(cache).data_dir()?),
        }
    }
}

#[derive(clap::Subcommand)]
pub enum CorpusCmd {
    /// Fetch the clean-text sources, filter them with the toxicity scorer, add paired data
    /// sampled from the target, and write corpus JSONL plus a manifest.
    Build(CorpusBuildArgs),
    /// Write the anti-expert corpus of the DExperts-style baseline: ToxiGen hate statements of
    /// the groups not held back (toxic text on purpose; never used for the calibration model).
    Toxic(CorpusToxicArgs),
    /// Write the unlikelihood data of `calibrate --unlikelihood`: ToxiGen hate lists of the
    /// groups not held back, as (five statements, sixth statement) pairs whose continuation
    /// the calibration model learns to find unlikely.
    Unlikely(CorpusUnlikelyArgs),
    /// Write the self-generated data of `calibrate --recipe fused`: toxic-leaning and neutral
    /// sentence halves from HH-RLHF and ToxiGen (never RealToxicityPrompts: the leakage guard
    /// drops any match), each continued by the target and every continuation scored.
    Selfgen(SelfgenArgs),
}

#[derive(clap::Args)]
pub struct SelfgenArgs {
    /// The model whose continuations are sampled.
    #[arg(long, short, default_value = "smollm2")]
    target: String,
    /// Output directory (prompts.jsonl, samples.jsonl, manifest.json).
    /// Default: <cache>/corpus/selfgen-<target stem>.
    #[arg(long, short)]
    out: Option<PathBuf>,
    #[command(flatten)]
    data: DataArg,
    #[command(flatten)]
    cfg: SelfGenConfig,
}

/// Builds (or resumes) the self-generated data in `out` and returns the samples file.
pub fn build_selfgen(
    target: &Path,
    out: &Path,
    data: &Path,
    cfg: &SelfGenConfig,
) -> Result<PathBuf> {
    let pb = crate::progress_bar(0, "sampling", Some("prompts"));
    let s = prepare::build_selfgen(target, out, data, cfg, &mut |d, n| {
        pb.set_length(n as u64);
        pb.set_position(d as u64)
    })?;
    pb.finish_and_clear();
    println!(
        "{} prompts, {} continuations ({} at toxicity >= {}) -> {} in {:.0} s",
        s.records,
        s.samples,
        s.toxic_samples,
        cfg.toxic_threshold,
        s.samples_path.display(),
        s.seconds
    );
    Ok(s.samples_path)
}

#[derive(clap::Args)]
pub struct CorpusUnlikelyArgs {
    /// Output JSONL (manifest beside it). Default: <cache>/corpus/unlikely.jsonl.
    #[arg(long, short)]
    out: Option<PathBuf>,
    #[command(flatten)]
    data: DataArg,
    /// Write the same groups' *neutral* lists instead, in the same format: contrast data to
    /// train as ordinary text (append it to a `--corpus`), so that the list format alone
    /// cannot tell the unlikely continuations apart. Default out:
    /// <cache>/corpus/neutral-lists.jsonl.
    #[arg(long)]
    neutral: bool,
}

/// Writes the unlikelihood corpus (`kind` "hate", or "neutral" for contrast data).
pub fn build_unlikely_corpus(out: &Path, data: &Path, kind: &str) -> Result<()> {
    let n = prepare::build_unlikely_corpus(out, data, kind)?;
    println!("{n} {kind} list pairs -> {}", out.display());
    Ok(())
}

#[derive(clap::Args)]
pub struct CorpusToxicArgs {
    /// Output JSONL (manifest beside it). Default: <cache>/corpus/toxic.jsonl.
    #[arg(long, short)]
    out: Option<PathBuf>,
    #[command(flatten)]
    data: DataArg,
    /// Sentences of the clean sources at or above this toxicity are kept (the clean corpus's
    /// cut, mirrored).
    #[arg(long, default_value_t = CorpusOptions::default().threshold)]
    threshold: f64,
}

/// Writes the anti-expert corpus and its manifest.
pub fn build_toxic_corpus(hub: &Hub, out: &Path, data: &Path, threshold: f64) -> Result<()> {
    let n = prepare::build_toxic_corpus(hub, out, data, threshold, &mut Bar::counting())?;
    println!("{n} toxic records -> {}", out.display());
    Ok(())
}

#[derive(clap::Args)]
pub struct CorpusBuildArgs {
    /// Output JSONL (the manifest goes beside it as *.manifest.json).
    /// Default: <cache>/corpus/corpus.jsonl.
    #[arg(long, short)]
    out: Option<PathBuf>,
    #[command(flatten)]
    opts: CorpusOptions,
    /// The model whose replies make the paired data.
    #[arg(long, default_value = "smollm2")]
    target: String,
    #[command(flatten)]
    data: DataArg,
}

pub fn corpus(cache: &Path, cmd: CorpusCmd) -> Result<()> {
    let hub = Hub::new(cache);
    let a = match cmd {
        CorpusCmd::Build(a) => a,
        CorpusCmd::Toxic(t) => {
            let out = t.out.unwrap_or_else(|| hub.toxic_corpus());
            let data = t.data.dir(cache)?;
            return build_toxic_corpus(&hub, &out, &data, t.threshold);
        }
        CorpusCmd::Selfgen(g) => {
            let target = crate::resolve(cache, &g.target)?;
            let out = g.out.unwrap_or_else(|| hub.selfgen_dir(&target));
            let cfg = g.cfg;
            let data = g.data.dir(cache)?;
            build_selfgen(&target, &out, &data, &cfg)?;
            return Ok(());
        }
        CorpusCmd::Unlikely(u) => {
            let (kind, default_out) = if u.neutral {
                ("neutral", cache.join("corpus").join("neutral-lists.jsonl"))
            } else {
                ("hate", hub.unlikely_corpus())
            };
            let out = u.out.unwrap_or(default_out);
            return build_unlikely_corpus(&out, &u.data.dir(cache)?, kind);
        }
    };
    let out = a.out.clone().unwrap_or_else(|| hub.corpus());
    let opts = a.opts.clone();
    let data = a.data.dir(cache)?;
    let target = crate::resolve(cache, &a.target)?;
    let target = target.to_string_lossy();
    let s = prepare::build_corpus(&hub, &out, &opts, &target, &data, &mut Bar::counting())?;
    println!("{s}\n-> {}", out.display());
    Ok(())
}

#[derive(clap::Args)]
pub struct CalibrateArgs {
    /// Base model whose embeddings and first layers start the calibration model: a llama
    /// GGUF, a Hugging Face Llama directory, or a fetched name.
    #[arg(long, default_value = "smollm2")]
    pub(crate) base: String,
    /// Corpus JSONL (default: <cache>/corpus/corpus.jsonl, made by `detoxfuse corpus build`).
    #[arg(long)]
    pub(crate) corpus: Option<PathBuf>,
    /// Output directory: log.jsonl, checkpoints, and model/ at the end.
    /// Default: <cache>/calibration/smollm2-L3-lens-ul.
    #[arg(long, short)]
    pub(crate) out: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    pub(crate) resume: bool,
    /// Resume when --out holds a checkpoint, start otherwise.
    #[arg(long, conflicts_with = "resume")]
    pub(crate) resume_if_present: bool,
    #[arg(long, default_value_t = TrainConfig::default().layers)]
    pub(crate) layers: usize,
    /// Optimizer steps (default: 300 for the paper recipe, 200 for fused).
    #[arg(long)]
    pub(crate) steps: Option<usize>,
    /// Most token slots (rows × longest row) per batch.
    #[arg(long, default_value_t = TrainConfig::default().batch_tokens)]
    pub(crate) batch_tokens: usize,
    #[arg(long, default_value_t = TrainConfig::default().max_len)]
    pub(crate) max_len: usize,
    /// Peak learning rate (default: 5e-4 paper, 1e-3 fused).
    #[arg(long)]
    pub(crate) lr: Option<f64>,
    /// Warmup steps (default: 20 paper, 10 fused).
    #[arg(long)]
    pub(crate) warmup: Option<usize>,
    /// AdamW weight decay (default: 0.01 paper, 0 fused).
    #[arg(long)]
    pub(crate) weight_decay: Option<f64>,
    /// Global gradient-norm clip (0 = off).
    #[arg(long, default_value_t = AdamWConfig::default().clip)]
    pub(crate) clip: f64,
    /// Validate every N steps (default: 40 paper, 50 fused).
    #[arg(long)]
    pub(crate) eval_every: Option<usize>,
    #[arg(long, default_value_t = TrainConfig::default().checkpoint_every)]
    pub(crate) checkpoint_every: usize,
    #[arg(long, default_value_t = TrainConfig::default().val_max_examples)]
    pub(crate) val_examples: usize,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Train the token embeddings (and a tied LM head) too.
    #[arg(long)]
    pub(crate) train_embeddings: bool,
    /// Train an untied LM head too.
    #[arg(long)]
    pub(crate) train_head: bool,
    /// How the LM head starts.
    #[arg(long, value_enum, default_value = "lens")]
    pub(crate) head_init: HeadInit,
    /// Corpus texts whose hidden states fit the lens.
    #[arg(long, default_value_t = 200)]
    pub(crate) lens_texts: usize,
    /// Ridge strength of the lens fit (relative to the mean eigenvalue of XᵀX).
    #[arg(long, default_value_t = 1e-3)]
    pub(crate) lens_ridge: f64,
    /// Weight of an unlikelihood term (0 = none): each step also takes a batch of toxic
    /// continuations (ToxiGen hate lists of the groups not held back) and lowers their
    /// probability, `loss = CE(clean) + w × UL(toxic)`.
    #[arg(long, default_value_t = recipes::PAPER_UNLIKELIHOOD)]
    pub(crate) unlikelihood: f64,
    /// The unlikelihood pairs (default: <cache>/corpus/unlikely.jsonl, written by
    /// `detoxfuse corpus unlikely` when missing).
    #[arg(long)]
    pub(crate) unlikely_corpus: Option<PathBuf>,
    /// Most token slots of each step's unlikelihood batch.
    #[arg(long, default_value_t = TrainConfig::default().unlikely_batch_tokens)]
    pub(crate) unlikely_batch_tokens: usize,
    /// No progress bar; print one line per step instead.
    #[arg(long)]
    pub(crate) quiet: bool,
    /// `fused`: train LoRA adapters on the calibration layers, the map A and
    /// the LayerNorm's affine parameters through the target's frozen LM head, on the fused
    /// distribution (keep the target on its own clean continuations, unlikelihood on toxic
    /// tokens). `paper`: the paper's recipe (the calibration model as a language model on
    /// the clean corpus; A learned afterwards by `detoxfuse align`).
    #[arg(long, value_enum, default_value = "paper")]
    pub(crate) recipe: RecipeArg,
    #[command(flatten)]
    pub(crate) fused: crate::fused::FusedArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RecipeArg {
    Fused,
    Paper,
}

impl CalibrateArgs {
    /// Whether a run in `dir` resumes: `--resume`, or `--resume-if-present` with a checkpoint.
    pub(crate) fn resumes(&self, dir: &Path) -> bool {
        self.resume || (self.resume_if_present && dir.join("checkpoint.json").exists())
    }

    fn config(&self, cache: &Path) -> TrainConfig {
        // Without the term its options stay at their defaults, so runs recorded before the
        // option existed still resume.
        let (unlikely_corpus, unlikely_batch_tokens) = if self.unlikelihood == 0.0 {
            (None, TrainConfig::default().unlikely_batch_tokens)
        } else {
            (
                Some(
                    self.unlikely_corpus
                        .clone()
                        .unwrap_or_else(|| Hub::new(cache).unlikely_corpus()),
                ),
                self.unlikely_batch_tokens,
            )
        };
        let (head_init, lens_texts, lens_ridge) = match self.head_init {
            HeadInit::Lens => (HeadInit::Lens, self.lens_texts, self.lens_ridge),
            HeadInit::Tied => (HeadInit::Tied, 0, 0.0),
        };
        TrainConfig {
            head_init,
            lens_texts,
            lens_ridge,
            unlikelihood: self.unlikelihood,
            unlikely_corpus,
            unlikely_batch_tokens,
            layers: self.layers,
            trainable: Trainable {
                embeddings: self.train_embeddings,
                head: self.train_head,
            },
            optim: AdamWConfig {
                lr: self.lr.unwrap_or(AdamWConfig::default().lr),
                warmup: self.warmup.unwrap_or(AdamWConfig::default().warmup),
                weight_decay: self
                    .weight_decay
                    .unwrap_or(AdamWConfig::default().weight_decay),
                clip: self.clip,
                total_steps: self.steps.unwrap_or(recipes::PAPER_STEPS),
                ..AdamWConfig::default()
            },
            steps: self.steps.unwrap_or(recipes::PAPER_STEPS),
            batch_tokens: self.batch_tokens,
            max_len: self.max_len,
            eval_every: self.eval_every.unwrap_or(TrainConfig::default().eval_every),
            checkpoint_every: self.checkpoint_every,
            val_max_examples: self.val_examples,
            seed: self.seed,
            ..TrainConfig::default()
        }
    }
}

/// The training progress bar (hidden with `--quiet`, whose callers print lines instead).
pub fn step_bar(steps: usize, quiet: bool, prefix: &'static str) -> ProgressBar {
    let pb = ProgressBar::new(steps as u64);
    if quiet {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    pb.set_style(crate::bar_style(Some("steps")));
    pb.set_prefix(prefix);
    pb
}

/// Prints what a recipe's training reports: data builds on a counting bar, trainer events
/// on a step bar (or as lines with `--quiet`).
pub struct TrainPrinter {
    pb: ProgressBar,
    quiet: bool,
    data: Option<Bar>,
    val: f64,
}

impl TrainPrinter {
    pub fn new(steps: usize, quiet: bool, prefix: &'static str) -> Self {
        Self {
            pb: step_bar(steps, quiet, prefix),
            quiet,
            data: None,
            val: f64::NAN,
        }
    }

    // A hidden bar prints nothing, its println included: --quiet prints these lines itself.
    fn say(&self, msg: String) {
        if self.quiet {
            println!("{msg}");
        } else {
            self.pb.println(msg);
        }
    }

    /// A trainer starts (or resumes) at `step` of `steps`.
    fn start(&mut self, step: usize, steps: usize, line: String) {
        self.pb.set_length(steps as u64);
        self.pb.set_position(step as u64);
        self.pb.reset_eta();
        self.say(line);
    }

    pub fn finish(self) {
        self.pb.finish_and_clear();
    }
}

/// Runs `f` with a [`TrainPrinter`] and clears its bar before returning, so that what the
/// caller prints next stands alone.
pub fn with_printer<T>(
    steps: usize,
    quiet: bool,
    prefix: &'static str,
    f: impl FnOnce(&mut TrainPrinter) -> detoxfuse::Result<T>,
) -> Result<T> {
    let mut p = TrainPrinter::new(steps, quiet, prefix);
    let r = f(&mut p);
    p.finish();
    Ok(r?)
}

impl detoxfuse::fetch::Progress for TrainPrinter {
    fn stage(&mut self, msg: &str) {
        self.data.get_or_insert_with(Bar::counting).stage(msg)
    }
    fn bytes(&mut self, done: u64, total: u64) {
        self.data
            .get_or_insert_with(Bar::counting)
            .bytes(done, total)
    }
}

impl Observer for TrainPrinter {
    fn note(&mut self, msg: &str) {
        eprintln!("{msg}");
    }

    fn train_event(&mut self, e: Event) {
        self.data = None;
        match e {
            Event::Start { step, steps, .. } => self.start(step, steps, e.to_string()),
            Event::Step(s) => {
                self.pb.set_position(s.step as u64);
                let ul = s
                    .unlikelihood
                    .map_or(String::new(), |u| format!(" ul {u:.4}"));
                let tps = s.tokens as f64 / s.seconds.max(1e-9);
                let (loss, val, lr) = (s.loss, self.val, s.lr);
                self.pb.set_message(format!(
                    "loss {loss:.3}{ul} val {val:.3} lr {lr:.2e} {tps:.0} tok/s"
                ));
                if self.quiet {
                    println!("{e}");
                }
            }
            Event::Validation { loss, .. } => {
                self.val = loss;
                self.say(e.to_string());
            }
            Event::Checkpoint { .. } => {}
            Event::Lens { .. } => self.say(e.to_string()),
        }
    }

    fn fused_event(&mut self, e: FusedEvent) {
        self.data = None;
        match e {
            FusedEvent::Start { step, steps, .. } => self.start(step, steps, e.to_string()),
            FusedEvent::Step(s) => {
                self.pb.set_position(s.step as u64);
                self.pb.set_message(format!(
                    "kl {:.4} ul {:.4} p(toxic) {:.4} {:.1} s/step",
                    s.kl, s.unlikelihood, s.toxic_prob, s.seconds
                ));
                if self.quiet {
                    println!("{e}");
                }
            }
            FusedEvent::Validation(_) => self.say(e.to_string()),
            FusedEvent::Checkpoint { .. } => {}
        }
    }
}

pub fn calibrate(cache: &Path, a: CalibrateArgs) -> Result<()> {
    if a.recipe == RecipeArg::Fused {
        return crate::fused::calibrate_fused(cache, &a);
    }
    let hub = Hub::new(cache);
    let cfg = a.config(cache);
    let out = a.out.clone().unwrap_or_else(|| Recipe::Paper.run_dir(&hub));
    let base_path = crate::resolve(cache, &a.base)?;
    let resume = a.resumes(&out);
    let job = PaperJob {
        base: &base_path.to_string_lossy(),
        corpus: a.corpus.as_deref(),
        out: &out,
        cfg: &cfg,
        resume,
    };
    let summary = with_printer(cfg.steps, a.quiet, "calibrate", |p| {
        recipes::train_paper(&hub, &job, p)
    })?;
    println!(
        "{} steps, {} tokens ({} of them in this run's {:.0} s, {:.0} tok/s); validation loss {} -> {:.4}; model: {}",
        summary.steps,
        summary.tokens,
        summary.run_tokens,
        summary.seconds,
        summary.run_tokens as f64 / summary.seconds.max(1e-9),
        summary
            .initial_val_loss
            .map_or("?".into(), |l| format!("{l:.4}")),
        summary.final_val_loss,
        summary.model_dir.display()
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct ProbeArgs {
    /// A trained calibration model directory (the model/ that `calibrate` writes).
    /// Default: the paper recipe's model, <cache>/calibration/smollm2-L3-lens-ul/model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The base it was initialised from (its first layers are the "before" model).
    #[arg(long, default_value = "smollm2")]
    base: String,
    #[command(flatten)]
    data: DataArg,
    /// Probe lines per held-back group.
    #[arg(long, default_value_t = 200)]
    per_group: usize,
    /// Also score the whole base model (all its layers, f32; ~7 minutes for SmolLM2 here),
    /// for scale.
    #[arg(long)]
    full_base: bool,
}

/// Mean log-probability of held-back toxic (and neutral) ToxiGen continuations, before and
/// after calibration training.
pub fn probe(cache: &Path, a: ProbeArgs) -> Result<()> {
    let dir = a
        .model
        .clone()
        .unwrap_or_else(|| Recipe::Paper.result_dir(&Hub::new(cache)));
    let base_path = crate::resolve(cache, &a.base)?;
    let toxigen = a.data.dir(cache)?.join("toxigen");
    let r = probe::compare(&dir, &base_path, &toxigen, a.per_group, a.full_base)?;
    println!("{r}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Calibrate {
        #[command(flatten)]
        a: CalibrateArgs,
    }

    fn parse(argv: &[&str]) -> CalibrateArgs {
        <Calibrate as clap::Parser>::try_parse_from(argv).unwrap().a
    }

    /// The default recipes live in the library once: `calibrate`'s defaults are them.
    #[test]
    fn the_cli_defaults_are_the_library_recipes() {
        let cache = Path::new("/c");
        let hub = Hub::new(cache);
        assert_eq!(
            parse(&["calibrate"]).config(cache),
            recipes::paper_config(&hub)
        );
        assert_eq!(
            parse(&[
                "calibrate",
                "--head-init",
                "tied",
                "--unlikelihood",
                "0",
                "--steps",
                "360"
            ])
            .config(cache),
            recipes::anti_expert_config()
        );
        assert_eq!(
            crate::fused::config(&parse(&["calibrate", "--recipe", "fused"])),
            detoxfuse::calibrate::fused::FusedConfig::default()
        );
    }
}
