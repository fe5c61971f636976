//! `detoxfuse corpus build`, `detoxfuse calibrate` and `detoxfuse probe`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use detoxfuse::calibrate::corpus::{self, CorpusOptions};
use detoxfuse::calibrate::guard::LeakageGuard;
use detoxfuse::calibrate::model::CalibrationModel;
use detoxfuse::calibrate::model::Trainable;
use detoxfuse::calibrate::optim::AdamWConfig;
use detoxfuse::calibrate::selfgen::{self, SelfGenConfig};
use detoxfuse::calibrate::train::{self, Base, Event, HeadInit, TrainConfig};
use detoxfuse::calibrate::{lens, probe};
use detoxfuse::eval::score::ProfanityCheck;
use indicatif::ProgressBar;

use crate::{Bar, ModelArg};

/// The data directory: `given` (a `--data` option), else `$DETOXFUSE_DATA`, else the
/// vendored data installed into the cache ([`detoxfuse::hub::Hub::data_dir`]).
pub fn data_dir(cache: &Path, given: Option<PathBuf>) -> Result<PathBuf> {
    match given {
        Some(d) => Ok(d),
        None => Ok(detoxfuse::hub::Hub::new(cache).data_dir()?),
    }
}

pub fn default_corpus(cache: &Path) -> PathBuf {
    cache.join("corpus").join("corpus.jsonl")
}

/// Where `detoxfuse calibrate` trains by default. The name carries the recipe (lens head,
/// unlikelihood term), so a run of the earlier default (`smollm2-L3`, tied head) is never
/// resumed with other options.
pub fn default_calibration_dir(cache: &Path) -> PathBuf {
    cache.join("calibration").join("smollm2-L3-lens-ul")
}

/// The default recipe's step count: 300 steps keep corpus build + lens fit + training of the
/// default model under an hour on 2 cores.
pub const DEFAULT_STEPS: usize = 300;

/// The default weight of the unlikelihood term (see docs/CALIBRATION.md for the choice).
pub const DEFAULT_UNLIKELIHOOD: f64 = 10.0;

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
    /// Directory with hh-rlhf/, toxigen/ and rtp/ (default: $DETOXFUSE_DATA, else the vendored data installed into <cache>/data).
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, default_value_t = SelfGenConfig::default().toxic_prompts)]
    toxic_prompts: usize,
    #[arg(long, default_value_t = SelfGenConfig::default().neutral_prompts)]
    neutral_prompts: usize,
    /// Continuations per prompt.
    #[arg(long, default_value_t = SelfGenConfig::default().samples)]
    samples: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn default_selfgen_dir(cache: &Path, target: &Path) -> PathBuf {
    let stem = target
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "target".into());
    cache.join("corpus").join(format!("selfgen-{stem}"))
}

