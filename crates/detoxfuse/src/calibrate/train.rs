//! The trainer: AdamW over a corpus, validation loss, atomic checkpoints and exact resume,
//! then export as a Hugging Face Llama directory.
//!
//! The output directory holds `log.jsonl` (one line per step and per validation),
//! `checkpoint.json` (the commit record: it names the checkpoint's tensor file and is
//! replaced by rename only after that file is complete) and, when training ends, `model/`
//! with `calibration.json` describing how it was made.
//!
//! Everything that decides a step (the data order, the parameters and the optimizer
//! moments) is a function of the seed and what the checkpoint holds, so a resumed run
//! repeats the uninterrupted run's losses exactly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor};

use super::checkpoint::{check_writable, commit_record, load_state, open_log, save_state};
use super::data::{self, Example};
use super::model::{make_batch, CalibrationModel, LossSum, Objective, Trainable};
use super::optim::{AdamW, AdamWConfig};
use crate::error::{Error, IoContext, Result};
use crate::lm::export::{self, HfLlama};

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    /// Decoder layers taken from the base model.
    pub layers: usize,
    pub trainable: Trainable,
    pub optim: AdamWConfig,
    /// Optimizer steps in all.
    pub steps: usize,
    /// Upper bound on rows × longest row per batch.
    pub batch_tokens: usize,
    /// Examples longer than this are truncated.
    pub max_len: usize,
    /// Share of the corpus held out for validation, in thousandths.
    pub val_per_mille: u64,
    /// At most this many validation examples are scored.
    pub val_max_examples: usize,
    pub eval_every: usize,
    pub checkpoint_every: usize,
    pub seed: u64,
    /// How the LM head starts. Runs recorded before this option existed used the tied head.
    #[serde(default = "HeadInit::tied")]
    pub head_init: HeadInit,
    /// Corpus texts whose hidden states fit the lens ([`HeadInit::Lens`]).
    #[serde(default)]
    pub lens_texts: usize,
    /// Ridge strength of the lens fit, relative to the mean eigenvalue of `XᵀX`.
    #[serde(default)]
    pub lens_ridge: f64,
    /// Weight of the unlikelihood term on [`Self::unlikely_corpus`] (0: none). Each step then
    /// minimises `CE(clean batch) + unlikelihood × UL(toxic batch)`.
    #[serde(default)]
    pub unlikelihood: f64,
    /// Prompt/continuation pairs whose continuations the model should find unlikely.
    #[serde(default)]
    pub unlikely_corpus: Option<PathBuf>,
    /// Upper bound on rows × longest row of each step's unlikelihood batch.
    #[serde(default = "default_unlikely_batch_tokens")]
    pub unlikely_batch_tokens: usize,
}

/// How the calibration model's LM head starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum HeadInit {
    /// The base's tied head over the truncated layer stack. Not a language model (about −18
    /// nats per token on held-back text), so training raises the probability of everything.
    Tied,
    /// A tuned-lens head (`calibrate::lens`, ~2 minutes to fit): the truncated model starts as an approximation of
    /// the whole base model.
    Lens,
}

fn default_unlikely_batch_tokens() -> usize {
    1024
}

impl HeadInit {
    fn tied() -> Self {
        HeadInit::Tied
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            layers: 3,
            trainable: Trainable::default(),
            optim: AdamWConfig::default(),
            // Sized so the default model trains in under an hour on 2 cores (~6 s a step).
            steps: 360,
            batch_tokens: 4096,
            max_len: 128,
            val_per_mille: 20,
            val_max_examples: 256,
            eval_every: 40,
            checkpoint_every: 20,
            seed: 0,
            head_init: HeadInit::Tied,
            lens_texts: 0,
            lens_ridge: 0.0,
            unlikelihood: 0.0,
            unlikely_corpus: None,
            unlikely_batch_tokens: default_unlikely_batch_tokens(),
        }
    }
}

/// What the trainer reports as it goes.
pub enum Event<'a> {
    Start {
        step: usize,
        steps: usize,
        train_examples: usize,
        val_examples: usize,
        trainable_params: usize,
    },
    Step(&'a StepLog),
    Validation {
        step: usize,
        loss: f64,
        /// Mean cross-entropy of the held-out unlikely continuations (rises as they become
        /// unlikely), when training has an unlikelihood term.
        unlikely_nll: Option<f64>,
    },
    Checkpoint {
        step: usize,
    },
    /// The tuned-lens head was fitted (fresh runs) or read back (resumed runs).
    Lens {
        positions: usize,
        relative_error: Option<f64>,
        seconds: f64,
    },
}

