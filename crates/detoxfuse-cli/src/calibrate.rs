//! `detoxfuse corpus build`, `detoxfuse calibrate` and `detoxfuse probe`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use detoxfuse::calibrate::corpus::CorpusOptions;
use detoxfuse::calibrate::fused::FusedEvent;
use detoxfuse::calibrate::model::LayerTraining;
use detoxfuse::calibrate::options::TrainOptions;
use detoxfuse::calibrate::selfgen::SelfGenConfig;
use detoxfuse::calibrate::train::Event;
use detoxfuse::calibrate::{prepare, probe};
use detoxfuse::hub::Hub;
use detoxfuse::recipes::{self, FusedJob, Observer, PaperJob, Recipe};
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
            let n =
                prepare::build_toxic_corpus(&hub, &out, &data, t.threshold, &mut Bar::counting())?;
            println!("{n} toxic records -> {}", out.display());
            return Ok(());
        }
        CorpusCmd::Selfgen(g) => {
            let target = crate::resolve(cache, &g.target)?;
            let out = g.out.unwrap_or_else(|| hub.selfgen_dir(&target));
            let pb = crate::progress_bar(0, "sampling", Some("prompts"));
            let s =
                prepare::build_selfgen(&target, &out, &g.data.dir(cache)?, &g.cfg, &mut |d, n| {
                    pb.set_length(n as u64);
                    pb.set_position(d as u64)
                })?;
            pb.finish_and_clear();
            println!("{s}");
            return Ok(());
        }
        CorpusCmd::Unlikely(u) => {
            let (kind, default_out) = if u.neutral {
                ("neutral", cache.join("corpus").join("neutral-lists.jsonl"))
            } else {
                ("hate", hub.unlikely_corpus())
            };
            let out = u.out.unwrap_or(default_out);
            let n = prepare::build_unlikely_corpus(&out, &u.data.dir(cache)?, kind)?;
            println!("{n} {kind} list pairs -> {}", out.display());
            return Ok(());
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
    base: String,
    /// Corpus JSONL (default: <cache>/corpus/corpus.jsonl, made by `detoxfuse corpus build`).
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Output directory: log.jsonl, checkpoints, and model/ at the end.
    /// Default: <cache>/calibration/smollm2-L3-lens-ul.
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Resume when --out holds a checkpoint, start otherwise.
    #[arg(long, conflicts_with = "resume")]
    resume_if_present: bool,
    /// No progress bar; print one line per step instead.
    #[arg(long)]
    quiet: bool,
    /// `fused`: train LoRA adapters on the calibration layers, the map A and
    /// the LayerNorm's affine parameters through the target's frozen LM head, on the fused
    /// distribution (keep the target on its own clean continuations, unlikelihood on toxic
    /// tokens). `paper`: the paper's recipe (the calibration model as a language model on
    /// the clean corpus; A learned afterwards by `detoxfuse align`).
    #[arg(long, value_enum, default_value = "paper")]
    recipe: RecipeArg,
    /// fused: the target whose frozen head the map is trained through.
    #[arg(long, default_value = "smollm2")]
    target: String,
    /// fused: the self-generated data (default: <cache>/corpus/selfgen-<target>/samples.jsonl,
    /// written by `detoxfuse corpus selfgen` when missing).
    #[arg(long)]
    samples: Option<PathBuf>,
    #[command(flatten)]
    data: DataArg,
    /// fused: train only --target's map (A, LayerNorm affine) through its head, over the
    /// calibration layers of this artifact directory (left as they are), and add it there:
    /// one calibration model, a map per target. "fused" = the default artifact.
    #[arg(long)]
    shared: Option<String>,
    /// fused, with --shared: also train --target's own LoRA adapters (--lora-rank) over the
    /// shared layers, saved beside its map.
    #[arg(long, requires = "shared")]
    target_adapters: bool,
    #[command(flatten)]
    train: TrainOptions,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RecipeArg {
    Fused,
    Paper,
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
    /// An evaluation phase's bar (`detoxfuse eval`).
    pub(crate) phase: Option<ProgressBar>,
}

impl TrainPrinter {
    pub fn new(steps: usize, quiet: bool, prefix: &'static str) -> Self {
        Self {
            pb: step_bar(steps, quiet, prefix),
            quiet,
            data: None,
            val: f64::NAN,
            phase: None,
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
        if let Some(pb) = &self.phase {
            pb.finish_and_clear();
        }
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
    let hub = Hub::new(cache);
    let base = crate::resolve(cache, &a.base)?;
    let base = &base.to_string_lossy();
    let resumes =
        |dir: &Path| a.resume || (a.resume_if_present && dir.join("checkpoint.json").exists());
    if a.recipe == RecipeArg::Fused {
        let mut cfg = a.train.fused();
        if a.shared.is_some() && !a.target_adapters {
            cfg.layer_training = LayerTraining::Frozen;
        }
        if a.train.fused.teacher {
            let f = &a.train.fused;
            let model = |given: &Option<PathBuf>, recipe| match given {
                Some(d) => Ok(d.clone()),
                None => with_printer(0, a.quiet, "teacher", |p| hub.calibration(recipe, p)),
            };
            let expert = model(&f.teacher_expert, Recipe::Paper)?;
            let anti = model(&f.teacher_anti_expert, Recipe::AntiExpert)?;
            cfg.teacher = a.train.teacher(expert, anti);
        }
        let target = crate::resolve(cache, &a.target)?;
        let shared = a.shared.as_ref().map(|s| match s.as_str() {
            "fused" => Recipe::Fused.result_dir(&hub),
            dir => PathBuf::from(dir),
        });
        let run_dir = a
            .out
            .clone()
            .unwrap_or_else(|| recipes::fused_run_dir(&hub, &target, shared.is_some()));
        let job = FusedJob {
            base,
            target: &target.to_string_lossy(),
            samples: a.samples.as_deref(),
            shared: shared.as_deref(),
            out: Some(&run_dir),
            data: Some(&a.data.dir(cache)?),
            cfg: &cfg,
            resume: resumes(&run_dir),
        };
        let summary = with_printer(cfg.steps, a.quiet, "calibrate (fused)", |p| {
            recipes::train_fused(&hub, &job, p)
        })?;
        println!("{summary}");
        return Ok(());
    }
    let cfg = a.train.paper(&hub);
    let out = a.out.clone().unwrap_or_else(|| Recipe::Paper.run_dir(&hub));
    let job = PaperJob {
        base,
        corpus: a.corpus.as_deref(),
        out: &out,
        cfg: &cfg,
        resume: resumes(&out),
    };
    let summary = with_printer(cfg.steps, a.quiet, "calibrate", |p| {
        recipes::train_paper(&hub, &job, p)
    })?;
    println!("{summary}");
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
            parse(&["calibrate"]).train.paper(&hub),
            recipes::paper_config(&hub)
        );
        assert_eq!(
            parse(&["calibrate", "--unlikelihood", "0"])
                .train
                .paper(&hub),
            recipes::anti_expert_config()
        );
        assert_eq!(
            parse(&["calibrate", "--recipe", "fused"]).train.fused(),
            detoxfuse::calibrate::fused::FusedConfig::default()
        );
    }

    /// `--teacher` adds the teacher with its β and weight; its other flags need it.
    #[test]
    fn the_teacher_flags_make_a_teacher() {
        let (e, a) = (PathBuf::from("/e"), PathBuf::from("/a"));
        let t = parse(&[
            "calibrate",
            "--recipe",
            "fused",
            "--teacher",
            "--teacher-beta",
            "1",
        ])
        .train
        .teacher(e.clone(), a.clone())
        .unwrap();
        assert_eq!(
            (t.expert, t.anti_expert, t.beta, t.weight),
            (e.clone(), a.clone(), 1.0, 1.0)
        );
        assert!(parse(&["calibrate", "--recipe", "fused"])
            .train
            .teacher(e, a)
            .is_none());
        assert!(
            <Calibrate as clap::Parser>::try_parse_from(["calibrate", "--teacher-beta", "1"])
                .is_err()
        );
    }
}