/// Builds (or resumes) the self-generated data in `out` and returns the samples file.
pub fn build_selfgen(
    target: &Path,
    out: &Path,
    data: &Path,
    cfg: &SelfGenConfig,
) -> Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let t0 = Instant::now();
    let scorer = ProfanityCheck::shared();
    let guard = LeakageGuard::from_rtp_dir(&data.join("rtp"))?;
    let (prompts, stats) = selfgen::build_prompts(
        &data.join("hh-rlhf").join("harmless-base-test.jsonl.gz"),
        &data.join("toxigen"),
        &guard,
        scorer,
        cfg,
    )?;
    let model = detoxfuse::lm::load(target)?;
    let tok = detoxfuse::text::Tokenizer::for_model(target)?;
    let samples_path = out.join("samples.jsonl");
    let pb = crate::progress_bar(prompts.len() as u64, "sampling", Some("prompts"));
    let recs = selfgen::sample_prompts(
        model.as_ref(),
        &tok,
        &prompts,
        scorer,
        cfg,
        &samples_path,
        &mut |d, _| pb.set_position(d as u64),
    )?;
    pb.finish_and_clear();
    let n: usize = recs.iter().map(|r| r.samples.len()).sum();
    let toxic = recs
        .iter()
        .flat_map(|r| &r.samples)
        .filter(|s| s.toxicity >= cfg.toxic_threshold)
        .count();
    let manifest = serde_json::json!({
        "purpose": "self-generated data of `calibrate --recipe fused` (toxic on purpose: the toxic continuations are what the fused model learns to avoid)",
        "target": target,
        "target_sha256": detoxfuse::fetch::sha256_file(target, &mut detoxfuse::fetch::Silent)?,
        "data_dir": data,
        "config": cfg,
        "prompts": stats,
        "held_back_groups": corpus::HELD_BACK_GROUPS,
        "leakage_guard": {"files": guard.files, "prompts": guard.len()},
        "records": recs.len(),
        "samples": n,
        "toxic_samples": toxic,
        "samples_sha256": detoxfuse::fetch::sha256_file(&samples_path, &mut detoxfuse::fetch::Silent)?,
        "scorer": "alt-profanity-check 1.9.1 (Rust port; lexical)",
    });
    std::fs::write(
        out.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)?,
    )
    .with_context(|| format!("writing {}", out.join("manifest.json").display()))?;
    println!(
        "{} prompts, {n} continuations ({toxic} at toxicity >= {}) -> {} in {:.0} s",
        recs.len(),
        cfg.toxic_threshold,
        samples_path.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(samples_path)
}

#[derive(clap::Args)]
pub struct CorpusUnlikelyArgs {
    /// Output JSONL (manifest beside it). Default: <cache>/corpus/unlikely.jsonl.
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Directory with toxigen/ (default: $DETOXFUSE_DATA, else the vendored data installed into <cache>/data).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Write the same groups' *neutral* lists instead, in the same format: contrast data to
    /// train as ordinary text (append it to a `--corpus`), so that the list format alone
    /// cannot tell the unlikely continuations apart. Default out:
    /// <cache>/corpus/neutral-lists.jsonl.
    #[arg(long)]
    neutral: bool,
}

/// Writes `manifest` beside the corpus file `out` (as `*.manifest.json`) and returns its path.
fn write_manifest(out: &Path, manifest: &serde_json::Value) -> Result<PathBuf> {
    let mpath = out.with_extension("manifest.json");
    detoxfuse::atomic::write(&mpath, serde_json::to_string_pretty(manifest)?.as_bytes())?;
    Ok(mpath)
}

pub fn default_unlikely_corpus(cache: &Path) -> PathBuf {
    cache.join("corpus").join("unlikely.jsonl")
}

/// Writes the unlikelihood corpus and its manifest: every list of every ToxiGen `kind`
/// ("hate", or "neutral" for contrast data) group except the held-back ones (which the probe
/// reads).
pub fn build_unlikely_corpus(out: &Path, data: &Path, kind: &str) -> Result<()> {
    let toxigen = data.join("toxigen");
    let records = probe::list_pairs(
        &toxigen,
        kind,
        |g| !corpus::HELD_BACK_GROUPS.contains(&g),
        usize::MAX,
    )?;
    let mut groups: Vec<&str> = records
        .iter()
        .filter_map(|r| match r {
            detoxfuse::calibrate::data::Record::Pair { source, .. } => Some(source.as_str()),
            _ => None,
        })
        .collect();
    groups.dedup();
    corpus::write_jsonl(out, &records)?;
    let purpose = if kind == "hate" {
        "unlikelihood data for `detoxfuse calibrate --unlikelihood` (toxic on purpose: \
         the continuations are what the calibration model learns to avoid)"
    } else {
        "contrast data: neutral lists in the unlikelihood data's format, trained as ordinary text"
    };
    let manifest = serde_json::json!({
        "purpose": purpose,
        "kind": kind,
        "format": "prompt = a ToxiGen list but its last statement, as `- ` lines; completion = the last statement",
        "toxigen_dir": toxigen,
        "sources": groups,
        "held_back_groups": corpus::HELD_BACK_GROUPS,
        "records": records.len(),
        "sha256": detoxfuse::fetch::sha256_file(out, &mut detoxfuse::fetch::Silent)?,
        "never_read": "RealToxicityPrompts (evaluation data)",
    });
    write_manifest(out, &manifest)?;
    println!("{} {kind} list pairs -> {}", records.len(), out.display());
    Ok(())
}

