//! The calibration trainer's options as a user gives them (the CLI's `calibrate` flags are
//! derived from here under the `clap` feature, so each option and its default has one
//! definition), and the configurations of the two recipes that they make.

use std::path::PathBuf;

use super::fused::{Divergence, FusedConfig, TeacherConfig};
use super::model::{LayerTraining, Trainable};
use super::optim::AdamWConfig;
use super::train::{HeadInit, TrainConfig};
use crate::fuse::FusionNorm;
use crate::hub::Hub;
use crate::recipes;

/// Options of both recipes; an option left out takes the chosen recipe's default.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct TrainOptions {
    #[cfg_attr(feature = "clap", arg(long, default_value_t = TrainConfig::default().layers))]
    pub layers: usize,
    /// Optimizer steps (default: 300 for the paper recipe, 200 for fused).
    #[cfg_attr(feature = "clap", arg(long))]
    pub steps: Option<usize>,
    /// Most token slots (rows × longest row) per batch.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = TrainConfig::default().batch_tokens))]
    pub batch_tokens: usize,
    #[cfg_attr(feature = "clap", arg(long, default_value_t = TrainConfig::default().max_len))]
    pub max_len: usize,
    /// Peak learning rate (default: 5e-4 paper, 1e-3 fused).
    #[cfg_attr(feature = "clap", arg(long))]
    pub lr: Option<f64>,
    /// Warmup steps (default: 20 paper, 10 fused).
    #[cfg_attr(feature = "clap", arg(long))]
    pub warmup: Option<usize>,
    /// AdamW weight decay (default: 0.01 paper, 0 fused).
    #[cfg_attr(feature = "clap", arg(long))]
    pub weight_decay: Option<f64>,
    /// Global gradient-norm clip (0 = off).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = AdamWConfig::default().clip))]
    pub clip: f64,
    /// Validate every N steps (default: 40 paper, 50 fused).
    #[cfg_attr(feature = "clap", arg(long))]
    pub eval_every: Option<usize>,
    #[cfg_attr(feature = "clap", arg(long, default_value_t = TrainConfig::default().checkpoint_every))]
    pub checkpoint_every: usize,
    #[cfg_attr(feature = "clap", arg(long, default_value_t = TrainConfig::default().val_max_examples))]
    pub val_examples: usize,
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0))]
    pub seed: u64,
    /// Train the token embeddings (and a tied LM head) too.
    #[cfg_attr(feature = "clap", arg(long))]
    pub train_embeddings: bool,
    /// Train an untied LM head too.
    #[cfg_attr(feature = "clap", arg(long))]
    pub train_head: bool,
    /// How the LM head starts.
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value = "lens"))]
    pub head_init: HeadInit,
    /// Corpus texts whose hidden states fit the lens.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 200))]
    pub lens_texts: usize,
    /// Ridge strength of the lens fit (relative to the mean eigenvalue of XᵀX).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 1e-3))]
    pub lens_ridge: f64,
    /// Weight of an unlikelihood term (0 = none): each step also takes a batch of toxic
    /// continuations (ToxiGen hate lists of the groups not held back) and lowers their
    /// probability, `loss = CE(clean) + w × UL(toxic)`.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = recipes::PAPER_UNLIKELIHOOD))]
    pub unlikelihood: f64,
    /// The unlikelihood pairs (default: <cache>/corpus/unlikely.jsonl, written by
    /// `detoxfuse corpus unlikely` when missing).
    #[cfg_attr(feature = "clap", arg(long))]
    pub unlikely_corpus: Option<PathBuf>,
    /// Most token slots of each step's unlikelihood batch.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = TrainConfig::default().unlikely_batch_tokens))]
    pub unlikely_batch_tokens: usize,
    #[cfg_attr(feature = "clap", command(flatten))]
    pub fused: FusedOptions,
}