/// One line per event, as `detoxfuse calibrate` prints it.
impl std::fmt::Display for Event<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Start {
                step,
                steps,
                train_examples,
                val_examples,
                trainable_params,
            } => write!(
                f,
                "{train_examples} train / {val_examples} validation examples, {:.1} M trainable parameters, step {step} of {steps}",
                *trainable_params as f64 / 1e6
            ),
            Event::Step(s) => {
                write!(f, "step {} loss {:.4}", s.step, s.loss)?;
                if let Some(u) = s.unlikelihood {
                    write!(f, " ul {u:.4}")?;
                }
                write!(
                    f,
                    " lr {:.3e} grad_norm {:.3} tok/s {:.0}",
                    s.lr,
                    s.grad_norm,
                    s.tokens as f64 / s.seconds.max(1e-9)
                )
            }
            Event::Validation {
                step,
                loss,
                unlikely_nll,
            } => {
                write!(f, "step {step:>5}  validation loss {loss:.4}")?;
                match unlikely_nll {
                    Some(n) => write!(
                        f,
                        "  held-out unlikely continuations {n:.4} nats/token (should rise)"
                    ),
                    None => Ok(()),
                }
            }
            Event::Checkpoint { step } => write!(f, "checkpoint at step {step}"),
            Event::Lens {
                positions,
                relative_error: Some(e),
                seconds,
            } => write!(
                f,
                "tuned-lens head fitted on {positions} token positions in {seconds:.0} s \
                 (relative squared error {e:.3} against the whole base's hidden states)"
            ),
            Event::Lens { .. } => write!(f, "tuned-lens head read back from {LENS_FILE}"),
        }
    }
}

/// One optimizer step, as logged.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepLog {
    /// 1-based.
    pub step: usize,
    /// Mean cross-entropy of the clean batch.
    pub loss: f64,
    /// Mean unlikelihood of the toxic batch, when training has that term.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unlikelihood: Option<f64>,
    pub lr: f64,
    pub grad_norm: f64,
    /// Tokens read in this step, both batches (padding excluded).
    pub tokens: usize,
    pub seconds: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub initial_val_loss: Option<f64>,
    pub final_val_loss: f64,
    /// Tokens read over the whole run, resumed parts included.
    pub tokens: usize,
    /// Tokens read and seconds spent by this invocation (a resumed run's own part).
    pub run_tokens: usize,
    pub seconds: f64,
    pub model_dir: PathBuf,
}

/// The line `detoxfuse calibrate` ends with.
impl std::fmt::Display for TrainSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} steps, {} tokens ({} of them in this run's {:.0} s, {:.0} tok/s); validation loss {} -> {:.4}; model: {}",
            self.steps,
            self.tokens,
            self.run_tokens,
            self.seconds,
            self.run_tokens as f64 / self.seconds.max(1e-9),
            self.initial_val_loss.map_or("?".into(), |l| format!("{l:.4}")),
            self.final_val_loss,
            self.model_dir.display()
        )
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct CheckpointRecord {
    step: usize,
    epoch: u64,
    batch_in_epoch: usize,
    tokens: usize,
    initial_val_loss: Option<f64>,
    file: String,
    config: TrainConfig,
    base_sha256: String,
    corpus_sha256: String,
    /// Position in the unlikelihood data's own epochs.
    #[serde(default)]
    unlikely_epoch: u64,
    #[serde(default)]
    unlikely_batch_in_epoch: usize,
    #[serde(default)]
    unlikely_sha256: Option<String>,
}

/// The base model a calibration model starts from: its file (GGUF) or directory, and hash.
pub struct Base {
    pub path: PathBuf,
    pub sha256: String,
    pub model: HfLlama,
}