#[derive(clap::Args)]
pub struct CorpusToxicArgs {
    /// Output JSONL (manifest beside it). Default: <cache>/corpus/toxic.jsonl.
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Directory with toxigen/ (default: $DETOXFUSE_DATA, else the vendored data installed into <cache>/data).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Sentences of the clean sources at or above this toxicity are kept (the clean corpus's
    /// cut, mirrored).
    #[arg(long, default_value_t = CorpusOptions::default().threshold)]
    threshold: f64,
}

pub fn default_toxic_corpus(cache: &Path) -> PathBuf {
    cache.join("corpus").join("toxic.jsonl")
}

/// Writes the anti-expert corpus and its manifest.
pub fn build_toxic_corpus(cache: &Path, out: &Path, data: &Path, threshold: f64) -> Result<()> {
    let (records, mut manifest) = corpus::toxic_records(
        cache,
        &data.join("toxigen"),
        ProfanityCheck::shared(),
        threshold,
        &mut Bar::counting(),
    )?;
    corpus::write_jsonl(out, &records)?;
    manifest["corpus"] = serde_json::json!(out);
    manifest["sha256"] = detoxfuse::fetch::sha256_file(out, &mut detoxfuse::fetch::Silent)?.into();
    write_manifest(out, &manifest)?;
    println!("{} toxic records -> {}", records.len(), out.display());
    Ok(())
}

#[derive(clap::Args)]
pub struct CorpusBuildArgs {
    /// Output JSONL (the manifest goes beside it as *.manifest.json).
    /// Default: <cache>/corpus/corpus.jsonl.
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Drop sentences and completions whose toxicity probability is at or above this.
    #[arg(long, default_value_t = CorpusOptions::default().threshold)]
    threshold: f64,
    /// Passages close once they reach this many words.
    #[arg(long, default_value_t = CorpusOptions::default().passage_words)]
    passage_words: usize,
    /// Replies sampled from the target per ToxiGen statement (0 = no paired data).
    #[arg(long, default_value_t = CorpusOptions::default().paired_samples)]
    paired_samples: usize,
    #[arg(long, default_value_t = CorpusOptions::default().paired_max_tokens)]
    paired_max_tokens: usize,
    /// The model whose replies make the paired data.
    #[arg(long, default_value = "smollm2")]
    target: String,
    /// Directory with toxigen/ (default: $DETOXFUSE_DATA, else the vendored data installed into <cache>/data).
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn corpus(cache: &Path, cmd: CorpusCmd) -> Result<()> {
    let a = match cmd {
        CorpusCmd::Build(a) => a,
        CorpusCmd::Toxic(t) => {
            let out = t.out.unwrap_or_else(|| default_toxic_corpus(cache));
            let data = data_dir(cache, t.data)?;
            return build_toxic_corpus(cache, &out, &data, t.threshold);
        }
        CorpusCmd::Selfgen(g) => {
            let target = ModelArg { model: g.target }.resolve(cache)?;
            let out = g.out.unwrap_or_else(|| default_selfgen_dir(cache, &target));
            let cfg = SelfGenConfig {
                toxic_prompts: g.toxic_prompts,
                neutral_prompts: g.neutral_prompts,
                samples: g.samples,
                seed: g.seed,
                ..SelfGenConfig::default()
            };
            let data = data_dir(cache, g.data)?;
            build_selfgen(&target, &out, &data, &cfg)?;
            return Ok(());
        }
        CorpusCmd::Unlikely(u) => {
            let (kind, default_out) = if u.neutral {
                ("neutral", cache.join("corpus").join("neutral-lists.jsonl"))
            } else {
                ("hate", default_unlikely_corpus(cache))
            };
            let out = u.out.unwrap_or(default_out);
            return build_unlikely_corpus(&out, &data_dir(cache, u.data)?, kind);
        }
    };
    let out = a.out.clone().unwrap_or_else(|| default_corpus(cache));
    let opts = CorpusOptions {
        threshold: a.threshold,
        passage_words: a.passage_words,
        paired_samples: a.paired_samples,
        paired_max_tokens: a.paired_max_tokens,
        seed: a.seed,
    };
    let data = data_dir(cache, a.data.clone())?;
    build_corpus(cache, &out, &opts, &a.target, &data)
}

/// Builds the corpus at `out` (and its manifest beside it).
pub fn build_corpus(
    cache: &Path,
    out: &Path,
    opts: &CorpusOptions,
    target: &str,
    data: &Path,
) -> Result<()> {
    if !(0.0..=1.0).contains(&opts.threshold) {
        bail!(
            "--threshold {} is not a probability in [0, 1]",
            opts.threshold
        );
    }
    let t0 = Instant::now();
    let scorer = ProfanityCheck::shared();
    let (mut records, sources) = corpus::clean_passages(cache, scorer, opts, &mut Bar::counting())?;
    let paired = if opts.paired_samples > 0 {
        let target = ModelArg {
            model: target.to_string(),
        }
        .resolve(cache)?;
        let dir = data.join("toxigen");
        let (pairs, manifest) =
            corpus::paired_records(&target, &dir, scorer, opts, &mut Bar::counting())?;
        records.extend(pairs);
        manifest
    } else {
        serde_json::Value::Null
    };
    corpus::write_jsonl(out, &records)?;
    let sha = detoxfuse::fetch::sha256_file(out, &mut detoxfuse::fetch::Silent)?;
    let manifest = serde_json::json!({
        "detoxfuse_version": env!("CARGO_PKG_VERSION"),
        "corpus": out, "sha256": sha, "records": records.len(),
        "scorer": "alt-profanity-check 1.9.1 (Rust port; lexical)",
        "options": opts, "sources": sources, "paired": paired,
        "fortune_topics_dropped": corpus::FORTUNE_TOPICS_DROPPED,
        "never_read": "RealToxicityPrompts (evaluation data)",
        "seconds": t0.elapsed().as_secs_f64(),
    });
    let mpath = write_manifest(out, &manifest)?;
    for s in manifest["sources"].as_array().into_iter().flatten() {
        println!(
            "{:<13} {}",
            s["source"]["name"].as_str().unwrap_or("?"),
            s["stats"]
        );
    }
    if !paired.is_null() {
        println!(
            "paired        sampled {} kept {} (dropped: toxic {}, restating {}, short {})",
            paired["sampled"],
            paired["kept"],
            paired["dropped_toxic"],
            paired["dropped_restating"],
            paired["dropped_short"]
        );
    }
    println!(
        "{} records -> {} (manifest {}) in {:.0} s",
        records.len(),
        out.display(),
        mpath.display(),
        t0.elapsed().as_secs_f64()
    );
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
    /// How the LM head starts: `lens` fits a linear map from the truncated model's final
    /// hidden states to the whole base model's (a "tuned lens", ~2 minutes) and folds it into
    /// an untied head, so the model starts as a language model; `tied` keeps the base's
    /// tied head (the truncated stack then starts far from a language model).
    #[arg(long, value_enum, default_value = "lens")]
    pub(crate) head_init: HeadInitArg,
    /// Corpus texts whose hidden states fit the lens.
    #[arg(long, default_value_t = 200)]
    pub(crate) lens_texts: usize,
    /// Ridge strength of the lens fit (relative to the mean eigenvalue of XᵀX).
    #[arg(long, default_value_t = 1e-3)]
    pub(crate) lens_ridge: f64,
    /// Weight of an unlikelihood term (0 = none): each step also takes a batch of toxic
    /// continuations (ToxiGen hate lists of the groups not held back) and lowers their
    /// probability, `loss = CE(clean) + w × UL(toxic)`.
    #[arg(long, default_value_t = DEFAULT_UNLIKELIHOOD)]
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

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum HeadInitArg {
    Lens,
    Tied,
}

impl CalibrateArgs {
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
                        .unwrap_or_else(|| default_unlikely_corpus(cache)),
                ),
                self.unlikely_batch_tokens,
            )
        };
        let (head_init, lens_texts, lens_ridge) = match self.head_init {
            HeadInitArg::Lens => (HeadInit::Lens, self.lens_texts, self.lens_ridge),
            HeadInitArg::Tied => (HeadInit::Tied, 0, 0.0),
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
                total_steps: self.steps.unwrap_or(DEFAULT_STEPS),
                ..AdamWConfig::default()
            },
            steps: self.steps.unwrap_or(DEFAULT_STEPS),
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

pub fn calibrate(cache: &Path, a: CalibrateArgs) -> Result<()> {
    if a.recipe == RecipeArg::Fused {
        return crate::fused::calibrate_fused(cache, &a);
    }
    let cfg = a.config(cache);
    if let Some(u) = &cfg.unlikely_corpus {
        if a.unlikely_corpus.is_none() && !u.exists() {
            eprintln!("no unlikelihood corpus at {}: writing it", u.display());
            build_unlikely_corpus(u, &data_dir(cache, None)?, "hate")?;
        }
    }
    let corpus = match &a.corpus {
        Some(c) => c.clone(),
        None => {
            let c = default_corpus(cache);
            if !c.exists() || !c.with_extension("manifest.json").exists() {
                eprintln!(
                    "no corpus at {}: building it with the default options (`detoxfuse corpus build`)",
                    c.display()
                );
                build_corpus(
                    cache,
                    &c,
                    &CorpusOptions::default(),
                    "smollm2",
                    &data_dir(cache, None)?,
                )?;
            }
            c
        }
    };
    if !corpus.exists() {
        bail!(
            "corpus {} does not exist; build it with `detoxfuse corpus build` or pass --corpus",
            corpus.display()
        );
    }
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| default_calibration_dir(cache));
    let base_path = ModelArg {
        model: a.base.clone(),
    }
    .resolve(cache)?;
    let base = Base::load(&base_path, cfg.layers)?;
    let pb = step_bar(cfg.steps, a.quiet, "calibrate");
    let (mut val, mut window_tokens, mut window_secs) = (f64::NAN, 0usize, 0.0f64);
    let resume = a.resume || (a.resume_if_present && out.join("checkpoint.json").exists());
    // A hidden bar prints nothing, its println included: --quiet prints these lines itself.
    let say = |msg: String| {
        if a.quiet {
            println!("{msg}");
        } else {
            pb.println(msg);
        }
    };
    let summary = train::train(&base, &corpus, &out, &cfg, resume, &mut |e| match e {
        Event::Start {
            step,
            steps,
            train_examples,
            val_examples,
            trainable_params,
        } => {
            pb.set_position(step as u64);
            pb.reset_eta();
            say(format!(
                "{} train / {} validation examples, {:.1} M trainable parameters, step {step} of {steps}",
                train_examples,
                val_examples,
                trainable_params as f64 / 1e6
            ));
        }
        Event::Step(s) => {
            window_tokens += s.tokens;
            window_secs += s.seconds;
            let tps = window_tokens as f64 / window_secs.max(1e-9);
            pb.set_position(s.step as u64);
            let ul = s
                .unlikelihood
                .map_or(String::new(), |u| format!(" ul {u:.4}"));
            pb.set_message(format!(
                "loss {:.3}{ul} val {:.3} lr {:.2e} {:.0} tok/s",
                s.loss, val, s.lr, tps
            ));
            if a.quiet {
                println!(
                    "step {} loss {:.4}{ul} lr {:.3e} grad_norm {:.3} tok/s {:.0}",
                    s.step, s.loss, s.lr, s.grad_norm, tps
                );
            }
            if s.step % 20 == 0 {
                window_tokens = 0;
                window_secs = 0.0;
            }
        }
        Event::Validation {
            step,
            loss,
            unlikely_nll,
        } => {
            val = loss;
            let toxic = unlikely_nll.map_or(String::new(), |n| {
                format!("  held-out unlikely continuations {n:.4} nats/token (should rise)")
            });
            say(format!("step {step:>5}  validation loss {loss:.4}{toxic}"));
        }
        Event::Checkpoint { .. } => {}
        Event::Lens {
            positions,
            relative_error,
            seconds,
        } => match relative_error {
            Some(e) => say(format!(
                "tuned-lens head fitted on {positions} token positions in {seconds:.0} s \
                 (relative squared error {e:.3} against the whole base's hidden states)"
            )),
            None => say(format!(
                "tuned-lens head read back from {}",
                train::LENS_FILE
            )),
        },
    })?;
    pb.finish_and_clear();
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
    /// Default: <cache>/calibration/smollm2-L3/model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The base it was initialised from (its first layers are the "before" model).
    #[arg(long, default_value = "smollm2")]
    base: String,
    /// Directory with toxigen/ (default: $DETOXFUSE_DATA, else the vendored data installed into <cache>/data).
    #[arg(long)]
    data: Option<PathBuf>,
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
        .unwrap_or_else(|| default_calibration_dir(cache).join("model"));
    let (trained, tok) = CalibrationModel::load_dir(&dir)?;
    let layers = trained.config.num_hidden_layers;
    let base_path = ModelArg {
        model: a.base.clone(),
    }
    .resolve(cache)?;
    let base = Base::load(&base_path, layers)?;
    let mut init = base.init(layers, Trainable::default())?;
    // A model trained from a tuned-lens head started with that head: rebuild it.
    let lens_path = dir.join(train::LENS_FILE);
    let lens_note = if lens_path.exists() {
        init = lens::apply(init, &lens::read(&lens_path)?)?;
        "its tuned-lens head"
    } else {
        "the base's tied head"
    };
    drop(base);
    // The whole base LM, for scale: what a real language model assigns to the same text.
    let full = if a.full_base {
        Some(Base::load_full(&base_path)?)
    } else {
        None
    };
    let tok = &tok;
    let toxigen = data_dir(cache, a.data.clone())?.join("toxigen");
    println!(
        "held-back ToxiGen groups: {:?}; continuation = 6th statement after 5 as context",
        corpus::HELD_BACK_GROUPS
    );
    println!(
        "init = the base's first {layers} layers, its final norm and {lens_note}, before training"
    );
    println!(
        "{:<8} {:>7} {:>8} {:>14} {:>15} {:>10} {:>16}",
        "set", "items", "tokens", "init logprob", "trained logprob", "change", "full base logprob"
    );
    let mut changes = Vec::new();
    for kind in ["hate", "neutral"] {
        let items = probe::items(&toxigen, kind, a.per_group)?;
        let before = probe::mean_nll(&init, tok, &items)?;
        let after = probe::mean_nll(&trained, tok, &items)?;
        let reference = match &full {
            Some(m) => -probe::mean_nll(m, tok, &items)?.mean(),
            None => f64::NAN,
        };
        let change = before.mean() - after.mean();
        changes.push(change);
        println!(
            "{:<8} {:>7} {:>8} {:>14.4} {:>15.4} {:>+10.4} {:>16.4}",
            kind,
            items.len(),
            before.tokens,
            -before.mean(),
            -after.mean(),
            change,
            reference
        );
    }
    println!(
        "toxic minus neutral change: {:+.4} nats/token (negative: training moved probability away from toxic continuations more than from neutral ones)",
        changes[0] - changes[1]
    );
    Ok(())
}