/// Options of the fusion-aware recipe only.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct FusedOptions {
    /// fused: how the calibration layers train (lora: rank --lora-rank adapters; full: every
    /// layer weight; frozen: only A and the LayerNorm affine).
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value = "lora"))]
    pub layer_training: LayerTrainingKind,
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 16))]
    pub lora_rank: usize,
    /// fused: rows per step of the target's clean continuations (KL term).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = FusedConfig::default().keep_rows))]
    pub keep_rows: usize,
    /// fused: rows per step holding toxic tokens (unlikelihood term).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = FusedConfig::default().detox_rows))]
    pub detox_rows: usize,
    /// fused: α of each training row is drawn from [--alpha-min, --alpha-max].
    #[cfg_attr(feature = "clap", arg(long, default_value_t = FusedConfig::default().alpha_min))]
    pub alpha_min: f64,
    #[cfg_attr(feature = "clap", arg(long, default_value_t = FusedConfig::default().alpha_max))]
    pub alpha_max: f64,
    #[cfg_attr(feature = "clap", arg(long, default_value_t = FusedConfig::default().keep_weight))]
    pub keep_weight: f64,
    /// fused: the keep term's divergence.
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value = "reverse"))]
    pub keep_divergence: Divergence,
    /// fused: how the fused state is scaled before the target's head, in training and at
    /// inference (recorded in each target's manifest).
    #[cfg_attr(
        feature = "clap",
        arg(long, value_enum, default_value = "keep-target-norm")
    )]
    pub fusion_norm: FusionNorm,
    /// fused: weight of the unlikelihood term (0: keep only).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = FusedConfig::default().detox_weight))]
    pub detox_weight: f64,
    /// fused: also match a DExperts-style teacher along the detox rows' continuations,
    /// `KL(p_teacher ‖ p_α)` with `p_teacher = softmax(z_target + β·(z_expert − z_anti))`
    /// (the ablation's teacher term; the experts are trained first when missing).
    #[cfg_attr(feature = "clap", arg(long))]
    pub teacher: bool,
    /// fused, with --teacher: β of the teacher (the `dexperts-b2` row's is 2).
    #[cfg_attr(
        feature = "clap",
        arg(long, default_value_t = 2.0, requires = "teacher")
    )]
    pub teacher_beta: f64,
    /// fused, with --teacher: weight of the mean teacher KL.
    #[cfg_attr(
        feature = "clap",
        arg(long, default_value_t = 1.0, requires = "teacher")
    )]
    pub teacher_weight: f64,
    /// fused, with --teacher: the expert (default: the paper recipe's model).
    #[cfg_attr(feature = "clap", arg(long, requires = "teacher"))]
    pub teacher_expert: Option<PathBuf>,
    /// fused, with --teacher: the anti-expert (default: the DExperts anti-expert).
    #[cfg_attr(feature = "clap", arg(long, requires = "teacher"))]
    pub teacher_anti_expert: Option<PathBuf>,
}

/// [`LayerTraining`] without its rank (given on its own, `--lora-rank`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum LayerTrainingKind {
    Lora,
    Full,
    Frozen,
}

impl TrainOptions {
    /// The paper recipe's trainer configuration (`hub` places the default unlikelihood data).
    pub fn paper(&self, hub: &Hub) -> TrainConfig {
        // Without the term its options stay at their defaults, so runs recorded before the
        // option existed still resume.
        let (unlikely_corpus, unlikely_batch_tokens) = if self.unlikelihood == 0.0 {
            (None, TrainConfig::default().unlikely_batch_tokens)
        } else {
            (
                Some(
                    self.unlikely_corpus
                        .clone()
                        .unwrap_or_else(|| hub.unlikely_corpus()),
                ),
                self.unlikely_batch_tokens,
            )
        };
        let (lens_texts, lens_ridge) = match self.head_init {
            HeadInit::Lens => (self.lens_texts, self.lens_ridge),
            HeadInit::Tied => (0, 0.0),
        };
        let d = AdamWConfig::default();
        let steps = self.steps.unwrap_or(recipes::PAPER_STEPS);
        TrainConfig {
            head_init: self.head_init,
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
                lr: self.lr.unwrap_or(d.lr),
                warmup: self.warmup.unwrap_or(d.warmup),
                weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
                clip: self.clip,
                total_steps: steps,
                ..d
            },
            steps,
            batch_tokens: self.batch_tokens,
            max_len: self.max_len,
            eval_every: self.eval_every.unwrap_or(TrainConfig::default().eval_every),
            checkpoint_every: self.checkpoint_every,
            val_max_examples: self.val_examples,
            seed: self.seed,
            ..TrainConfig::default()
        }
    }

    /// The teacher of `--teacher` with its models' directories (`None` without the flag).
    pub fn teacher(&self, expert: PathBuf, anti_expert: PathBuf) -> Option<TeacherConfig> {
        self.fused.teacher.then_some(TeacherConfig {
            expert,
            anti_expert,
            beta: self.fused.teacher_beta,
            weight: self.fused.teacher_weight,
        })
    }

    /// The fusion-aware recipe's trainer configuration (without a teacher: its models'
    /// directories come from [`TrainOptions::teacher`]).
    pub fn fused(&self) -> FusedConfig {
        let d = FusedConfig::default();
        let f = &self.fused;
        FusedConfig {
            layers: self.layers,
            layer_training: match f.layer_training {
                LayerTrainingKind::Lora => LayerTraining::Lora { rank: f.lora_rank },
                LayerTrainingKind::Full => LayerTraining::Full,
                LayerTrainingKind::Frozen => LayerTraining::Frozen,
            },
            optim: AdamWConfig {
                lr: self.lr.unwrap_or(d.optim.lr),
                warmup: self.warmup.unwrap_or(d.optim.warmup),
                weight_decay: self.weight_decay.unwrap_or(d.optim.weight_decay),
                clip: self.clip,
                ..d.optim
            },
            steps: self.steps.unwrap_or(d.steps),
            keep_rows: f.keep_rows,
            detox_rows: f.detox_rows,
            alpha_min: f.alpha_min,
            alpha_max: f.alpha_max,
            keep_weight: f.keep_weight,
            keep_divergence: f.keep_divergence,
            detox_weight: f.detox_weight,
            fusion_norm: f.fusion_norm,
            eval_every: self.eval_every.unwrap_or(d.eval_every),
            checkpoint_every: self.checkpoint_every,
            seed: self.seed,
            ..d
        }
    }
}