impl Base {
    /// Loads the first `layers` layers of a llama-family GGUF or Hugging Face directory.
    pub fn load(path: &Path, layers: usize) -> Result<Self> {
        let model = if path.is_dir() {
            export::read_hf_dir(path)?
        } else {
            export::hf_llama_from_gguf(path, Some(layers))?
        };
        if layers == 0 || layers > model.config.num_hidden_layers {
            return Err(Error::Input(format!(
                "{} layers requested but {} has {}",
                layers,
                path.display(),
                model.config.num_hidden_layers
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
            sha256: crate::fetch::sha256_path(path)?,
            model,
        })
    }

    /// The whole base model (every layer), e.g. as a reference language model.
    pub fn load_full(path: &Path) -> Result<CalibrationModel> {
        let model = if path.is_dir() {
            export::read_hf_dir(path)?
        } else {
            export::hf_llama_from_gguf(path, None)?
        };
        let layers = model.config.num_hidden_layers;
        CalibrationModel::from_base(&model, layers, Trainable::default(), DType::F32)
    }

    pub fn init(&self, layers: usize, trainable: Trainable) -> Result<CalibrationModel> {
        CalibrationModel::from_base(&self.model, layers, trainable, DType::F32)
    }
}

pub fn train(
    base: &Base,
    corpus: &Path,
    out: &Path,
    cfg: &TrainConfig,
    resume: bool,
    progress: &mut dyn FnMut(Event),
) -> Result<TrainSummary> {
    if cfg.steps == 0 || cfg.batch_tokens == 0 || cfg.max_len < 2 {
        return Err(Error::Input(
            "--steps and --batch-tokens must be positive and --max-len at least 2".into(),
        ));
    }
    check_writable(out)?;
    let record_path = out.join("checkpoint.json");
    if !resume && record_path.exists() {
        return Err(Error::Input(format!(
            "{} already holds a training run; pass --resume to continue it, or choose another --out",
            out.display()
        )));
    }
    let corpus_sha256 = crate::fetch::sha256_path(corpus)?;
    let records = data::read_corpus(corpus)?;
    let (train_recs, val_recs) = data::split(records, cfg.val_per_mille);
    let tok = &base.model.tokenizer;
    let train_ex = data::tokenize(&train_recs, tok, cfg.max_len)?;
    let mut val_ex = data::tokenize(&val_recs, tok, cfg.max_len)?;
    val_ex.truncate(cfg.val_max_examples);
    if train_ex.is_empty() {
        return Err(Error::Input(format!(
            "corpus {} has no trainable example (every record is empty or prompt-only)",
            corpus.display()
        )));
    }
    if let Some(e) = train_ex.iter().find(|e| e.ids.len() > cfg.batch_tokens) {
        return Err(Error::Input(format!(
            "an example of {} tokens does not fit --batch-tokens {}; raise it or lower --max-len",
            e.ids.len(),
            cfg.batch_tokens
        )));
    }
    let unlikely = UnlikelyData::load(cfg, tok)?;
    let model = base.init(cfg.layers, cfg.trainable)?;
    let model = match cfg.head_init {
        HeadInit::Tied => model,
        HeadInit::Lens => {
            let w = lens_weights(base, &model, &train_ex, cfg, out, resume, progress)?;
            super::lens::apply(model, &w)?
        }
    };
    let mut opt_cfg = cfg.optim;
    opt_cfg.total_steps = cfg.steps;
    let mut opt = AdamW::new(opt_cfg, model.vars())?;
    let pad = tok.eos.unwrap_or(0);

    let mut state = CheckpointRecord {
        step: 0,
        epoch: 0,
        batch_in_epoch: 0,
        tokens: 0,
        initial_val_loss: None,
        file: String::new(),
        config: cfg.clone(),
        base_sha256: base.sha256.clone(),
        corpus_sha256: corpus_sha256.clone(),
        unlikely_epoch: 0,
        unlikely_batch_in_epoch: 0,
        unlikely_sha256: unlikely.as_ref().map(|u| u.sha256.clone()),
    };
    let log_path = out.join("log.jsonl");
    if resume {
        state = load_checkpoint(out, &state, &model, &mut opt)?;
    }
    let mut log = open_log(&log_path, resume.then_some(state.step))?;
    let mut write_log = |v: serde_json::Value| log.append(&v);

    progress(Event::Start {
        step: state.step,
        steps: cfg.steps,
        train_examples: train_ex.len(),
        val_examples: val_ex.len(),
        trainable_params: model.trainable_count(),
    });
    let mean_loss = |model: &CalibrationModel, ex: &[Example], batch_tokens| -> Result<f64> {
        let mut sum = LossSum::default();
        for b in data::ordered_batches(ex, batch_tokens) {
            sum.add(model.loss(&make_batch(ex, &b, pad)?)?);
        }
        Ok(sum.mean())
    };
    let validate = |model: &CalibrationModel| mean_loss(model, &val_ex, cfg.batch_tokens);
    let validation = |model: &CalibrationModel,
                      step: usize,
                      write_log: &mut dyn FnMut(serde_json::Value) -> Result<()>,
                      progress: &mut dyn FnMut(Event)|
     -> Result<f64> {
        let loss = validate(model)?;
        let unlikely_nll = match &unlikely {
            Some(u) if !u.val.is_empty() => {
                Some(mean_loss(model, &u.val, cfg.unlikely_batch_tokens)?)
            }
            _ => None,
        };
        let mut line = serde_json::json!({"step": step, "val_loss": loss});
        if let Some(n) = unlikely_nll {
            line["val_unlikely_nll"] = n.into();
        }
        write_log(line)?;
        progress(Event::Validation {
            step,
            loss,
            unlikely_nll,
        });
        Ok(loss)
    };
    if state.step == 0 && !val_ex.is_empty() {
        state.initial_val_loss = Some(validation(&model, 0, &mut write_log, progress)?);
    }
    let start = Instant::now();
    let start_tokens = state.tokens;
    let mut batches = data::epoch_batches(&train_ex, cfg.batch_tokens, cfg.seed, state.epoch);
    let mut unlikely_batches = match &unlikely {
        Some(u) => u.epoch(cfg, state.unlikely_epoch),
        None => Vec::new(),
    };
    while state.step < cfg.steps {
        if state.batch_in_epoch >= batches.len() {
            state.epoch += 1;
            state.batch_in_epoch = 0;
            batches = data::epoch_batches(&train_ex, cfg.batch_tokens, cfg.seed, state.epoch);
        }
        let t0 = Instant::now();
        let idx = &batches[state.batch_in_epoch];
        let batch = make_batch(&train_ex, idx, pad)?;
        let mut tokens: usize = idx.iter().map(|&i| train_ex[i].ids.len()).sum();
        let mut parts = vec![(&batch, Objective::Likelihood, 1.0)];
        let toxic;
        if let Some(u) = &unlikely {
            if state.unlikely_batch_in_epoch >= unlikely_batches.len() {
                state.unlikely_epoch += 1;
                state.unlikely_batch_in_epoch = 0;
                unlikely_batches = u.epoch(cfg, state.unlikely_epoch);
            }
            let uidx = &unlikely_batches[state.unlikely_batch_in_epoch];
            state.unlikely_batch_in_epoch += 1;
            tokens += uidx.iter().map(|&i| u.train[i].ids.len()).sum::<usize>();
            toxic = make_batch(&u.train, uidx, pad)?;
            parts.push((&toxic, Objective::Unlikelihood, cfg.unlikelihood));
        }
        let (means, grads) = model.objectives_and_grads(&parts)?;
        let (loss, unlikelihood) = (means[0], means.get(1).copied());
        if !means.iter().all(|l| l.is_finite()) {
            return Err(Error::Input(format!(
                "the loss became {means:?} at step {}; lower --lr (the last checkpoint is intact)",
                state.step + 1
            )));
        }
        let info = opt.step(model.vars(), &grads)?;
        state.step += 1;
        state.batch_in_epoch += 1;
        state.tokens += tokens;
        let entry = StepLog {
            step: state.step,
            loss,
            unlikelihood,
            lr: info.lr,
            grad_norm: info.grad_norm,
            tokens,
            seconds: t0.elapsed().as_secs_f64(),
        };
        write_log(serde_json::to_value(&entry)?)?;
        progress(Event::Step(&entry));
        let last = state.step == cfg.steps;
        if (cfg.eval_every > 0 && state.step.is_multiple_of(cfg.eval_every) || last)
            && !val_ex.is_empty()
        {
            validation(&model, state.step, &mut write_log, progress)?;
        }
        if cfg.checkpoint_every > 0 && state.step.is_multiple_of(cfg.checkpoint_every) || last {
            save_checkpoint(out, &mut state, &model, &opt)?;
            progress(Event::Checkpoint { step: state.step });
        }
    }
    let final_val_loss = if val_ex.is_empty() {
        f64::NAN
    } else {
        validate(&model)?
    };
    let model_dir = out.join("model");
    let manifest = serde_json::json!({
        "kind": "detoxfuse calibration model",
        "detoxfuse_version": env!("CARGO_PKG_VERSION"),
        "base": {"path": base.path, "sha256": base.sha256, "layers_taken": cfg.layers},
        "corpus": {"path": corpus, "sha256": corpus_sha256, "train_examples": train_ex.len(),
                   "validation_examples": val_ex.len(),
                   "manifest": read_corpus_manifest(corpus)},
        "train": cfg,
        "lens": (cfg.head_init == HeadInit::Lens).then_some(LENS_FILE),
        "unlikely_corpus": unlikely.as_ref().map(|u| serde_json::json!({
            "path": cfg.unlikely_corpus, "sha256": u.sha256,
            "train_examples": u.train.len(), "validation_examples": u.val.len(),
        })),
        "steps": state.step,
        "tokens": state.tokens,
        "initial_val_loss": state.initial_val_loss,
        "final_val_loss": final_val_loss,
    });
    let exported = HfLlama {
        config: model.config.clone(),
        tensors: model.tensors(),
        tokenizer: base.model.tokenizer.clone(),
    };
    export::write_hf_dir(
        &exported,
        &model_dir,
        &[("calibration.json", serde_json::to_string_pretty(&manifest)?)],
    )?;
    if cfg.head_init == HeadInit::Lens {
        // The probe rebuilds the initialisation from it.
        std::fs::copy(out.join(LENS_FILE), model_dir.join(LENS_FILE))
            .ctx(|| format!("copying {LENS_FILE} into {}", model_dir.display()))?;
    }
    Ok(TrainSummary {
        steps: state.step,
        initial_val_loss: state.initial_val_loss,
        final_val_loss,
        tokens: state.tokens,
        run_tokens: state.tokens - start_tokens,
        seconds: start.elapsed().as_secs_f64(),
        model_dir,
    })
}

/// The unlikelihood data of a run: tokenized pairs split like the corpus, in their own
/// seeded epochs.
struct UnlikelyData {
    train: Vec<Example>,
    val: Vec<Example>,
    sha256: String,
}

impl UnlikelyData {
    fn load(cfg: &TrainConfig, tok: &crate::text::Tokenizer) -> Result<Option<Self>> {
        if cfg.unlikelihood == 0.0 {
            return Ok(None);
        }
        if !(cfg.unlikelihood.is_finite() && cfg.unlikelihood > 0.0) {
            return Err(Error::Input(format!(
                "--unlikelihood {} must be a finite number >= 0",
                cfg.unlikelihood
            )));
        }
        let Some(path) = &cfg.unlikely_corpus else {
            return Err(Error::Input(
                "--unlikelihood needs an unlikelihood corpus (--unlikely-corpus)".into(),
            ));
        };
        let (train, val) = data::split(data::read_corpus(path)?, cfg.val_per_mille);
        // Lists of statements run longer than clean passages: room for the continuation.
        let len = 2 * cfg.max_len;
        let train = data::tokenize(&train, tok, len)?;
        let mut val = data::tokenize(&val, tok, len)?;
        val.truncate(cfg.val_max_examples);
        if train.is_empty() {
            return Err(Error::Input(format!(
                "unlikelihood corpus {} has no example with a continuation left after truncation",
                path.display()
            )));
        }
        if let Some(e) = train
            .iter()
            .find(|e| e.ids.len() > cfg.unlikely_batch_tokens)
        {
            return Err(Error::Input(format!(
                "an unlikelihood example of {} tokens does not fit --unlikely-batch-tokens {}",
                e.ids.len(),
                cfg.unlikely_batch_tokens
            )));
        }
        Ok(Some(Self {
            train,
            val,
            sha256: crate::fetch::sha256_path(path)?,
        }))
    }

    /// Batches of one epoch, in an order independent of the clean data's.
    fn epoch(&self, cfg: &TrainConfig, epoch: u64) -> Vec<Vec<usize>> {
        const STREAM: u64 = 0x756e_6c69_6b65_6c79; // "unlikely"
        data::epoch_batches(
            &self.train,
            cfg.unlikely_batch_tokens,
            cfg.seed ^ STREAM,
            epoch,
        )
    }
}

/// The lens matrix `W` (`hidden × hidden`, tensor `lens`) in the run directory and in the
/// exported model directory.
pub const LENS_FILE: &str = "lens.safetensors";

/// The lens of a run: read back when resuming, otherwise fitted on an even spread of
/// `lens_texts` training examples and written atomically before the first step. Both paths
/// read the file, so a resumed run starts from bit-identical weights.
fn lens_weights(
    base: &Base,
    truncated: &CalibrationModel,
    train_ex: &[Example],
    cfg: &TrainConfig,
    out: &Path,
    resume: bool,
    progress: &mut dyn FnMut(Event),
) -> Result<Tensor> {
    let path = out.join(LENS_FILE);
    let t0 = Instant::now();
    let mut relative_error = None;
    let mut positions = 0;
    if !(resume && path.exists()) {
        if cfg.lens_texts == 0 {
            return Err(Error::Input(
                "--lens-texts must be positive with --head-init lens".into(),
            ));
        }
        let sample = super::lens::sample(train_ex, cfg.lens_texts);
        let full = Base::load_full(&base.path)?;
        let pad = base.model.tokenizer.eos.unwrap_or(0);
        let d = truncated.config.hidden_size;
        let (x, y, n) =
            super::lens::hidden_pairs(truncated, &full, &sample, cfg.batch_tokens, pad)?;
        drop(full);
        let w = super::lens::fit(&x, &y, n, d, cfg.lens_ridge)?;
        relative_error = Some(super::lens::relative_error(&x, &y, n, d, &w)?);
        positions = n;
        crate::atomic::write_safetensors(&path, &HashMap::from([("lens".to_string(), w)]))?;
    }
    let w = super::lens::read(&path)?;
    progress(Event::Lens {
        positions,
        relative_error,
        seconds: t0.elapsed().as_secs_f64(),
    });
    Ok(w)
}

/// The corpus manifest written by `detoxfuse corpus build` next to the corpus, if any.
fn read_corpus_manifest(corpus: &Path) -> serde_json::Value {
    let p = corpus.with_extension("manifest.json");
    std::fs::read_to_string(p)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(serde_json::Value::Null)
}

fn save_checkpoint(
    out: &Path,
    state: &mut CheckpointRecord,
    model: &CalibrationModel,
    opt: &AdamW,
) -> Result<()> {
    let previous = std::mem::take(&mut state.file);
    state.file = save_state(out, state.step, model.vars(), opt)?;
    commit_record(out, state, &previous, &state.file)
}

fn load_checkpoint(
    out: &Path,
    fresh: &CheckpointRecord,
    model: &CalibrationModel,
    opt: &mut AdamW,
) -> Result<CheckpointRecord> {
    let p = out.join("checkpoint.json");
    let text = std::fs::read_to_string(&p).map_err(|e| {
        Error::Input(format!(
            "--resume: cannot read {} ({e}); run without --resume to start",
            p.display()
        ))
    })?;
    let rec: CheckpointRecord = serde_json::from_str(&text)
        .map_err(|e| Error::Input(format!("--resume: {} is damaged: {e}", p.display())))?;
    if rec.base_sha256 != fresh.base_sha256 {
        return Err(Error::Input(format!(
            "--resume: the checkpoint in {} was trained from a different base model (sha256 {}); pass that --base",
            out.display(),
            rec.base_sha256
        )));
    }
    if rec.corpus_sha256 != fresh.corpus_sha256 {
        return Err(Error::Input(format!(
            "--resume: the corpus changed since the checkpoint in {} (sha256 {}); pass the same --corpus",
            out.display(),
            rec.corpus_sha256
        )));
    }
    if rec.unlikely_sha256 != fresh.unlikely_sha256 {
        return Err(Error::Input(format!(
            "--resume: the unlikelihood corpus changed since the checkpoint in {}; pass the same one",
            out.display()
        )));
    }
    if rec.config != fresh.config {
        return Err(Error::Input(format!(
            "--resume: the training options differ from the checkpoint's: {}; pass the same options",
            serde_json::to_string(&rec.config)?
        )));
    }
    load_state(&out.join(&rec.file), model.vars(), opt, rec.step)?;
    Ok(rec)
}
